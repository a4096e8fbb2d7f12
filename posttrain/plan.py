"""`dsv3-posttrain plan`: per-GPU memory and step time of a V3-architecture model on a cluster.

Everything is computed from the model config (a preset or a checkpoint's config.json); nothing is
built or allocated. The numbers are estimates under the assumptions below, each stated where it is
used. References are to the DeepSeek-V3 technical report (arXiv 2412.19437) unless said otherwise.

Parameters (`tensor_inventory`, `parameter_counts`)
    Every weight tensor is listed under its DeepSeek checkpoint name with its shape, so the FP8
    tensors are exactly those `posttrain.fp8.layout.is_fp8_weight_name` names (§3.3: the Linear
    weights of attention, dense MLP, shared and routed experts -- the MTP block included; the
    embedding, output head, norms, router and the MTP `eh_proj` stay bf16). *Activated* parameters
    are all main-model parameters minus the routed experts a token does not pick
    (n_routed - top_k per MoE layer), as `model_init.count_parameters` counts them. The MTP module
    (§2.2) shares the embedding and output head with the main model, so its trained parameters
    exclude them; the released checkpoint stores copies of both in the MTP layer, which is how the
    model card reaches "685B = 671B main + 14B MTP". The router's fp32 `e_score_correction_bias` is a
    buffer (updated by the balancing rule, not by the optimizer) and is left out.

Parallel layout (`Parallel`, `state_memory`)
    world = dp x tp x pp. Pipeline stage s holds decoder layers i with i * pp // L == s; the
    embedding is on stage 0; the final norm, output head and MTP module(s) on the last stage.
    Non-expert tensors are split tp ways (Megatron TP, vocab-parallel embedding/head; norms counted
    as split too, a negligible error). Routed experts are split ep ways (n_routed / ep experts per
    GPU, no TP inside an expert); ep divides dp x tp, so each expert shard is replicated
    edp = dp x tp / ep times (the expert data-parallel degree).
    ZeRO over the data-parallel replicas -- dp for non-expert tensors, edp for experts:
      stage >= 1 shards master weights and AdamW moments, stage >= 2 also gradients, stage 3 (=FSDP)
      also the weights, so per GPU each sharded state = (stage-local bytes) / (dp or edp).
      ZeRO-3 adds a gather buffer of the two largest unsharded layers (prefetch), shown apart.
    DeepSeek-V3's own run (§3.2): 2048 H800s, 16-way PP (DualPipe), 64-way EP over 8 nodes,
    ZeRO-1 DP, no TP -- recipes/clusters/h800-2048.yaml. DualPipe keeps two copies of the
    parameters (§3.2.1); that is not modeled (we assume 1F1B).

Precision (`Precision`, report §3.3)
    weights: "fp8" = FP8 Linears (1 byte + one fp32 scale per 128x128 block), the rest bf16;
    "bf16"/"fp32" = everything in that type. master: fp32 copy (4 bytes) or none. grads: bf16 or
    fp32. moments: AdamW m and v, 2 tensors x (4 or 2) bytes. The report's recipe is the default:
    FP8 weights, fp32 master weights and gradients, bf16 moments (§3.3.3).

Activations (`layer_activation_bytes`, `activation_memory`) -- bytes per token, bf16 (2 bytes)
    unless noted, the tensors autograd keeps for backward; flash attention (no s x s scores kept).
    Symbols: h hidden, r_q q_lora_rank, r_kv kv_lora_rank, d_r qk_rope_head_dim, d_qk =
    qk_nope + qk_rope head dim, d_v v_head_dim, n_h heads, E routed experts, k top-k, I_e expert
    width, I_s = n_shared x I_e, I dense MLP width, V vocabulary.
      MLA (§2.1.1):  2 [2h (norm in/out) + 2 r_q (q_a out, q norm out) + (r_kv + d_r) (kv_a out)
                     + r_kv (kv norm out) + n_h (2 d_qk + d_v) (Q, K, V) + n_h d_v (attn out)]
                     + 4 n_h (fp32 softmax log-sum-exp)
      MoE (§2.1.2):  2 [2h (norm in/out) + k (2h + 3 I_e) (per routed copy: dispatched input,
                     gate & up outputs, SwiGLU product, expert output) + 3 I_s (shared expert)]
                     + 4 (E + k) (fp32 router scores and gate weights)
      dense MLP:     2 [2h + 3 I]
      MTP module:    one MoE layer + 2 x 4h (enorm/hnorm inputs, the 2h concatenation)
      logits:        6 V per output head (bf16 logits + fp32 copy for the cross-entropy), main + MTP
    Tokens per micro-batch = micro_batch x seq_len; everything / tp (sequence parallelism). With
    expert parallelism the routed-expert term holds on average under balanced routing.
    recompute "none": every layer keeps the above. "full": a layer keeps only its input (2h) and
    one layer at a time is rematerialised during backward (+ the largest layer's full bytes once).
    Pipeline (1F1B): stage s has min(pp - s, n_micro) micro-batches in flight; MTP activations and
    logits live on the last stage (one micro-batch). Not modeled: DeepSeek's selective
    recomputation and FP8 activation caching (§3.2.3, §3.3.2), communication buffers, the CUDA
    context, allocator fragmentation -- keep headroom.

Rollout KV cache (`kv_cache`, §2.1.1; DeepSeek-V2 paper §2.1.4)
    MLA caches only the compressed latent c_KV and the shared RoPE key: (r_kv + d_r) elements per
    token per layer -- (512 + 64) x 61 x 2 bytes = 70,272 bytes per token for V3 in bf16 -- against
    2 n_h d_h per layer for multi-head attention (d_h = qk_nope_head_dim): 2 x 128 x 128 x 61 x 2 =
    3,997,696 bytes. (r_kv + d_r) / (2 d_h) = 2.25: MLA caches as much as GQA with 2.25 groups.
    The latent has no heads, so tensor parallelism cannot split it (every TP rank holds it);
    sequences spread over `kv_dp` data-parallel attention ranks.

Step time (`flops_per_token`, `step_time`)
    Training FLOPs per token = 6 x (activated matmul parameters: all 2-D weights but the embedding
    lookup, routed experts x k/E) + 3 x forward attention FLOPs, where one layer's forward attention
    is 2 n_h (d_qk + d_v) FLOPs per query-key pair times (s + 1) / 2 keys on average (causal,
    full-length sequences; packed short samples do less). The MTP module adds 6 x (its activated
    matmul parameters + the shared output head) + its attention (§2.2: MTP was on in pre-training).
    step time = global_batch x seq_len x FLOPs/token / (GPUs x peak x MFU); the MFU is an input
    and is relative to the bf16 dense peak unless `mfu_basis` says fp8.
    Check against §1 / Table 1: 2664K H800 GPU hours for 14.8T pre-training tokens = 180K GPU hours
    per trillion tokens (3.7 days on 2048 GPUs); with this FLOP count that implies an MFU of about
    40% of the H800's 989.5 bf16 TFLOPs (20% of its FP8 peak) -- see `implied_mfu` and the tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import UserError
from .recipe import build_config, read_recipe

GIB = 2**30
CLUSTERS_DIR = Path(__file__).resolve().parents[1] / "recipes" / "clusters"
FP8_BLOCK = 128  # weight scales: one fp32 per 128 x 128 block (§3.3.2)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}
DEFAULT_TINY_VOCAB = 1024  # `init-model --vocab_size` default, for presets that leave vocab_size to the tokenizer


# ------------------------------------------------------------------------------------------ model
@dataclass(frozen=True)
class ModelShape:
    """The config fields the planner reads (DeepseekV3Config / config.json names)."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    n_shared_experts: int = 0
    num_nextn_predict_layers: int = 0
    tie_word_embeddings: bool = False

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @classmethod
    def from_config(cls, cfg: dict[str, Any], name: str) -> ModelShape:
        values: dict[str, Any] = {"name": name}
        for f in dataclasses.fields(cls):
            if f.name == "name":
                continue
            value = cfg.get(f.name)
            if value is None and f.default is dataclasses.MISSING:
                raise UserError(f"model config {name}: missing field '{f.name}'")
            values[f.name] = f.default if value is None else value
        return cls(**values)


def load_model_shape(source: str) -> ModelShape:
    """`source` is a preset name (tiny, small, deepseek-v3), a checkpoint directory or a config.json."""
    from .presets import PRESETS

    if source in PRESETS:  # tiny/small take their vocabulary from the tokenizer: init-model's default 1024
        return ModelShape.from_config({"vocab_size": DEFAULT_TINY_VOCAB, **PRESETS[source]}, source)
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(
            f"--model: {source!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
            "nor a checkpoint directory / config.json"
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--model: {path} is not valid JSON: {e}") from None
    return ModelShape.from_config(cfg, str(source))


@dataclass(frozen=True)
class Tensor:
    """One weight tensor, by DeepSeek checkpoint name ("{e}" = expert index; `copies` of them)."""

    name: str
    shape: tuple[int, ...]
    layer: int | None = None  # decoder layer index; None for embedding, final norm, head
    mtp: bool = False
    copies: int = 1

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.copies

    @property
    def expert(self) -> bool:
        return ".experts.{e}." in self.name

    @property
    def fp8(self) -> bool:
        from .fp8.layout import is_fp8_weight_name

        return is_fp8_weight_name(self.name.replace("{e}", "0"))

    @property
    def matmul(self) -> bool:
        """A 2-D weight used in a matrix multiply (the embedding is a lookup)."""
        return len(self.shape) == 2 and "embed_tokens" not in self.name

    @property
    def fp8_scale_count(self) -> int:
        rows, cols = self.shape
        return math.ceil(rows / FP8_BLOCK) * math.ceil(cols / FP8_BLOCK) * self.copies


def tensor_inventory(m: ModelShape) -> list[Tensor]:
    """Every parameter of the model (main layers, then MTP layers at index L + k, as in the checkpoint)."""
    h, n_h, L = m.hidden_size, m.num_attention_heads, m.num_hidden_layers
    out = [Tensor("model.embed_tokens.weight", (m.vocab_size, h))]
    for i in range(L + m.num_nextn_predict_layers):
        p, mtp = f"model.layers.{i}", i >= L

        def t(suffix: str, *shape: int, copies: int = 1) -> Tensor:
            return Tensor(f"{p}.{suffix}", shape, layer=i, mtp=mtp, copies=copies)

        if mtp:
            out += [t("enorm.weight", h), t("hnorm.weight", h), t("eh_proj.weight", h, 2 * h),
                    t("shared_head.norm.weight", h)]
        out += [t("input_layernorm.weight", h), t("post_attention_layernorm.weight", h)]
        if m.q_lora_rank:
            out += [t("self_attn.q_a_proj.weight", m.q_lora_rank, h),
                    t("self_attn.q_a_layernorm.weight", m.q_lora_rank),
                    t("self_attn.q_b_proj.weight", n_h * m.qk_head_dim, m.q_lora_rank)]
        else:
            out.append(t("self_attn.q_proj.weight", n_h * m.qk_head_dim, h))
        out += [t("self_attn.kv_a_proj_with_mqa.weight", m.kv_lora_rank + m.qk_rope_head_dim, h),
                t("self_attn.kv_a_layernorm.weight", m.kv_lora_rank),
                t("self_attn.kv_b_proj.weight", n_h * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank),
                t("self_attn.o_proj.weight", h, n_h * m.v_head_dim)]
        if i < m.first_k_dense_replace:
            out += [t(f"mlp.{w}_proj.weight", *s) for w, s in _swiglu(h, m.intermediate_size)]
        else:
            out.append(t("mlp.gate.weight", m.n_routed_experts, h))
            if m.n_shared_experts:
                out += [t(f"mlp.shared_experts.{w}_proj.weight", *s)
                        for w, s in _swiglu(h, m.n_shared_experts * m.moe_intermediate_size)]
            out += [t(f"mlp.experts.{{e}}.{w}_proj.weight", *s, copies=m.n_routed_experts)
                    for w, s in _swiglu(h, m.moe_intermediate_size)]
    out.append(Tensor("model.norm.weight", (h,)))
    if not m.tie_word_embeddings:
        out.append(Tensor("lm_head.weight", (m.vocab_size, h)))
    return out


def _swiglu(h: int, width: int) -> list[tuple[str, tuple[int, int]]]:
    return [("gate", (width, h)), ("up", (width, h)), ("down", (h, width))]


def parameter_counts(m: ModelShape) -> dict[str, int]:
    """total / main / mtp / activated as `model_init.count_parameters`, plus the split the planner uses.

    activated = main - routed experts not chosen (their share (E - k) / E of the main model's routed
    experts). mtp_released adds the embedding and head copies the released checkpoint stores.
    matmul_activated(_mtp) are the FLOP-bearing parameters (see `flops_per_token`).
    """
    inv = tensor_inventory(m)
    E, k = m.n_routed_experts, m.num_experts_per_tok

    def total(pred) -> int:
        return sum(t.numel for t in inv if pred(t))

    def activated(pred) -> int:  # routed experts count k / E of their parameters
        return total(lambda t: pred(t) and not t.expert) + total(lambda t: pred(t) and t.expert) // E * k

    embed = total(lambda t: "embed_tokens" in t.name)
    head = total(lambda t: t.name == "lm_head.weight") or embed
    counts = {
        "total": total(lambda t: True),
        "main": total(lambda t: not t.mtp),
        "mtp": total(lambda t: t.mtp),
        "activated": activated(lambda t: not t.mtp),
        "routed_experts": total(lambda t: t.expert),
        "fp8_linear": total(lambda t: t.fp8),
        "embedding": embed,
        "matmul_activated": activated(lambda t: not t.mtp and t.matmul),
        "matmul_activated_mtp": activated(lambda t: t.mtp and t.matmul) + (head if m.num_nextn_predict_layers else 0),
    }
    counts["mtp_released"] = counts["mtp"] + m.num_nextn_predict_layers * (embed + head)
    return counts


# -------------------------------------------------------------------------------- cluster + run
@dataclass(frozen=True)
class Cluster:
    """The machines. Peaks are dense (no sparsity) tensor-core TFLOPs per GPU."""

    name: str = "custom"
    gpu: str = "H100/H800 SXM (default peaks)"
    nodes: int = 1
    gpus_per_node: int = 8
    memory_gib: float = 80.0
    peak_tflops_bf16: float = 989.5
    peak_tflops_fp8: float = 1979.0

    def __post_init__(self) -> None:
        _positive(self, "nodes", "gpus_per_node", "memory_gib", "peak_tflops_bf16", "peak_tflops_fp8")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Parallel:
    """The layout: world = dp x tp x pp; ep (expert parallel) divides dp x tp. dp=None: world / (tp x pp)."""

    dp: int | None = None
    tp: int = 1
    ep: int = 1
    pp: int = 1
    zero_stage: Literal[0, 1, 2, 3] = 3

    def __post_init__(self) -> None:
        _positive(self, "tp", "ep", "pp", *(["dp"] if self.dp is not None else []))

    @property
    def edp(self) -> int:
        """Expert data-parallel degree: replicas of each expert shard."""
        return self.dp * self.tp // self.ep


@dataclass(frozen=True)
class Precision:
    """Storage types of the training state (report §3.3 defaults)."""

    weights: Literal["fp8", "bf16", "fp32"] = "fp8"
    master: Literal["fp32", "none"] = "fp32"
    grads: Literal["fp32", "bf16"] = "fp32"
    moments: Literal["fp32", "bf16"] = "bf16"

    def __post_init__(self) -> None:
        if self.weights != "fp32" and self.master == "none":
            raise UserError(f"precision.master: {self.weights} weights need fp32 master weights (master: fp32)")


@dataclass(frozen=True)
class Workload:
    """One training step and one rollout batch. global_batch is in sequences (None: dp x micro_batch x pp)."""

    seq_len: int = 4096
    micro_batch: int = 1
    global_batch: int | None = None
    recompute: Literal["none", "full"] = "full"
    mfu: float = 0.40
    mfu_basis: Literal["bf16", "fp8"] = "bf16"
    include_mtp: bool = True
    tokens: float | None = None
    kv_seqs: int = 64
    kv_context: int = 32768
    kv_dtype: Literal["bf16", "fp8"] = "bf16"
    kv_dp: int = 1

    def __post_init__(self) -> None:
        _positive(self, "seq_len", "micro_batch", "kv_seqs", "kv_context", "kv_dp",
                  *(["global_batch"] if self.global_batch is not None else []),
                  *(["tokens"] if self.tokens is not None else []))
        if not 0 < self.mfu <= 1:
            raise UserError(f"workload.mfu: expected a fraction in (0, 1], got {self.mfu}")


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        if not getattr(obj, n) > 0:
            raise UserError(f"{type(obj).__name__.lower()}.{n}: must be > 0, got {getattr(obj, n)}")


SECTIONS: dict[str, type] = {"parallel": Parallel, "precision": Precision, "workload": Workload}


def resolve_cluster_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a file in recipes/clusters/ (with or without .yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for candidate in (CLUSTERS_DIR / name_or_path, CLUSTERS_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(q.stem for q in CLUSTERS_DIR.glob("*.yaml"))
    raise UserError(f"--cluster: no file {name_or_path!r} (and not one of recipes/clusters: {', '.join(known)})")


def load_setup(
    cluster_file: str | None = None, overrides: dict[str, dict[str, Any]] | None = None
) -> tuple[Cluster, Parallel, Precision, Workload]:
    """Reads a cluster YAML (top level: Cluster fields; sections parallel/precision/workload) and
    applies `overrides` ({"cluster"|section: {field: value}}, e.g. from flags). Checks the layout."""
    data: dict[str, Any] = {}
    source = "defaults"
    if cluster_file:
        path = resolve_cluster_path(cluster_file)
        data, source = read_recipe(path), str(path)
    overrides = overrides or {}
    sections = {s: data.pop(s, None) or {} for s in SECTIONS}
    for s, v in sections.items():
        if not isinstance(v, dict):
            raise UserError(f"{source}: '{s}' must be a mapping of fields, got {v!r}")
    def where(section: str) -> str:
        src = f"{source} + flags" if overrides.get(section) else source
        return src if section == "cluster" else f"{src} [{section}]"

    cluster = build_config(Cluster, {**data, **overrides.get("cluster", {})}, where("cluster"))
    built = {s: build_config(cls, {**sections[s], **overrides.get(s, {})}, where(s))
             for s, cls in SECTIONS.items()}
    return cluster, built["parallel"], built["precision"], built["workload"]


def check_layout(m: ModelShape, c: Cluster, par: Parallel, wl: Workload) -> tuple[Parallel, int]:
    """Fills dp, checks the layout against the cluster and model; returns (layout, micro-batches per step)."""
    if c.world % (par.tp * par.pp):
        raise UserError(
            f"parallel.tp, parallel.pp: tp x pp = {par.tp * par.pp} does not divide the {c.world} GPUs")
    par = dataclasses.replace(par, dp=par.dp or c.world // (par.tp * par.pp))
    if par.dp * par.tp * par.pp != c.world:
        raise UserError(f"parallel.dp: dp x tp x pp = {par.dp}x{par.tp}x{par.pp} = {par.dp * par.tp * par.pp}, "
                        f"but the cluster has {c.nodes} x {c.gpus_per_node} = {c.world} GPUs")
    if (par.dp * par.tp) % par.ep or m.n_routed_experts % par.ep:
        raise UserError(f"parallel.ep: {par.ep} must divide dp x tp = {par.dp * par.tp} "
                        f"and the {m.n_routed_experts} routed experts")
    if m.num_attention_heads % par.tp:
        raise UserError(f"parallel.tp: {par.tp} does not divide the {m.num_attention_heads} attention heads")
    if par.pp > m.num_hidden_layers:
        raise UserError(f"parallel.pp: {par.pp} stages for {m.num_hidden_layers} layers")
    gb = wl.global_batch or par.dp * wl.micro_batch * par.pp
    if gb % (par.dp * wl.micro_batch):
        raise UserError(
            f"workload.global_batch: {gb} is not a multiple of dp x micro_batch = {par.dp * wl.micro_batch}")
    return par, gb // (par.dp * wl.micro_batch)


# ----------------------------------------------------------------------------------- memory
def stage_of(t: Tensor, m: ModelShape, pp: int) -> int:
    """Pipeline stage of a tensor: layer i on stage i * pp // L; embedding first; head, norm, MTP last."""
    if t.layer is None:
        return 0 if "embed_tokens" in t.name else pp - 1
    return pp - 1 if t.mtp else t.layer * pp // m.num_hidden_layers


def weight_bytes(t: Tensor, weights: str) -> float:
    """Bytes of one stored copy of `t`: FP8 Linears 1 byte + fp32 block scales, other tensors bf16."""
    if weights == "fp8":
        return t.numel + 4 * t.fp8_scale_count if t.fp8 else 2 * t.numel
    return DTYPE_BYTES[weights] * t.numel


def state_memory(m: ModelShape, par: Parallel, prec: Precision) -> list[dict[str, float]]:
    """Per stage, bytes per GPU of weights, master weights, gradients, AdamW moments (see module doc)."""
    stages = [dict(weights=0.0, master=0.0, grads=0.0, moments=0.0, zero3_gather=0.0) for _ in range(par.pp)]
    unsharded: list[dict[int | None, float]] = [{} for _ in range(par.pp)]  # per stage: layer -> weight bytes
    z = par.zero_stage
    for t in tensor_inventory(m):
        st = stage_of(t, m, par.pp)
        s = stages[st]
        split, replicas = (par.ep, par.edp) if t.expert else (par.tp, par.dp)
        n, w = t.numel / split, weight_bytes(t, prec.weights) / split
        s["weights"] += w / (replicas if z >= 3 else 1)
        s["grads"] += n * DTYPE_BYTES[prec.grads] / (replicas if z >= 2 else 1)
        s["master"] += (n * 4 if prec.master == "fp32" else 0) / (replicas if z >= 1 else 1)
        s["moments"] += n * 2 * DTYPE_BYTES[prec.moments] / (replicas if z >= 1 else 1)
        unsharded[st][t.layer] = unsharded[st].get(t.layer, 0.0) + w
    if z >= 3:  # the current layer and the prefetched next one are gathered at once
        for s, layers in zip(stages, unsharded):
            s["zero3_gather"] = sum(sorted(layers.values(), reverse=True)[:2])
    return stages


def layer_activation_bytes(m: ModelShape, moe: bool) -> float:
    """Bytes per token one decoder layer keeps for backward without recomputation (module doc)."""
    h, n_h = m.hidden_size, m.num_attention_heads
    r_q = m.q_lora_rank or 0
    mla = 2 * (2 * h + 2 * r_q + (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
               + n_h * (2 * m.qk_head_dim + m.v_head_dim) + n_h * m.v_head_dim) + 4 * n_h
    if not moe:
        return mla + 2 * (2 * h + 3 * m.intermediate_size)
    k, I_e = m.num_experts_per_tok, m.moe_intermediate_size
    I_s = m.n_shared_experts * I_e
    return mla + 2 * (2 * h + k * (2 * h + 3 * I_e) + 3 * I_s) + 4 * (m.n_routed_experts + k)


def activation_memory(m: ModelShape, par: Parallel, wl: Workload, n_micro: int) -> list[dict[str, float]]:
    """Per stage, bytes per GPU: decoder-layer activations (x micro-batches in flight), MTP, logits."""
    tokens = wl.micro_batch * wl.seq_len
    L, h = m.num_hidden_layers, m.hidden_size
    per_layer = [layer_activation_bytes(m, moe=i >= m.first_k_dense_replace) for i in range(L)]
    mtp_full = m.num_nextn_predict_layers * (layer_activation_bytes(m, moe=True) + 2 * 4 * h)
    out = []
    for s in range(par.pp):
        layers = [b for i, b in enumerate(per_layer) if i * par.pp // L == s]
        last = s == par.pp - 1
        in_flight = min(par.pp - s, n_micro)
        if wl.recompute == "none":
            acts, mtp = in_flight * tokens * sum(layers), tokens * mtp_full if last else 0.0
        else:  # layer inputs only, plus one layer rematerialised at a time
            biggest = max(layers + ([layer_activation_bytes(m, moe=True)] if last and mtp_full else []))
            acts = in_flight * tokens * len(layers) * 2 * h + tokens * biggest
            mtp = tokens * m.num_nextn_predict_layers * 2 * 2 * h if last else 0.0
        logits = tokens * 6 * m.vocab_size * (1 + m.num_nextn_predict_layers) if last else 0.0
        out.append(dict(activations=acts / par.tp, mtp_activations=mtp / par.tp, logits=logits / par.tp,
                        in_flight=in_flight, layers=len(layers)))
    return out


def kv_cache(m: ModelShape, wl: Workload, include_mtp: bool = False) -> dict[str, float]:
    """Rollout KV cache: MLA latent per token vs full multi-head K and V (module doc)."""
    layers = m.num_hidden_layers + (m.num_nextn_predict_layers if include_mtp else 0)
    b = DTYPE_BYTES[wl.kv_dtype]
    latent = m.kv_lora_rank + m.qk_rope_head_dim
    per_token = latent * layers * b
    mha_per_token = 2 * m.num_attention_heads * m.qk_nope_head_dim * layers * b
    total = wl.kv_seqs * wl.kv_context * per_token
    return dict(latent_elements=latent, layers=layers, bytes_per_elem=b, per_token=per_token,
                mha_per_token=mha_per_token, mha_ratio=mha_per_token / per_token,
                gqa_groups=latent / (2 * m.qk_nope_head_dim), total=total, per_gpu=total / wl.kv_dp,
                mha_per_gpu=wl.kv_seqs * wl.kv_context * mha_per_token / wl.kv_dp)


# ------------------------------------------------------------------------------------- time
def attention_flops_fwd(m: ModelShape, seq_len: int) -> float:
    """Forward attention FLOPs per token per layer: 2 n_h (d_qk + d_v) x (s + 1) / 2 keys (causal)."""
    return 2 * m.num_attention_heads * (m.qk_head_dim + m.v_head_dim) * (seq_len + 1) / 2


def flops_per_token(m: ModelShape, seq_len: int, include_mtp: bool = True) -> dict[str, float]:
    """Training FLOPs per token: 6 x activated matmul params + 3 x forward attention (module doc)."""
    c = parameter_counts(m)
    attn = attention_flops_fwd(m, seq_len)
    out = dict(dense=6.0 * c["matmul_activated"], attention=3.0 * m.num_hidden_layers * attn, mtp=0.0)
    if include_mtp:
        out["mtp"] = 6.0 * c["matmul_activated_mtp"] + 3.0 * m.num_nextn_predict_layers * attn
    out["total"] = out["dense"] + out["attention"] + out["mtp"]
    return out


def peak_flops(c: Cluster, basis: str) -> float:
    return 1e12 * (c.peak_tflops_bf16 if basis == "bf16" else c.peak_tflops_fp8)


def step_time(flops_tok: float, tokens_per_step: float, c: Cluster, mfu: float, basis: str) -> dict[str, float]:
    """Seconds per step = tokens x FLOPs/token / (GPUs x peak x MFU); GPU hours and days per 1T tokens."""
    per_gpu_rate = peak_flops(c, basis) * mfu
    gpu_hours_per_t = 1e12 * flops_tok / per_gpu_rate / 3600
    return dict(step_s=tokens_per_step * flops_tok / (c.world * per_gpu_rate),
                gpu_hours_per_trillion=gpu_hours_per_t, days_per_trillion=gpu_hours_per_t / c.world / 24)


def implied_mfu(flops_tok: float, tokens: float, gpu_hours: float, peak_tflops: float) -> float:
    """The MFU a run must have had: tokens x FLOPs/token / (GPU hours x 3600 x peak)."""
    return tokens * flops_tok / (gpu_hours * 3600 * peak_tflops * 1e12)


# ------------------------------------------------------------------------------------- plan
def make_plan(m: ModelShape, c: Cluster, par: Parallel, prec: Precision, wl: Workload) -> dict[str, Any]:
    """Everything the command prints, as plain data (bytes, counts, seconds)."""
    par, n_micro = check_layout(m, c, par, wl)
    states, acts = state_memory(m, par, prec), activation_memory(m, par, wl, n_micro)
    stages = []
    for i in sorted({0, par.pp - 1}):
        row = {**states[i], **acts[i], "stage": i}
        row["total"] = sum(row[k] for k in MEMORY_ROWS)
        row["fits"] = row["total"] <= c.memory_gib * GIB
        stages.append(row)
    global_batch = n_micro * par.dp * wl.micro_batch
    tokens_per_step = global_batch * wl.seq_len
    flops = flops_per_token(m, wl.seq_len, wl.include_mtp)
    time = step_time(flops["total"], tokens_per_step, c, wl.mfu, wl.mfu_basis)
    if wl.tokens:
        time["tokens"] = wl.tokens
        time["gpu_hours"] = time["gpu_hours_per_trillion"] * wl.tokens / 1e12
        time["days"] = time["gpu_hours"] / c.world / 24
    other = "fp8" if wl.mfu_basis == "bf16" else "bf16"
    time["mfu_other_basis"] = {other: wl.mfu * peak_flops(c, wl.mfu_basis) / peak_flops(c, other)}
    return dict(
        model=m.name, parameters=parameter_counts(m),
        cluster=dataclasses.asdict(c), world=c.world, parallel=dataclasses.asdict(par),
        precision=dataclasses.asdict(prec), workload=dataclasses.asdict(wl),
        micro_batches_per_step=n_micro, global_batch=global_batch, tokens_per_step=tokens_per_step,
        memory_stages=stages, kv_cache=kv_cache(m, wl), flops_per_token=flops, time=time,
    )


FP8_NOTE = " (FP8 Linears + 128x128 fp32 scales; embedding, head, norms, router, eh_proj bf16)"
MEMORY_ROWS = ("weights", "zero3_gather", "master", "grads", "moments", "activations", "mtp_activations", "logits")


def _si(x: float, unit: str = "") -> str:
    """1.23e10 -> '12.30 G' (T, G, M, K)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:,.2f} {prefix}{unit}"
    return f"{x:,.0f} {unit}".rstrip()


def _mem(x: float) -> str:
    """Bytes as GiB, or MiB below 1 GiB."""
    return f"{x / GIB:,.2f} GiB" if x >= GIB or x == 0 else f"{x / 2**20:,.2f} MiB"


def _seconds(x: float) -> str:
    return f"{x:,.2f} s" if x >= 1 else f"{x * 1e3:,.2f} ms"


def format_plan(p: dict[str, Any]) -> str:
    """The human-readable report."""
    c, par, prec, wl, n = p["cluster"], p["parallel"], p["precision"], p["workload"], p["parameters"]
    B = lambda x: _si(x).replace(" G", " B")  # noqa: E731  parameter counts: 671.03 B, 1.23 M
    G = _mem
    lines = [
        f"dsv3-posttrain plan: {p['model']} on {c['name']} ({c['nodes']} node(s) x {c['gpus_per_node']} "
        f"{c['gpu']}, {c['memory_gib']:g} GiB each)",
        f"layout: dp {par['dp']} x tp {par['tp']} x pp {par['pp']} = {p['world']} GPUs; ep {par['ep']} "
        f"(expert data-parallel {par['dp'] * par['tp'] // par['ep']}); ZeRO-{par['zero_stage']}",
        f"precision: weights {prec['weights']}{FP8_NOTE if prec['weights'] == 'fp8' else ''}"
        f" | master {prec['master']} | grads {prec['grads']} | AdamW m+v {prec['moments']}",
        "",
        "parameters",
        f"  main model                 {B(n['main']):>12}",
        f"  activated per token        {B(n['activated']):>12}",
        f"  MTP module (trained)       {B(n['mtp']):>12}   (shares embedding + head; "
        f"{B(n['mtp_released'])} as released, with its copies of both)",
        f"  routed experts (all)       {B(n['routed_experts']):>12}",
        f"  FP8 Linear weights         {B(n['fp8_linear']):>12}",
        "",
    ]
    stages = p["memory_stages"]
    labels = {
        "weights": f"weights ({prec['weights']})", "zero3_gather": "ZeRO-3 gather buffer (2 layers)",
        "master": f"master weights ({prec['master']})", "grads": f"gradients ({prec['grads']})",
        "moments": f"AdamW m+v ({prec['moments']})",
        "activations": f"activations (recompute {wl['recompute']})", "mtp_activations": "MTP activations",
        "logits": "logits + loss (bf16 + fp32)",
    }
    header = "".join(f"{'stage ' + str(s['stage']):>14}" for s in stages)
    title = f"per-GPU memory, micro-batch {wl['micro_batch']} x {wl['seq_len']} tokens"
    lines.append(f"{title:<52}{header}")
    for key in MEMORY_ROWS:
        if any(s[key] for s in stages):
            lines.append(f"  {labels[key]:<50}" + "".join(f"{G(s[key]):>14}" for s in stages))
    lines.append("  " + "-" * 50 + "-" * 14 * len(stages))
    lines.append(f"  {'total':<50}" + "".join(f"{G(s['total']):>14}" for s in stages))
    lines.append(f"  {'fits in ' + format(c['memory_gib'], 'g') + ' GiB':<50}"
                 + "".join(f"{'yes' if s['fits'] else 'NO':>14}" for s in stages))
    lines.append("  (activations: " + "; ".join(f"stage {s['stage']}: {s['layers']} layers x {s['in_flight']} "
                                              "micro-batch(es) in flight" for s in stages)
                 + "; buffers, CUDA context and fragmentation not included)")
    kv = p["kv_cache"]
    lines += [
        "",
        f"rollout KV cache (MLA latent, {wl['kv_dtype']})",
        f"  per token: ({kv['latent_elements']} latent) x {kv['layers']} layers x {kv['bytes_per_elem']} B = "
        f"{kv['per_token']:,} B ({kv['per_token'] / 1024:.1f} KiB)",
        f"  full MHA would cache 2 x heads x d_h x layers x bytes = {kv['mha_per_token']:,} B "
        f"({kv['mha_ratio']:.1f}x the latent); MLA caches as much as GQA with {kv['gqa_groups']:g} groups",
        f"  {wl['kv_seqs']} sequences x {wl['kv_context']} tokens: {G(kv['total'])} total, "
        f"{G(kv['per_gpu'])} per GPU over {wl['kv_dp']} data-parallel rank(s) (MHA: {G(kv['mha_per_gpu'])})",
    ]
    f, t = p["flops_per_token"], p["time"]
    basis = wl["mfu_basis"]
    peak = c["peak_tflops_bf16"] if basis == "bf16" else c["peak_tflops_fp8"]
    (other, other_mfu), = t["mfu_other_basis"].items()
    lines += [
        "",
        f"step time (ASSUMED MFU {wl['mfu']:.1%} of the {basis} dense peak, {peak:g} TFLOPs/GPU; "
        f"= {other_mfu:.1%} of the {other} peak)",
        f"  FLOPs per token: 6 x {B(n['matmul_activated'])} activated matmul params = {_si(f['dense'])}"
        f" + attention {_si(f['attention'])} (seq {wl['seq_len']}, causal)"
        f" + MTP {_si(f['mtp'])} = {_si(f['total'], 'FLOPs')}",
        f"  tokens per step: {p['global_batch']} sequences x {wl['seq_len']} = {p['tokens_per_step']:,} "
        f"({p['micro_batches_per_step']} micro-batches per DP rank)",
        f"  step time: {_seconds(t['step_s'])}",
        f"  per trillion tokens: {_si(t['gpu_hours_per_trillion'])} GPU hours = "
        f"{t['days_per_trillion']:,.2f} days on {p['world']} GPUs",
    ]
    if "gpu_hours" in t:
        lines.append(f"  {_si(t['tokens'])} tokens: {_si(t['gpu_hours'])} GPU hours = "
                     f"{t['days']:,.1f} days on {p['world']} GPUs")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- CLI
_FLAGS: list[tuple[str, str, type, str]] = [  # (flag, section, type, help)
    ("nodes", "cluster", int, "number of nodes"),
    ("gpus_per_node", "cluster", int, "GPUs per node"),
    ("memory_gib", "cluster", float, "memory per GPU in GiB"),
    ("peak_tflops_bf16", "cluster", float, "dense bf16 peak per GPU (H100/H800 SXM: 989.5)"),
    ("peak_tflops_fp8", "cluster", float, "dense FP8 peak per GPU (H100/H800 SXM: 1979)"),
    ("dp", "parallel", int, "data-parallel (ZeRO/FSDP shard) degree; unset: GPUs / (tp x pp)"),
    ("tp", "parallel", int, "tensor parallel degree"),
    ("ep", "parallel", int, "expert parallel degree (divides dp x tp and the routed experts)"),
    ("pp", "parallel", int, "pipeline parallel stages"),
    ("zero_stage", "parallel", int, "0: replicate; 1: shard master + moments; 2: + grads; 3 (FSDP): + weights"),
    ("weights", "precision", str, "fp8 (report §3.3: FP8 Linears, rest bf16) | bf16 | fp32"),
    ("master", "precision", str, "fp32 | none"),
    ("grads", "precision", str, "fp32 | bf16"),
    ("moments", "precision", str, "AdamW m, v: bf16 (report §3.3.3) | fp32"),
    ("seq_len", "workload", int, "training sequence length"),
    ("micro_batch", "workload", int, "sequences per micro-batch per GPU"),
    ("global_batch", "workload", int, "sequences per optimizer step; unset: dp x micro_batch x pp"),
    ("recompute", "workload", str, "activation recomputation: full | none"),
    ("mfu", "workload", float, "assumed model FLOPs utilisation, fraction of peak"),
    ("mfu_basis", "workload", str, "peak the MFU refers to: bf16 | fp8"),
    ("tokens", "workload", float, "total training tokens, for total GPU hours (e.g. 1.48e13)"),
    ("kv_seqs", "workload", int, "rollout: concurrent sequences"),
    ("kv_context", "workload", int, "rollout: context length per sequence"),
    ("kv_dtype", "workload", str, "rollout KV cache type: bf16 | fp8"),
    ("kv_dp", "workload", int, "rollout: data-parallel attention ranks the sequences spread over"),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsv3-posttrain plan",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Estimate per-GPU memory (weights, master weights, gradients, AdamW moments, activations),\n"
        "the rollout KV cache with MLA's compressed latent, and the step time from FLOPs and an assumed MFU,\n"
        "for a DeepSeek-V3-architecture model on a cluster. Nothing is allocated; formulas and assumptions\n"
        "are in the docstring of posttrain/plan.py (python -c 'import posttrain.plan; help(posttrain.plan)').",
        epilog="The cluster file (recipes/clusters/*.yaml) holds the cluster fields at top level and optional\n"
        "sections parallel:, precision:, workload: with the flag names above; flags override it.\n\n"
        "examples:\n"
        "  dsv3-posttrain plan --model deepseek-v3 --cluster h800-2048     # the report's pre-training run\n"
        "  dsv3-posttrain plan --model deepseek-v3 --cluster h200-16x8-fsdp --moments fp32\n"
        "  dsv3-posttrain plan --model runs/tiny-model --nodes 1 --gpus_per_node 2 --json",
    )
    from .presets import PRESETS

    p.add_argument("--model", default="tiny",
                   help=f"preset ({', '.join(sorted(PRESETS))}) or checkpoint dir / config.json (default: tiny)")
    p.add_argument("--cluster", help="cluster YAML, or a name in recipes/clusters/ (e.g. h800-2048)")
    p.add_argument("--no_mtp", action="store_true", help="leave the MTP module's FLOPs out of the step time")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (bytes, counts, seconds)")
    defaults = {"cluster": Cluster(), **{s: cls() for s, cls in SECTIONS.items()}}
    for flag, section, tp, help_ in _FLAGS:
        default = getattr(defaults[section], flag)
        shown = f"{default:g}" if isinstance(default, float) else default
        note = "" if default is None else f" (default {shown})"
        p.add_argument(f"--{flag}", type=tp, default=None, help=f"[{section}] {help_}{note}")
    return p


def main_plan(argv: list[str]) -> int:
    """`dsv3-posttrain plan`: prints the plan (table or --json); UserError for what the user can fix."""
    args = build_parser().parse_args(argv)
    overrides: dict[str, dict[str, Any]] = {}
    for flag, section, _, _ in _FLAGS:
        if getattr(args, flag) is not None:
            overrides.setdefault(section, {})[flag] = getattr(args, flag)
    if args.no_mtp:
        overrides.setdefault("workload", {})["include_mtp"] = False
    model = load_model_shape(args.model)
    plan = make_plan(model, *load_setup(args.cluster, overrides))
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main_plan(sys.argv[1:]))
    except UserError as e:
        print(f"dsv3-posttrain plan: error: {e}", file=sys.stderr)
        sys.exit(2)
