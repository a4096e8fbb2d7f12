"""`dsv3-posttrain serve`: vLLM's OpenAI-compatible server with the engine fixes, started once on 127.0.0.1
and used as the `openai` distillation teacher's endpoint and through TRL's client (GRPO's server mode)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

import cli
from subprocess_env import repo_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 420  # engine start is ~40 s on a quiet 2-core machine; CI shares its cores


def test_serve_without_a_model_directory_is_one_line(capsys):
    assert cli.main(["serve", "/nonexistent/model"]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err == ("dsv3-posttrain serve: error: MODEL: no checkpoint directory at /nonexistent/model "
                   "(and not a Hub id of the form org/name)")


def test_serve_on_a_busy_port_is_one_line(tiny_model_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert cli.main(["serve", str(tiny_model_dir), "--port", str(port)]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"dsv3-posttrain serve: error: cannot listen on 127.0.0.1:{port}:") and "\n" not in err


@pytest.mark.vllm
def test_server_options_carry_the_engine_fixes_and_the_users_options_win(tiny_model_dir):
    """What `serve` hands vLLM's own parser: the engine arguments every engine gets (on CPU: fp32, eager,
    CPU_MLA, the worker class that applies the fixes in the engine-core process), TRL's options with
    --trl, and the user's own vLLM options last, so they win."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from engines.serve import server_options
    from engines.vllm_engine import CPU_WORKER, on_cpu

    argv = server_options(str(tiny_model_dir), port=8123, trl=True, extra=["--max-num-seqs", "4", "--seed", "7"])
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
    assert (args.model, args.host, args.port, args.max_num_seqs, args.seed) == (str(tiny_model_dir), "127.0.0.1", 8123, 4, 7)
    assert args.logprobs_mode == "processed_logprobs" and args.max_logprobs == -1
    if on_cpu():
        assert args.dtype == "float32" and args.enforce_eager and args.worker_cls == CPU_WORKER
        assert args.attention_config.backend.name == "CPU_MLA"
        assert args.max_model_len == 1024  # the tiny model's context (at most 4096 on CPU)
        assert args.weight_transfer_config is None  # NCCL weight transfer: CUDA only


@pytest.mark.vllm
def test_server_options_serve_an_fp8_checkpoint_dequantized_without_fp8_kernels(tmp_path, monkeypatch):
    """Where vLLM has no FP8 kernel, `serve` takes the same dequantized view as `make_llm`: the checkpoint told
    unquantized, our loader format, which the worker class registers in the server's engine-core process."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from engines.capabilities import FORCE_NO_FP8_KERNELS_ENV
    from engines.serve import server_options
    from engines.vllm_engine import DEQUANTIZED_FP8_LOAD_FORMAT

    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    monkeypatch.setenv(FORCE_NO_FP8_KERNELS_ENV, "1")
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(server_options(str(tmp_path)))
    assert args.load_format == DEQUANTIZED_FP8_LOAD_FORMAT and args.hf_overrides == {"quantization_config": None}
    assert args.worker_cls.startswith("engines.vllm_worker.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """`dsv3-posttrain serve TINY --trl` on a free 127.0.0.1 port, in its own process group, for this module."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = repo_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "serve", str(tiny_model_dir), "--port", str(port),
                                 "--trl"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(base):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited with {proc.returncode}" if proc.returncode is not None else f"not up in {START_TIMEOUT_S} s"
                pytest.fail(f"dsv3-posttrain serve {why}:\n{log_path.read_text()[-4000:]}", pytrace=False)
            time.sleep(2)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine-core process it started
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.vllm
@pytest.mark.slow
def test_distill_openai_backend_generates_from_serve(server, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # nothing to send to a local server
    out = tmp_path / "distill"
    rc = cli.main(["distill", "--backend", "openai", "--api_base", f"{server}/v1", "--model_name_or_path",
                   str(tiny_model_dir), "--dataset_name", "builtin:arith?n_train=3", "--num_generations", "2",
                   "--max_completion_length", "16", "--output_dir", str(out), "--disable_tqdm", "true"])
    assert rc == 0
    assert "of 6 samples" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples"]["total"] == 6
    rows = [json.loads(line) for p in sorted(out.rglob("*.jsonl")) if p.name != "ledger.jsonl"
            for line in p.read_text().splitlines()]
    samples = [r for r in rows if r.get("sample_type") != "original"]
    assert len(samples) == 6 and all(r["teacher"] == f"openai:{tiny_model_dir}@{server}/v1" for r in samples)
    # the server's own token counts (usage), within the requested budget
    assert all(1 <= r["completion_tokens"] <= 16 and r["prompt_tokens"] > 10 for r in samples)


@pytest.mark.vllm
@pytest.mark.slow
def test_served_logprobs_equal_transformers_through_trls_client(server, tiny_model_dir):
    """GRPO's server engine (TRL's `VLLMClient`) samples from `serve --trl`; the log-probabilities the server
    returns for its samples (after temperature 1) equal transformers' on the same weights. Without the CPU
    rotary fix in the server's engine-core process they were 0.027 off here; with it, ~1e-6."""
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    from engines import SamplingSettings
    from engines.vllm_engine import VLLMServerEngine

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]
               for q in ("Mia has 12 apples. She buys 7 more. How many?", "What is 3 * 4 + 2?")]
    engine = VLLMServerEngine(server, connection_timeout=30)
    groups = engine.generate(prompts, 2, SamplingSettings(temperature=1.0, max_tokens=12))
    hf = DeepseekV3ForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    worst = 0.0
    for prompt, group in zip(prompts, groups):
        assert len(group) == 2
        for c in group:
            assert c.token_ids and len(c.logprobs) == len(c.token_ids)
            with torch.no_grad():
                logits = hf(input_ids=torch.tensor([prompt + c.token_ids]), use_cache=False).logits[0]
            lp = logits.float().log_softmax(-1)
            want = [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(c.token_ids)]
            worst = max(worst, max(abs(a - b) for a, b in zip(c.logprobs, want)))
    assert worst <= 1e-4, worst
    # seeded: each prompt's own seed (one request per prompt, sent concurrently), so the samples do not depend on
    # the batch, as the colocated engine's; the server reports no finish reasons, the engine derives them
    seeded = SamplingSettings(temperature=1.0, max_tokens=12, seed=3)
    forward, backward = engine.generate(prompts, 2, seeded), engine.generate(prompts[::-1], 2, seeded)[::-1]
    assert [[c.token_ids for c in g] for g in forward] == [[c.token_ids for c in g] for g in backward]
    assert all(c.finish_reason == "length" for g in forward for c in g if len(c.token_ids) == 12)
