"""MLA's query, key and value assembly (report §2.1.1) as one Triton kernel each way on CUDA.

Between its projections and the attention kernel, Multi-head Latent Attention builds per head

    query = [q_nope | RoPE(q_rope)]       key = [k_nope | RoPE(k_rope)]       value = v

where q_nope, q_rope come from the query projection, k_nope and v from the up-projection of the compressed
latent (kv_b_proj), and the decoupled key k_rope (kv_a_proj_with_mqa's last 64 outputs) is shared by all heads.
transformers builds this in eager ops: products, sums and a concatenation for the query's rotary part, a
concatenation of the query, a new key buffer with two copies; the backward runs them all again, fills zeros
for the strided slices and concatenates [dk_nope | dv]. A layer's forward+backward then launches 55 kernels
besides its GEMMs (the attention and the latent's RMSNorm counted as one kernel each way), and the kernels
that are neither GEMMs, attention nor norm move 224 kB per token at Moonlight's 16 heads (1688 kB at V3's
128). With the kernels below: 8 kernels, and 69 kB (472 kB) per token (`benchmarks/count_mla_traffic.py`,
RESULTS.md session 17). One kernel reads q, the latent's k_nope and the
shared k_rope once and writes the query and the key; v is handed over as a view of kv_b_proj's output, as
transformers does. Query and key are written as [B, S, heads, dim] and handed over transposed: flex_attention
writes its output in the query's order, so it reaches o_proj without a copy. One backward kernel writes the projections' gradients [dq_nope | dq_rope] and
[dk_nope | dv] straight from the attention's gradients, and the shared key's gradient summed over the heads.

Numerics. The nope parts, v and their gradients are copies (the same bits as eager). The rotary part is
computed in fp32 from the stored values and rounded once to the output dtype; transformers' eager ops round
each product and sum to the activations' dtype (in bf16: within about a step of ours). Under autocast (fp32
weights, bf16 activations, fp32 cos/sin) eager computes the rotary part in fp32 and rounds it once at the
attention's input, which is what the kernel does. The shared key's gradient is summed over the heads in fp32
and rounded once.

The kernels run where :func:`fused_mla_usable` says (CUDA, training without a KV cache, interleaved rotary
as V3 ships, not compiling, `POSTTRAIN_FUSED_MLA` not "0", the start-up check passed on the device).
Everywhere else -- the CPU, generation with a cache, torch.compile (whose generated code fuses the eager ops
itself) -- the module is transformers' `DeepseekV3Attention.forward`, unchanged.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    apply_rotary_pos_emb_interleave,
)

from .start_up_check import combine_error_bound, passed_on, rounded_once_bound, run_start_up_check, swap_module_class

from .triton_rounding import round_to_bf16, tl, triton  # None without Triton: the eager ops run

log = logging.getLogger(__name__)

FUSED_MLA_ENV = "POSTTRAIN_FUSED_MLA"  # "0" keeps transformers' eager assembly on every device
FUSED_DEVICE_TYPES = ("cuda",)  # where the Triton kernels run (the tests add "cpu" under Triton's interpreter)
_KERNEL_DTYPES = (torch.bfloat16, torch.float32)  # activations the kernels round for (others: the eager ops)
_checked: dict[str, str | None] = {}  # device -> None (the start-up check passed) or what went wrong


class DeepseekV3FusedAttention(DeepseekV3Attention):
    """`DeepseekV3Attention` (same parameters, same state-dict keys) whose query/key/value assembly runs as one
    Triton kernel each way where :func:`fused_mla_usable`; transformers' forward everywhere else."""

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, past_key_values=None, **kwargs):
        if not fused_mla_usable(self, hidden_states, position_embeddings, past_key_values):
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        batch_size, seq_length = hidden_states.shape[:-1]
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        compressed_kv = self.kv_a_proj_with_mqa(hidden_states)
        kv_nope, k_rope = torch.split(compressed_kv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_nope))
        cos, sin = position_embeddings
        query, key, value = mla_query_key_value(q, kv, k_rope, cos, sin, self.num_heads, self.qk_nope_head_dim,
                                                self.v_head_dim)
        attention_interface = hf_v3.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, hf_v3.eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, **kwargs)
        attn_output = attn_output.reshape(batch_size, seq_length, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


def fused_mla_usable(module: DeepseekV3Attention, hidden_states: torch.Tensor,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor], past_key_values) -> bool:
    """True where the fused assembly runs for this call: CUDA, no KV cache (training and scoring; generation
    updates the cache between the rotary and the expansion), V3's interleaved rotary on even-sized rope dims,
    cos/sin per token, not compiling, not switched off, and the start-up check on the device passed."""
    cos = position_embeddings[0]
    rope = module.qk_rope_head_dim
    if (torch.compiler.is_compiling() or triton is None or hidden_states.device.type not in FUSED_DEVICE_TYPES
            or past_key_values is not None or not getattr(module.config, "rope_interleave", False) or rope % 2
            or tuple(cos.shape) != (*hidden_states.shape[:-1], rope) or os.environ.get(FUSED_MLA_ENV, "1") == "0"):
        return False
    return passed_on(hidden_states.device, _checked, _start_up_check, "the fused MLA query/key assembly",
                     "using transformers' eager ops there", log)


def use_fused_mla(model: nn.Module) -> int:
    """Makes every `DeepseekV3Attention` of ``model`` a `DeepseekV3FusedAttention` in place: the subclass adds no
    state, so parameters, hooks and state-dict keys stay (nothing is copied; meta stays meta). Returns how many."""
    return swap_module_class(model, DeepseekV3Attention, DeepseekV3FusedAttention)


# -- the assembly ------------------------------------------------------------------------------------------
def mla_query_key_value(q: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, num_heads: int, nope: int, v_dim: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value [B, heads, S, dim] from the projections: ``q`` [B, S, heads·(nope + rope)], ``kv``
    [B, S, heads·(nope + v_dim)], the shared ``k_rope`` [B, S, rope] and ``cos``/``sin`` [B, S, rope] (the rotary
    embedding's, whose first half holds each pair's angle). The Triton kernels where the three share a dtype
    they round for; transformers' eager ops otherwise (:func:`mla_query_key_value_reference`)."""
    if q.dtype in _KERNEL_DTYPES and kv.dtype == q.dtype and k_rope.dtype == q.dtype and not cos.requires_grad:
        query, key, value = _QueryKeyValue.apply(q, kv, k_rope, cos, sin, num_heads, nope, v_dim)
        return query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    return mla_query_key_value_reference(q, kv, k_rope, cos, sin, num_heads, nope, v_dim)


def mla_query_key_value_reference(q: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor,
                                  sin: torch.Tensor, num_heads: int, nope: int, v_dim: int
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' eager assembly (DeepseekV3Attention.forward and expand_kv, 5.19): the same ops, the same
    dtypes (the key in kv_b_proj's output dtype)."""
    batch_size, seq_length = q.shape[:2]
    q = q.view(batch_size, seq_length, num_heads, -1).transpose(1, 2)
    q_pass, q_rot = torch.split(q, [nope, q.shape[-1] - nope], dim=-1)
    kv = kv.view(batch_size, seq_length, num_heads, nope + v_dim).transpose(1, 2)
    k_pass, value = torch.split(kv, [nope, v_dim], dim=-1)
    q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rope.view(batch_size, 1, seq_length, -1), cos, sin)
    query = torch.cat((q_pass, q_rot), dim=-1)
    key = torch.cat((k_pass, k_rot.to(k_pass.dtype).expand(-1, num_heads, -1, -1)), dim=-1)
    return query, key, value


# -- the kernels -------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _query_key_kernel(q_ptr, kv_ptr, kr_ptr, cos_ptr, sin_ptr, query_ptr, key_ptr, H, kr_stride,
                          DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr,
                          BN: tl.constexpr, BR: tl.constexpr, OUT_BF16: tl.constexpr):
        """One token, BH heads: query = [q_nope | rot(q_rope)], key = [k_nope | rot(k_rope)] (k_rope shared).
        rot maps the interleaved pairs (x1, x2) = (x[2i], x[2i+1]) to [x1 c - x2 s | x2 c + x1 s], in fp32."""
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BH + tl.arange(0, BH)
        DQK: tl.constexpr = DN + DR
        HALF: tl.constexpr = DR // 2
        n = tl.arange(0, BN)
        i = tl.arange(0, BR)
        nm = (heads < H)[:, None] & (n < DN)[None, :]
        im = (heads < H)[:, None] & (i < HALF)[None, :]
        c1 = tl.load(cos_ptr + t * DR + i, mask=i < HALF, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * DR + i, mask=i < HALF, other=0.0).to(tl.float32)
        c = c1[None, :]
        s = s1[None, :]
        q_head = q_ptr + t * H * DQK + heads[:, None] * DQK
        query_head = query_ptr + t * H * DQK + heads[:, None] * DQK
        tl.store(query_head + n[None, :], tl.load(q_head + n[None, :], mask=nm), mask=nm)
        x1 = tl.load(q_head + DN + 2 * i[None, :], mask=im, other=0.0).to(tl.float32)
        x2 = tl.load(q_head + DN + 2 * i[None, :] + 1, mask=im, other=0.0).to(tl.float32)
        r1 = x1 * c - x2 * s
        r2 = x2 * c + x1 * s
        k1 = tl.load(kr_ptr + t * kr_stride + 2 * i, mask=i < HALF, other=0.0).to(tl.float32)
        k2 = tl.load(kr_ptr + t * kr_stride + 2 * i + 1, mask=i < HALF, other=0.0).to(tl.float32)
        rk1 = tl.broadcast_to((k1 * c1 - k2 * s1)[None, :], (BH, BR))
        rk2 = tl.broadcast_to((k2 * c1 + k1 * s1)[None, :], (BH, BR))
        if OUT_BF16:
            r1 = round_to_bf16(r1)
            r2 = round_to_bf16(r2)
            rk1 = round_to_bf16(rk1)
            rk2 = round_to_bf16(rk2)
        tl.store(query_head + DN + i[None, :], r1.to(query_ptr.dtype.element_ty), mask=im)
        tl.store(query_head + DN + HALF + i[None, :], r2.to(query_ptr.dtype.element_ty), mask=im)
        kv_head = kv_ptr + t * H * (DN + DV) + heads[:, None] * (DN + DV)
        key_head = key_ptr + t * H * DQK + heads[:, None] * DQK
        tl.store(key_head + n[None, :], tl.load(kv_head + n[None, :], mask=nm), mask=nm)
        tl.store(key_head + DN + i[None, :], rk1.to(key_ptr.dtype.element_ty), mask=im)
        tl.store(key_head + DN + HALF + i[None, :], rk2.to(key_ptr.dtype.element_ty), mask=im)

    @triton.jit
    def _query_key_backward_kernel(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, d_q_ptr, d_kv_ptr, d_kr_ptr, H,
                                   dq_st, dq_sh, dk_st, dk_sh, dv_st, dv_sh,
                                   DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr, BH: tl.constexpr,
                                   BN: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr, OUT_BF16: tl.constexpr):
        """One token, all heads: d_q = [dq_nope | rot^T(dq_rope)] back in the interleaved layout,
        d_kv = [dk_nope | dv], and d_k_rope = rot^T(Σ_heads dk_rope), each rotated in fp32 and rounded once."""
        t = tl.program_id(0).to(tl.int64)
        DQK: tl.constexpr = DN + DR
        HALF: tl.constexpr = DR // 2
        n = tl.arange(0, BN)
        v = tl.arange(0, BV)
        i = tl.arange(0, BR)
        c1 = tl.load(cos_ptr + t * DR + i, mask=i < HALF, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + t * DR + i, mask=i < HALF, other=0.0).to(tl.float32)
        c = c1[None, :]
        s = s1[None, :]
        acc1 = tl.zeros([BR], dtype=tl.float32)
        acc2 = tl.zeros([BR], dtype=tl.float32)
        for h0 in range(0, H, BH):
            heads = h0 + tl.arange(0, BH)
            hm = (heads < H)[:, None]
            nm = hm & (n < DN)[None, :]
            im = hm & (i < HALF)[None, :]
            g_head = dq_ptr + t * dq_st + heads[:, None] * dq_sh
            d_q_head = d_q_ptr + t * H * DQK + heads[:, None] * DQK
            tl.store(d_q_head + n[None, :], tl.load(g_head + n[None, :], mask=nm), mask=nm)
            d1 = tl.load(g_head + DN + i[None, :], mask=im, other=0.0).to(tl.float32)
            d2 = tl.load(g_head + DN + HALF + i[None, :], mask=im, other=0.0).to(tl.float32)
            g1 = d1 * c + d2 * s
            g2 = d2 * c - d1 * s
            if OUT_BF16:
                g1 = round_to_bf16(g1)
                g2 = round_to_bf16(g2)
            tl.store(d_q_head + DN + 2 * i[None, :], g1.to(d_q_ptr.dtype.element_ty), mask=im)
            tl.store(d_q_head + DN + 2 * i[None, :] + 1, g2.to(d_q_ptr.dtype.element_ty), mask=im)
            k_head = dk_ptr + t * dk_st + heads[:, None] * dk_sh
            d_kv_head = d_kv_ptr + t * H * (DN + DV) + heads[:, None] * (DN + DV)
            tl.store(d_kv_head + n[None, :], tl.load(k_head + n[None, :], mask=nm), mask=nm)
            vm = hm & (v < DV)[None, :]
            dv = tl.load(dv_ptr + t * dv_st + heads[:, None] * dv_sh + v[None, :], mask=vm)
            tl.store(d_kv_head + DN + v[None, :], dv, mask=vm)
            acc1 += tl.sum(tl.load(k_head + DN + i[None, :], mask=im, other=0.0).to(tl.float32), axis=0)
            acc2 += tl.sum(tl.load(k_head + DN + HALF + i[None, :], mask=im, other=0.0).to(tl.float32), axis=0)
        gk1 = acc1 * c1 + acc2 * s1
        gk2 = acc2 * c1 - acc1 * s1
        if OUT_BF16:
            gk1 = round_to_bf16(gk1)
            gk2 = round_to_bf16(gk2)
        tl.store(d_kr_ptr + t * DR + 2 * i, gk1.to(d_kr_ptr.dtype.element_ty), mask=i < HALF)
        tl.store(d_kr_ptr + t * DR + 2 * i + 1, gk2.to(d_kr_ptr.dtype.element_ty), mask=i < HALF)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(n, 1))


def _rows(x: torch.Tensor, *shape: int) -> torch.Tensor:
    """``x`` as ``shape`` with unit stride in the last dimension (a view when it can be, else a copy)."""
    x = x.reshape(*shape)
    return x if x.stride(-1) == 1 else x.contiguous()


def query_key_forward(q: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      num_heads: int, nope: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel: query and key [B, S, heads, nope + rope] (contiguous) from the projections."""
    batch_size, seq_length = q.shape[:2]
    tokens, rope = batch_size * seq_length, k_rope.shape[-1]
    q2, kv2 = q.reshape(tokens, -1).contiguous(), kv.reshape(tokens, -1).contiguous()
    kr = _rows(k_rope, tokens, rope)
    cos2, sin2 = cos.reshape(tokens, rope).contiguous(), sin.reshape(tokens, rope).contiguous()
    query = torch.empty(batch_size, seq_length, num_heads, nope + rope, dtype=q.dtype, device=q.device)
    key = torch.empty_like(query)
    if tokens and num_heads:
        bn = _pow2(nope)
        bh = min(_pow2(num_heads), max(1, 1024 // bn))
        _query_key_kernel[(tokens, triton.cdiv(num_heads, bh))](
            q2, kv2, kr, cos2, sin2, query, key, num_heads, kr.stride(0), DN=nope, DR=rope, DV=v_dim, BH=bh, BN=bn,
            BR=_pow2(rope // 2), OUT_BF16=q.dtype == torch.bfloat16, num_warps=4)
    return query, key


def query_key_backward(d_query: torch.Tensor, d_key: torch.Tensor, d_value: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, nope: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward kernel, from the gradients [B, S, heads, dim] (any strides) of query, key and value: the
    gradients of q [B, S, heads·(nope + rope)], kv [B, S, heads·(nope + v_dim)] and k_rope [B, S, rope]."""
    batch_size, seq_length, num_heads, qk_dim = d_query.shape
    rope, v_dim, tokens = qk_dim - nope, d_value.shape[-1], batch_size * seq_length
    dq = _rows(d_query, tokens, num_heads, qk_dim)
    dk = _rows(d_key, tokens, num_heads, qk_dim)
    dv = _rows(d_value, tokens, num_heads, v_dim)
    cos2, sin2 = cos.reshape(tokens, rope).contiguous(), sin.reshape(tokens, rope).contiguous()
    d_q = torch.empty(batch_size, seq_length, num_heads * qk_dim, dtype=d_query.dtype, device=d_query.device)
    d_kv = torch.empty(batch_size, seq_length, num_heads * (nope + v_dim), dtype=d_query.dtype, device=d_query.device)
    d_kr = torch.empty(batch_size, seq_length, rope, dtype=d_query.dtype, device=d_query.device)
    if tokens and num_heads:
        bn, bv = _pow2(nope), _pow2(v_dim)
        _query_key_backward_kernel[(tokens,)](
            dq, dk, dv, cos2, sin2, d_q, d_kv, d_kr, num_heads, dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
            dv.stride(0), dv.stride(1), DN=nope, DR=rope, DV=v_dim, BH=min(_pow2(num_heads), max(1, 512 // max(bn, bv))),
            BN=bn, BR=_pow2(rope // 2), BV=bv, OUT_BF16=d_query.dtype == torch.bfloat16, num_warps=4)
    elif tokens:
        d_kr.zero_()
    return d_q, d_kv, d_kr


class _QueryKeyValue(torch.autograd.Function):
    """(q, kv, k_rope, cos, sin) -> query, key [B, S, heads, nope + rope] and value [B, S, heads, v_dim], the last
    a view of kv (no copy, as transformers' split)."""

    @staticmethod
    def forward(ctx, q, kv, k_rope, cos, sin, num_heads: int, nope: int, v_dim: int):
        query, key = query_key_forward(q, kv, k_rope, cos, sin, num_heads, nope, v_dim)
        ctx.save_for_backward(cos, sin)
        ctx.nope = nope
        batch_size, seq_length = q.shape[:2]
        value = kv.view(batch_size, seq_length, num_heads, nope + v_dim)[..., nope:]
        return query, key, value

    @staticmethod
    def backward(ctx, d_query, d_key, d_value):
        # an output left out of the loss comes as zeros (autograd materializes them for a Function by default)
        cos, sin = ctx.saved_tensors
        d_q, d_kv, d_kr = query_key_backward(d_query, d_key, d_value, cos, sin, ctx.nope)
        return d_q, d_kv, d_kr, None, None, None, None, None


# -- exact values and the start-up check -----------------------------------------------------------------
def float64_assembly(q: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     num_heads: int, nope: int, v_dim: int, d_query: torch.Tensor, d_key: torch.Tensor,
                     d_value: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For each result of the kernels (query, key [B, S, heads, dim]; the gradients of q, kv, k_rope): the exact
    value from the same stored inputs in float64, and how far the kernel may be from it. A copy must be exact;
    a rotated value is two fp32 products and a sum (at most 3·2^-24 of |x1 c| + |x2 s| before rounding once to
    ``dtype``); the shared key's gradient adds up 2·heads such products (the combine's fp32 sum bound)."""
    f = lambda t: t.detach().double().cpu()  # noqa: E731
    q, kv, k_rope, cos, sin = f(q), f(kv), f(k_rope), f(cos), f(sin)
    d_query, d_key, d_value = f(d_query), f(d_key), f(d_value)
    b, s = q.shape[:2]
    rope, half = k_rope.shape[-1], k_rope.shape[-1] // 2
    c, sn = cos[..., :half].unsqueeze(2), sin[..., :half].unsqueeze(2)  # [B, S, 1, half]
    zero = torch.zeros((), dtype=torch.float64)

    def rotated(x1, x2):  # [x1 c - x2 s | x2 c + x1 s] and its bound
        exact = torch.cat([x1 * c - x2 * sn, x2 * c + x1 * sn], dim=-1)
        terms = torch.cat([(x1 * c).abs() + (x2 * sn).abs()] * 2, dim=-1)
        return exact, rounded_once_bound(exact, 3 * 2.0**-24 * terms, dtype)

    q4 = q.view(b, s, num_heads, nope + rope)
    kv4 = kv.view(b, s, num_heads, nope + v_dim)
    q_rot, q_bound = rotated(q4[..., nope::2], q4[..., nope + 1::2])
    k_rot, k_bound = rotated(k_rope[..., 0::2].unsqueeze(2), k_rope[..., 1::2].unsqueeze(2))
    copy = lambda x: (x, zero.expand_as(x))  # noqa: E731
    out = {"query": (torch.cat([q4[..., :nope], q_rot], -1), torch.cat([zero.expand_as(q4[..., :nope]), q_bound], -1)),
           "key": (torch.cat([kv4[..., :nope], k_rot.expand(-1, -1, num_heads, -1)], -1),
                   torch.cat([zero.expand_as(kv4[..., :nope]), k_bound.expand(-1, -1, num_heads, -1)], -1))}
    # backward: rot^T(d1, d2) = (d1 c + d2 s, d2 c - d1 s), back at the interleaved positions
    d1, d2 = d_query[..., nope:nope + half], d_query[..., nope + half:]
    g1, g2 = d1 * c + d2 * sn, d2 * c - d1 * sn
    g_bound = rounded_once_bound(g1, 3 * 2.0**-24 * ((d1 * c).abs() + (d2 * sn).abs()), dtype)
    g2_bound = rounded_once_bound(g2, 3 * 2.0**-24 * ((d2 * c).abs() + (d1 * sn).abs()), dtype)
    dq_rope = torch.stack([g1, g2], dim=-1).flatten(-2)
    dq_bound = torch.stack([g_bound, g2_bound], dim=-1).flatten(-2)
    out["d q"] = (torch.cat([d_query[..., :nope], dq_rope], -1).reshape(b, s, -1),
                  torch.cat([zero.expand_as(d_query[..., :nope]), dq_bound], -1).reshape(b, s, -1))
    out["d kv"] = copy(torch.cat([d_key[..., :nope], d_value], -1).reshape(b, s, -1))
    e1, e2 = d_key[..., nope:nope + half], d_key[..., nope + half:]  # [B, S, heads, half]
    c2, s2 = c.squeeze(2), sn.squeeze(2)
    gk1 = e1.sum(2) * c2 + e2.sum(2) * s2
    gk2 = e2.sum(2) * c2 - e1.sum(2) * s2
    n_terms = num_heads + 2
    b1 = combine_error_bound((e1.abs() * c.abs() + e2.abs() * sn.abs()).sum(2), gk1, n_terms, dtype)
    b2 = combine_error_bound((e2.abs() * c.abs() + e1.abs() * sn.abs()).sum(2), gk2, n_terms, dtype)
    out["d k_rope"] = (torch.stack([gk1, gk2], -1).flatten(-2), torch.stack([b1, b2], -1).flatten(-2))
    return out


def _start_up_check(device: torch.device) -> str | None:
    """The kernels on ``device`` against float64, at V3's head dims with a head count that is not a power of
    two, a strided k_rope and strided gradients. None if they agree, else what went wrong."""
    return run_start_up_check(_compare_with_float64, device)


def _compare_with_float64(device: torch.device) -> str | None:
    g = torch.Generator().manual_seed(0)
    b, s, heads, nope, rope, v_dim = 2, 3, 3, 128, 64, 128
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    q = (r(b, s, heads * (nope + rope)) * 4).to(device, torch.bfloat16)
    kv = r(b, s, heads * (nope + v_dim)).to(device, torch.bfloat16)
    compressed = r(b, s, 32 + rope).to(device, torch.bfloat16)
    k_rope = compressed[..., 32:]  # as kv_a_proj_with_mqa's output is split
    angles = torch.arange(b * s, dtype=torch.float64).view(b, s, 1) * torch.rand(rope // 2, generator=g, dtype=torch.float64)
    cos = torch.cat([angles.cos()] * 2, -1).to(device, torch.bfloat16)
    sin = torch.cat([angles.sin()] * 2, -1).to(device, torch.bfloat16)
    query, key, value = _QueryKeyValue.apply(q, kv, k_rope, cos, sin, heads, nope, v_dim)
    # strided gradients, as an attention backward may hand them over
    dq = r(b, heads, s, nope + rope).to(device, torch.bfloat16).transpose(1, 2)
    dk = r(b, s, heads, nope + rope).to(device, torch.bfloat16)
    dv = r(b, s, heads, v_dim + 8).to(device, torch.bfloat16)[..., 8:]
    d_q, d_kv, d_kr = query_key_backward(dq, dk, dv, cos, sin, nope)
    want = float64_assembly(q, kv, k_rope, cos, sin, heads, nope, v_dim, dq, dk, dv, torch.bfloat16)
    got = {"query": query, "key": key, "d q": d_q, "d kv": d_kv, "d k_rope": d_kr}
    for name, (exact, bound) in want.items():
        x = got[name]
        if x.dtype != torch.bfloat16 or tuple(x.shape) != tuple(exact.shape):
            return f"{name}: {x.dtype} {tuple(x.shape)}, expected bf16 {tuple(exact.shape)}"
        if not ((x.double().cpu() - exact).abs() <= bound).all():
            return f"{name} beyond its bound"
    if not torch.equal(value, kv.view(b, s, heads, nope + v_dim)[..., nope:]):
        return "value is not kv_b_proj's v part"
    return None
