"""Has the MTP drafter fallen behind the policy, or has the policy's own top-1 probability fallen?

For each checkpoint: sample 8 completions (T 0.7, at most 48 tokens) for the first 48 prompts of the demo's
GRPO part with the colocated vLLM engine, then on the completion tokens, where position i of the MTP module
guesses token i + 2:
- hit: the MTP module's top-1 guess equals the sampled token (the trainer's `mtp/accept_rate`);
- E: the policy's probability (at T) of the MTP module's guess: the acceptance a speculative decoder expects;
- C: the policy's top-1 probability: the most any drafter could get.
E/C near 1: the drafter keeps up; C falling: the policy's entropy is what lowers acceptance.

    python benchmarks/probe_mtp_drafter.py runs/tiny-arith/sft runs/tiny-arith/grpo/checkpoint-50 runs/tiny-arith/grpo
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def probe(checkpoint: str, dataset: str, prompts: int, temperature: float) -> dict[str, float]:
    import torch
    from transformers import AutoTokenizer

    from data_pipelines.loading import load_rows
    from engines.types import SamplingSettings
    from engines.vllm_engine import VLLMColocateEngine
    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    tok = AutoTokenizer.from_pretrained(checkpoint)
    rows = load_rows(dataset, "train")
    prompt_ids = [tok.apply_chat_template(rows[i]["prompt"], add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"] for i in range(prompts)]
    engine = VLLMColocateEngine(checkpoint, max_model_len=512, seed=0)
    try:
        outs = engine.generate(prompt_ids, 8, SamplingSettings(temperature=temperature, max_tokens=48, seed=7,
                                                               stop_token_ids=[tok.eos_token_id]))
    finally:
        engine.close()
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(checkpoint, dtype=torch.float32).eval()
    hit = expected = ceiling = n = 0.0
    with torch.no_grad():
        for prompt, group in zip(prompt_ids, outs):
            for completion in group:
                ids = torch.tensor([list(prompt) + list(completion.token_ids)])
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                probs = torch.softmax(model.lm_head(hidden)[0] / temperature, -1)  # row i + 1: over token i + 2
                draft = model._mtp(hidden, ids, None, None, None, detach_input=True)[0][0][0].argmax(-1)
                for i in range(len(prompt) - 1, ids.shape[1] - 2):
                    hit += float(draft[i] == ids[0, i + 2])
                    expected += probs[i + 1, draft[i]].item()
                    ceiling += probs[i + 1].max().item()
                    n += 1
    return {"hit": hit / n, "E": expected / n, "C": ceiling / n, "E/C": expected / ceiling, "positions": n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--dataset", default="builtin:arith?level=digits&max_operand=4")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    args = p.parse_args()
    for checkpoint in args.checkpoints:
        r = probe(checkpoint, args.dataset, args.prompts, args.temperature)
        print(f"{checkpoint}: hit {r['hit']:.3f}  E {r['E']:.3f}  C {r['C']:.3f}  E/C {r['E/C']:.3f}  "
              f"positions {int(r['positions'])}", flush=True)


if __name__ == "__main__":
    main()
