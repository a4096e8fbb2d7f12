"""The bf16 -> fp8 converter's output loads in vLLM (CPU build, block-FP8 kernels) with no hand edits."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

modeling = pytest.importorskip("posttrain.modeling")
presets = pytest.importorskip("posttrain.presets")
pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")

from posttrain.fp8.convert import convert_bf16_to_fp8, convert_fp8_to_bf16  # noqa: E402

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

    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
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
