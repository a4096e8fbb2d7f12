"""`dsv3-posttrain serve MODEL`: vLLM's OpenAI-compatible server with the engine fixes applied.

`vllm serve` (or `python -m vllm.entrypoints.openai.api_server`) in another process would lack the
CPU build's fixes (engines.compat): its rotary op makes MLA's log-probs wrong. Here the server runs
in this process with the engine arguments of `engines.vllm_engine.engine_kwargs` (the same as for
`make_llm`: fp32 + CPU_MLA + eager + a small KV cache on CPU, the dequantized view of an FP8
checkpoint where vLLM has no FP8 kernel), whose worker class (`engines.vllm_worker`) applies the
fixes in the engine-core process vLLM's server spawns.

What it speaks:
- the OpenAI API (`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`): the `openai`
  distillation teacher's endpoint (`api_base: http://HOST:PORT/v1`, `model_name_or_path`: the served
  name, by default MODEL as given), evaluation scripts, anything OpenAI-compatible;
- with `trl=True`, also TRL's `trl vllm-serve` protocol (TRL 1.16 runs vLLM's own server with these
  options): sampled-token log-probs after temperature (`processed_logprobs`), the dev-mode weight
  update endpoints, and on CUDA the NCCL weight-transfer engine -- GRPO's `vllm_mode: server`.
  Weight sync over NCCL needs CUDA: on CPU the server generates for TRL's client but cannot take
  weights, so CPU GRPO runs `vllm_mode: colocate`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from . import compat
from .vllm_engine import engine_kwargs, on_cpu

CPU_MAX_MODEL_LEN = 4096  # context on CPU unless asked: the KV cache is small (VLLM_CPU_KVCACHE_SPACE)


def _cli_options(kwargs: dict[str, Any]) -> list[str]:
    """`vllm.LLM` keyword arguments as vLLM server options (`attention_config={...}` -> `--attention-config '{...}'`)."""
    argv: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is None or value is False:
            continue
        elif isinstance(value, (dict, list)):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def _default_max_model_len(model: str) -> int | None:
    """On CPU the model's context capped at CPU_MAX_MODEL_LEN; on GPU None (vLLM's own choice)."""
    if not on_cpu():
        return None
    config = os.path.join(model, "config.json")
    limit = CPU_MAX_MODEL_LEN
    if os.path.isfile(config):
        with open(config) as f:
            limit = min(limit, int(json.load(f).get("max_position_embeddings") or limit))
    return limit


def server_options(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str | None = None,
    max_model_len: int | None = None,
    seed: int = 0,
    served_model_name: str | None = None,
    trl: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    """vLLM server options for `model`: the engine arguments of `engine_kwargs` (this process is readied
    for them), then TRL's options with `trl`, then `extra` (the user's own vLLM options win)."""
    max_model_len = max_model_len or _default_max_model_len(model)
    kwargs = engine_kwargs(model, dtype=dtype, seed=seed, **({"max_model_len": max_model_len} if max_model_len else {}))
    if not max_model_len:
        kwargs.pop("max_model_len", None)
    argv = _cli_options(kwargs) + ["--host", host, "--port", str(port)]
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    if trl:
        # what `trl vllm-serve` (TRL 1.16) adds to vLLM's server: see its `build_command`
        argv += ["--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1", "--enable-scale-out"]
        if not on_cpu():
            argv += ["--weight-transfer-config", json.dumps({"backend": "nccl"})]
    return argv + list(extra)


def serve(model: str, **options: Any) -> None:
    """Runs vLLM's OpenAI-compatible server on `model` until it is stopped (SIGINT / SIGTERM).
    `options` as for `server_options`."""
    argv = server_options(model, **options)
    if options.get("trl"):
        compat.enable_vllm_dev_endpoints()
    import uvloop
    from vllm.entrypoints.launchers.api_server.entry import run_server
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser(prog="dsv3-posttrain serve")).parse_args(argv)
    validate_parsed_serve_args(args)
    uvloop.run(run_server(args))


__all__ = ["CPU_MAX_MODEL_LEN", "serve", "server_options"]
