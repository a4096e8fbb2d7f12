"""Generation engines, on the ground floor: every other package may import this one, and it imports
none of them (`posttrain`, `rewards`, `data_pipelines`, `eval_hooks`).

- `engines.types`: `SamplingSettings`, `Completion`, `prompt_seed`, the `RolloutEngine` interface --
  one set of types for the distillation teachers, GRPO rollouts, the generative judge and evaluation;
- `engines.vllm_engine`: the only place a `vllm.LLM` is built (`make_llm`), chat generation, the
  colocated and server rollout engines, the dequantized view of FP8 checkpoints;
- `engines.vllm_worker`: the worker classes vLLM builds in whichever process runs the model, which
  apply the CPU fixes there;
- `engines.hf`: transformers `generate` behind the same interface;
- `engines.capabilities`: what the installed vLLM can run on this machine;
- `engines.compat`: every contact point with another library's internals, and every patch;
- `engines.serve`: `dsv3-posttrain serve`, vLLM's OpenAI-compatible server with the fixes applied.

Heavy dependencies (vLLM, transformers) are imported by the modules that need them, not here.
"""

from .types import Completion, Messages, RolloutEngine, SamplingSettings, prompt_seed

__all__ = ["Completion", "Messages", "RolloutEngine", "SamplingSettings", "prompt_seed"]
