"""The install check behind `make demo` until the recipe chain exists: init the tiny model, run a
forward and backward pass in transformers, and generate with vLLM (CPU build)."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def run_smoke(output_dir: str | Path = "runs/smoke", use_vllm: bool = True) -> dict:
    from transformers import AutoTokenizer

    from .model_init import count_parameters, init_model
    from .modeling import DeepseekV3ForCausalLMWithMTP

    print("NOTE: the recipe chain (distill -> SFT -> GRPO -> eval) is not built yet; this demo runs what exists:\n"
          "      tiny model init, a transformers forward/backward pass, and a vLLM generation.")
    t0 = time.time()
    out = init_model("tiny", output_dir)
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    counts = count_parameters(model)
    print(f"[init]    {out}: {counts['total']:,} parameters ({counts['mtp']:,} in the MTP module), {time.time() - t0:.1f}s")

    msgs = [{"role": "user", "content": "Mia has 23 marbles. She buys 15 more. How many marbles does she have now?"},
            {"role": "assistant", "content": "<think>\n23 + 15 = 38\n</think>\nThe answer is \\boxed{38}."}]
    ids = torch.tensor([tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]])
    model.train()
    res = model(input_ids=ids, labels=ids, use_cache=False)
    (res.loss + 0.3 * res.mtp_loss).backward()
    grads = sum(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    print(f"[forward] loss {res.loss.item():.3f} (ln V = {torch.log(torch.tensor(float(len(tok)))).item():.3f}), "
          f"mtp_loss {res.mtp_loss.item():.3f}; {grads} parameter tensors received gradients")
    result = {"loss": res.loss.item(), "mtp_loss": res.mtp_loss.item()}
    if use_vllm:
        from vllm import SamplingParams

        from engines.vllm_engine import make_llm

        t0 = time.time()
        llm = make_llm(str(out), max_model_len=256)
        prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        outs = llm.generate([prompt] * 4, SamplingParams(n=2, max_tokens=24, temperature=1.0, seed=0), use_tqdm=False)
        n = sum(len(o.outputs) for o in outs)
        print(f"[vllm]    {n} completions generated in {time.time() - t0:.1f}s (engine start included); "
              f"first (random weights, so random text): {outs[0].outputs[0].text[:60]!r}")
        result["vllm_completions"] = n
    return result
