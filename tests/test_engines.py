"""The ground-floor `engines` package: its import boundary, one place that builds `vllm.LLM`, one home for
patches, one set of sampling/completion types, and the HF engine (source checks are AST walks, so lazy
imports inside functions count too)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ("engines", "posttrain", "rewards", "data_pipelines", "eval_hooks")


def _modules() -> list[Path]:
    return sorted(p for pkg in PROJECT for p in (ROOT / pkg).rglob("*.py")) + [ROOT / "cli.py"]


def _imported(path: Path) -> set[str]:
    """Top-level names of the modules `path` imports (relative imports resolved to its own package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module.split(".")[0] if node.level == 0 else path.relative_to(ROOT).parts[0])
    return names


@pytest.mark.parametrize("package, forbidden", [
    ("engines", {"posttrain", "rewards", "data_pipelines", "eval_hooks"}),
    ("rewards", {"posttrain", "data_pipelines", "eval_hooks"}),
])
def test_import_boundaries(package, forbidden):
    bad = {str(p.relative_to(ROOT)): sorted(_imported(p) & forbidden) for p in (ROOT / package).rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_one_module_builds_vllm_llm():
    builders = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name == "LLM":
                    builders.append(str(path.relative_to(ROOT)))
    assert builders == ["engines/vllm_engine.py"]


def _library_attribute_assignments(path: Path) -> list[str]:
    """`x.attr = ...` / `setattr(x, ...)` where `x` was bound by importing a third-party module or its member."""
    tree = ast.parse(path.read_text())
    library: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            library.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] not in PROJECT)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] not in PROJECT:
            library.update(a.asname or a.name for a in node.names)
    library -= set(sys.stdlib_module_names)

    def base(expr: ast.expr) -> str | None:
        while isinstance(expr, ast.Attribute):
            expr = expr.value
        return expr.id if isinstance(expr, ast.Name) else None

    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            for sub in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if isinstance(sub, ast.Attribute) and base(sub) in library:
                    found.append(f"{where}:{node.lineno}: {ast.unparse(sub)}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" \
                and node.args and base(node.args[0]) in library:
            found.append(f"{where}:{node.lineno}: setattr({ast.unparse(node.args[0])}, ...)")
    return found


def test_only_compat_assigns_to_library_attributes():
    found = [hit for p in _modules() if p != ROOT / "engines/compat.py" for hit in _library_attribute_assignments(p)]
    assert found == []


def test_the_scan_finds_a_library_patch(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import vllm.model_executor.layers.utils as u\nfrom trl.trainer import grpo_trainer\n"
                   "u.dispatch = None\nsetattr(grpo_trainer, 'x', 1)\n")
    assert len(_library_attribute_assignments(bad)) == 2


def test_vllm_multiprocessing_env_is_set_in_one_place():
    setters = [str(p.relative_to(ROOT)) for p in _modules() if 'environ["VLLM_ENABLE_V1_MULTIPROCESSING"]' in p.read_text()
               or "environ.setdefault(\"VLLM_ENABLE_V1_MULTIPROCESSING\"" in p.read_text()]
    assert setters == ["engines/compat.py"]


def test_one_set_of_sampling_and_completion_types():
    import data_pipelines.teachers as teachers
    import engines
    from engines import types

    assert teachers.Completion is engines.Completion is types.Completion
    assert teachers.SamplingSettings is engines.SamplingSettings is types.SamplingSettings
    for path in _modules():
        tree = ast.parse(path.read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        if path != ROOT / "engines/types.py":
            assert not defined & {"Completion", "SamplingSettings", "SamplingConfig", "prompt_seed", "sample_seed"}, path


def test_prompt_seed():
    from engines import prompt_seed

    # token ids keep the seeds GRPO's rollouts have always used
    import hashlib

    ids = [5, 9, 200]
    assert prompt_seed(3, ids) == int.from_bytes(hashlib.sha1(b"3|5,9,200").digest()[:4], "big") & 0x7FFFFFFF
    chat = [{"role": "user", "content": "2+2?"}]
    assert prompt_seed(0, chat) == prompt_seed(0, [dict(chat[0])])  # by value
    seeds = {prompt_seed(0, chat), prompt_seed(1, chat), prompt_seed(0, chat, 0), prompt_seed(0, chat, 1),
             prompt_seed(0, "2+2?"), prompt_seed(0, ids)}
    assert len(seeds) == 6 and all(0 <= s < 2**31 for s in seeds)


def test_hf_engine_seeded_samples_do_not_depend_on_the_batch(tiny_model_dir):
    """What the `hf` teacher and GRPO's HF fallback rely on: with a seed, a prompt's samples are the same
    alone or in a batch, the caller's random stream is untouched, and each sampled token has its log-prob."""
    from transformers import AutoTokenizer

    from engines import SamplingSettings
    from engines.hf import HFGenerateEngine
    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32)
    engine = HFGenerateEngine(model, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                              [tok.eos_token_id])
    a = tok("Mia has 3 apples.", add_special_tokens=False)["input_ids"]
    b = tok("What is 12 + 7? Think first.", add_special_tokens=False)["input_ids"]
    sampling = SamplingSettings(temperature=1.0, max_tokens=6, seed=11)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    both = engine.generate([a, b], 2, sampling)
    assert torch.equal(torch.random.get_rng_state(), state)
    alone = engine.generate([b], 2, sampling)
    assert [c.token_ids for c in both[1]] == [c.token_ids for c in alone[0]]
    for c in both[0] + both[1]:
        assert 1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids) and c.finish_reason in ("stop", "length")
        assert all(lp <= 0 for lp in c.logprobs)
    # without log-probs (evaluation): the same samples, and no scores kept (vocab x tokens x rows floats)
    without = engine.generate([a, b], 2, SamplingSettings(temperature=1.0, max_tokens=6, seed=11, logprobs=False))
    assert [[c.token_ids for c in g] for g in without] == [[c.token_ids for c in g] for g in both]
    assert all(c.logprobs is None for g in without for c in g)


def test_grpo_server_mode_limits_are_one_line_errors_before_loading(tmp_path):
    """`vllm_mode: server` cannot take an FP8 policy's weights, and needs CUDA for its NCCL weight sync:
    both said before any model is loaded or server contacted."""
    import json

    from posttrain.errors import UserError
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.grpo.run import check_server_mode

    fp8 = tmp_path / "fp8"
    fp8.mkdir()
    (fp8 / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    cfg = GRPORecipeConfig(output_dir=str(tmp_path / "o"), model_name_or_path=str(fp8), use_vllm=True,
                           vllm_mode="server")
    with pytest.raises(UserError, match="is an FP8 checkpoint: weight sync to a vLLM server"):
        check_server_mode(cfg)
    cfg.model_name_or_path = str(plain)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs CUDA; on CPU use vllm_mode: colocate"):
            check_server_mode(cfg)
    cfg.vllm_mode = "colocate"
    check_server_mode(cfg)


def test_hf_engine_samples_by_the_settings_not_the_checkpoint_generation_config(tiny_model_dir, tmp_path):
    """vLLM gets explicit SamplingParams, so a checkpoint's generation_config.json changes nothing there; it
    must change nothing in the HF engine either: the same tokens and log-probs (those of the model's own
    softmax at temperature 1) with a repetition penalty, suppressed tokens, ... in the checkpoint as without."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from engines import SamplingSettings
    from engines.hf import HFGenerateEngine
    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok("Mia has 3 apples. She buys 4 more.", add_special_tokens=False)["input_ids"]
    runs = [SamplingSettings(temperature=1.0, max_tokens=6, seed=1), SamplingSettings(temperature=0.0, max_tokens=6)]

    def generate(model_dir):
        model = DeepseekV3ForCausalLMWithMTP.from_pretrained(model_dir, dtype=torch.float32)
        own = model.generation_config
        engine = HFGenerateEngine(model, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                                  [tok.eos_token_id])
        out = [engine.generate([prompt], 1, s)[0][0] for s in runs]
        assert model.generation_config is own  # the checkpoint's is the model's again afterwards
        return model, out

    model, plain = generate(tiny_model_dir)
    for c in plain:  # at temperature 1 (and greedy) the processed log-probs are the model's own
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1 : -1]
        ref = logits.float().log_softmax(-1)[torch.arange(len(c.token_ids)), torch.tensor(c.token_ids)]
        assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-4)

    shaped = tmp_path / "shaped"
    shutil.copytree(tiny_model_dir, shaped)
    cfg = json.loads((shaped / "generation_config.json").read_text())
    cfg.update(repetition_penalty=1.3, no_repeat_ngram_size=2, suppress_tokens=[plain[1].token_ids[0]],
               do_sample=True, temperature=0.6, top_k=5, top_p=0.9)
    (shaped / "generation_config.json").write_text(json.dumps(cfg))
    _, out = generate(shaped)
    for a, b in zip(out, plain):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


class _StubVLLMClient:
    """TRL's VLLMClient without a server: records each `generate` call's arguments and answers, for each
    prompt, `n` completions of the tokens that `answers(prompt, n, kwargs)` gives."""

    def __init__(self, answers):
        self.calls: list[dict] = []
        self.answers = answers

    def generate(self, **kw):
        self.calls.append(kw)
        ids = [c for p in kw["prompts"] for c in self.answers(p, kw["n"], kw)]
        return {"prompt_ids": kw["prompts"], "completion_ids": ids,
                "logprobs": [[[-0.1 * (t + 1)] for t in range(len(c))] for c in ids], "logprob_token_ids": None}


def _server_engine(monkeypatch, answers, **kwargs):
    import trl.generation.vllm_client as vllm_client

    from engines.vllm_engine import VLLMServerEngine

    stub = _StubVLLMClient(answers)
    monkeypatch.setattr(vllm_client, "VLLMClient", lambda **kw: stub)
    return VLLMServerEngine("http://stub:8000", **kwargs), stub


def test_vllm_server_engine_sends_seed_stops_and_ignore_eos_and_reports_finish_reasons(monkeypatch):
    """The server engine samples as the colocated one does: each prompt seeded by `prompt_seed` (so one request
    per prompt), the stop tokens and `ignore_eos` sent, and finish reasons as vLLM gives them (derived from the
    tokens: TRL's client drops the server's)."""
    from engines import SamplingSettings, prompt_seed

    def answers(prompt, n, kw):  # completions that stop (a stop token, EOS), run to max_tokens, are cut short
        return [[5, 99], [5, 2], [5, 6, 7, 8], [5, 6]][:n]

    engine, stub = _server_engine(monkeypatch, answers, eos_token_ids=[2])
    prompts = [[1, 2, 3], [4, 5], [6]]
    sampling = SamplingSettings(temperature=0.7, top_p=0.9, top_k=4, max_tokens=4, seed=123, stop_token_ids=[99])
    out = engine.generate(prompts, 4, sampling)
    assert len(stub.calls) == 3  # one request per prompt, each with its own seed
    by_prompt = {tuple(c["prompts"][0]): c for c in stub.calls}
    for p in prompts:
        call = by_prompt[tuple(p)]
        assert call["prompts"] == [p] and call["n"] == 4
        assert (call["temperature"], call["top_p"], call["top_k"], call["max_tokens"]) == (0.7, 0.9, 4, 4)
        assert call["generation_kwargs"] == {"seed": prompt_seed(123, p), "stop_token_ids": [99], "ignore_eos": False}
    assert len(out) == 3
    for group in out:
        assert [c.token_ids for c in group] == [[5, 99], [5, 2], [5, 6, 7, 8], [5, 6]]
        # None: an EOS the engine was not told of, or the server's max_model_len
        assert [c.finish_reason for c in group] == ["stop", "stop", "length", None]
        assert group[2].logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4])

    stub.calls.clear()  # unseeded: one request for all prompts; ignore_eos sends no stop tokens
    out = engine.generate(prompts, 2, SamplingSettings(temperature=1.0, max_tokens=4, stop_token_ids=[99],
                                                       ignore_eos=True))
    assert len(stub.calls) == 1 and stub.calls[0]["prompts"] == prompts
    assert stub.calls[0]["generation_kwargs"] == {"stop_token_ids": [], "ignore_eos": True}
    assert [[c.finish_reason for c in g] for g in out] == [["length", "length"]] * 3


def test_vllm_server_engine_greedy_n_gives_n_copies_of_one_greedy_answer(monkeypatch):
    """vLLM refuses n > 1 at temperature 0 ("n must be 1 when using greedy sampling"); HF gives n identical
    greedy answers: the server engine asks for one and copies it."""
    from engines import SamplingSettings

    def answers(prompt, n, kw):
        if kw["temperature"] < 1e-5 and n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {n}")
        return [[prompt[0], 99]] * n

    engine, stub = _server_engine(monkeypatch, answers)
    greedy = SamplingSettings(temperature=0.0, max_tokens=8, seed=7, stop_token_ids=[99])
    out = engine.generate([[1, 2], [3]], 4, greedy)
    assert len(stub.calls) == 1 and stub.calls[0]["n"] == 1
    assert [[c.token_ids for c in g] for g in out] == [[[1, 99]] * 4, [[3, 99]] * 4]
    assert all(c.finish_reason == "stop" for g in out for c in g)
    out[0][0].token_ids.append(5)  # copies, not one list four times
    assert out[0][1].token_ids == [1, 99]


class _StubLLM:
    """`vllm.LLM.generate` without a model: each prompt's `n` outputs are the prompt's first token repeated,
    with log-probs when the params ask for them, as vLLM gives them. `params` keeps what was asked."""

    def __init__(self):
        self.params = []

    def generate(self, prompts, params, use_tqdm=False):
        from types import SimpleNamespace

        self.params.extend(params)
        outs = []
        for prompt, p in zip(prompts, params):
            ids = [prompt["prompt_token_ids"][0]] * min(p.max_tokens, 3)
            lps = None if p.logprobs is None else [{t: SimpleNamespace(logprob=-0.5)} for t in ids]
            outs.append(SimpleNamespace(outputs=[
                SimpleNamespace(index=i, token_ids=ids, logprobs=lps, finish_reason="length") for i in range(p.n)]))
        return outs


def _colocate_engine_on_a_stub(max_model_len: int):
    from engines.vllm_engine import VLLMColocateEngine

    engine = VLLMColocateEngine.__new__(VLLMColocateEngine)  # no model: the request side only
    engine.llm, engine.max_model_len, engine._warned_length_cap = _StubLLM(), max_model_len, False
    return engine


def test_vllm_colocate_engine_greedy_n_gives_n_copies_of_one_greedy_answer():
    """`SamplingParams(n=4, temperature=0)` raises in vLLM; the engine asks for one greedy completion per prompt
    and returns n independent copies, as HF's generate gives n identical greedy rows."""
    pytest.importorskip("vllm")
    from engines import SamplingSettings

    engine = _colocate_engine_on_a_stub(64)
    out = engine.generate([[5, 6], [7]], 4, SamplingSettings(temperature=0.0, max_tokens=3))
    assert [[c.token_ids for c in g] for g in out] == [[[5, 5, 5]] * 4, [[7, 7, 7]] * 4]
    assert all(c.logprobs == [-0.5] * 3 and c.finish_reason == "length" for g in out for c in g)
    out[0][0].logprobs.append(0.0)
    assert out[0][1].logprobs == [-0.5] * 3
    sampled = engine.generate([[5, 6]], 4, SamplingSettings(temperature=1.0, max_tokens=3, seed=1))
    assert len(sampled[0]) == 4


def test_vllm_colocate_engine_asks_for_no_detokenization_and_log_probs_only_when_wanted():
    """Token ids in, token ids out: vLLM's detokenizer (the text and each log-prob's token string, Python work
    per token) is off, and `logprobs=False` (evaluation) asks for none: together 12 % of a sampled
    evaluation on vLLM's CPU build (`benchmarks/RESULTS.md`, session 23)."""
    pytest.importorskip("vllm")
    from engines import SamplingSettings

    engine = _colocate_engine_on_a_stub(64)
    (with_lps,) = engine.generate([[5, 6]], 2, SamplingSettings(temperature=1.0, max_tokens=3, seed=1))
    (without,) = engine.generate([[5, 6]], 2, SamplingSettings(temperature=1.0, max_tokens=3, seed=1, logprobs=False))
    assert [p.logprobs for p in engine.llm.params] == [0, None]
    assert all(p.detokenize is False for p in engine.llm.params)
    assert [c.logprobs for c in with_lps] == [[-0.5] * 3] * 2 and [c.logprobs for c in without] == [None, None]
    assert [c.token_ids for c in without] == [c.token_ids for c in with_lps]


def test_vllm_server_engine_asks_for_log_probs_only_when_wanted(monkeypatch):
    from engines import SamplingSettings

    engine, stub = _server_engine(monkeypatch, lambda prompt, n, kw: [[5, 6]] * n)
    engine.generate([[1, 2]], 2, SamplingSettings(temperature=1.0, max_tokens=2))
    engine.generate([[1, 2]], 2, SamplingSettings(temperature=1.0, max_tokens=2, logprobs=False))
    assert [c["logprobs"] for c in stub.calls] == [0, None]


def test_vllm_colocate_engine_warns_once_when_max_model_len_caps_the_completions(caplog):
    """vLLM stops a completion at max_model_len tokens in all, silently (a 60-token prompt with max_model_len 64
    and max_tokens 20 gets 4 tokens); HF would generate 20. GRPO and evaluation run on that cap, so the engine
    warns, once, with the numbers."""
    pytest.importorskip("vllm")
    import logging

    from engines import SamplingSettings

    engine = _colocate_engine_on_a_stub(64)
    with caplog.at_level(logging.WARNING, logger="engines.vllm_engine"):
        engine.generate([list(range(1, 41))], 1, SamplingSettings(max_tokens=20))  # 40 + 20 <= 64: no warning
        assert not caplog.records
        engine.generate([list(range(1, 41)), list(range(1, 61))], 1, SamplingSettings(max_tokens=20))
        engine.generate([list(range(1, 61))], 1, SamplingSettings(max_tokens=20))
    (record,) = caplog.records
    message = record.getMessage()
    for part in ("prompt 1 has 60 tokens", "max_tokens=20", "max_model_len (64)", "after 4 tokens", "1 of 2 prompts"):
        assert part in message, message


def test_engine_kwargs_run_a_block_fp8_checkpoint_served_in_fp8_in_bfloat16(tmp_path, monkeypatch, caplog):
    """vLLM runs FP8 layers in bf16/fp16 only; only the colocated engine promoted its float32, so `make_llm` (smoke
    checks, the vLLM teacher) failed on an FP8 checkpoint with "torch.float32 is not supported for quantization
    method fp8". The promotion is in `engine_kwargs`, which every engine goes through."""
    import json
    import logging

    from engines import vllm_engine as V

    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE"):  # engine_kwargs readies the process
        monkeypatch.delenv(name, raising=False)
    fp8, plain, half = tmp_path / "fp8", tmp_path / "fp32", tmp_path / "fp8-bf16"
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    for d, config in ((fp8, {"dtype": "float32", "quantization_config": qc}), (plain, {"dtype": "float32"}),
                      (half, {"torch_dtype": "bfloat16", "quantization_config": qc})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))

    def dtype(model, **kwargs):
        return V.engine_kwargs(str(model), **kwargs)["dtype"]

    with caplog.at_level(logging.WARNING, logger="engines.vllm_engine"):
        assert dtype(fp8, dequantize_fp8=False) == "bfloat16"  # the default: float32 on CPU, the checkpoint's on GPU
        assert dtype(fp8, dequantize_fp8=False, dtype="float32") == "bfloat16"
        assert dtype(fp8, dequantize_fp8=False, dtype="auto") == "bfloat16"
    assert "engine dtype float32 -> bfloat16" in caplog.records[0].getMessage()
    assert dtype(fp8, dequantize_fp8=False, dtype="float16") == "float16"
    assert dtype(half, dequantize_fp8=False, dtype="auto") == "auto"
    assert dtype(plain, dequantize_fp8=False, dtype="float32") == "float32"
    # the dequantized view runs in any dtype
    monkeypatch.setattr(V, "_dequantized_fp8_kwargs", lambda kwargs: kwargs)
    assert dtype(fp8, dequantize_fp8="no FP8 kernel", dtype="float32") == "float32"


def test_an_fp8_checkpoint_vllm_cannot_load_in_fp8_is_served_dequantized(tmp_path, monkeypatch):
    """The tiny preset's FP8 checkpoint (experts 64 rows, q_a 96: not whole 128-row blocks) made vLLM fail deep
    in its weight loader ("output with shape [2, 1] doesn't match the broadcast shape [2, 2]") on a CPU with FP8
    kernels, in GRPO, eval and serve alike; the engines now serve it dequantized, saying why."""
    import json

    from engines import vllm_engine as V

    monkeypatch.setattr(V, "fp8_kernel_problem", lambda: None)  # as on a machine whose vLLM has FP8 kernels
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    tiny, aligned, plain = tmp_path / "tiny", tmp_path / "aligned", tmp_path / "plain"
    for d, config in ((tiny, {"moe_intermediate_size": 64, "q_lora_rank": 96, "quantization_config": qc}),
                      (aligned, {"moe_intermediate_size": 128, "q_lora_rank": 128, "quantization_config": qc}),
                      (plain, {"moe_intermediate_size": 64})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
    reason = V.fp8_fallback_reason(str(tiny))
    assert reason.startswith("its block-FP8 layers cannot load these shapes: moe_intermediate_size=64")
    assert V.fp8_fallback_reason(str(aligned)) is None and V.fp8_fallback_reason(str(plain)) is None
