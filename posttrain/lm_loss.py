"""LM head + cross-entropy without the ``[tokens, vocab]`` logits, gradients computed in the forward.

The SFT loss (and each MTP depth's, DeepSeek-V3 report §2.2 eq. 24-25) is a sum of per-token
``-log p(target)`` over a linear head, divided by a count. Its gradient with respect to the logits,
``softmax(z) - onehot(target)``, is known as soon as a token's logits are: so each chunk of tokens is
projected once, its logits are turned into that gradient in place, and the two gradient GEMMs
(``dh = g W`` and ``dW += gᵀ h``) run right there. The backward only scales the stored gradients by
the incoming scalar. That is three GEMMs per head where recomputing the logits in the backward
(TRL's ``ChunkedLogProbFunction``, or any chunked head that keeps only the log-sum-exp) takes four:
on the GPU benchmark's Moonlight-shaped slice (4 layers + MTP, vocabulary 163,840) the main and MTP
heads are 61% of the step's matmul FLOPs.

The price is memory held from the forward to the backward: ``dW`` in the weight's dtype (the size
of the weight's own ``.grad``) and ``dh`` in the hidden states' dtype. The logits of a chunk live only
while it is processed.

The in-place turn of a chunk's logits into their gradient is one Triton kernel on CUDA (two reads
and one write of the chunk) and torch's own kernels elsewhere; both are checked against each other
in ``tests/test_lm_loss.py`` (the Triton one under its CPU interpreter).

On a CPU the default is still the recompute path (`_RecomputeLinearCE`, four GEMMs): the demo's
statistical acceptance was measured with its rounding (see its docstring).
"""

from __future__ import annotations

import torch
from torch import nn

from .triton_rounding import round_to_bf16, tl, triton  # None without Triton: the eager ops run

IGNORE_INDEX = -100
LM_LOSS_BACKENDS = ("auto", "fused", "recompute", "trl")
__all__ = ["IGNORE_INDEX", "LM_LOSS_BACKENDS", "lm_head_cross_entropy", "softmax_grad_"]

# Elements of one chunk's [tokens, vocab] logits: fp32 32 MiB on a CPU. On a GPU 2^29 (1 GiB in bf16):
# the chunk's token count is the contraction of its dW GEMM, which also reads and writes the whole fp32
# [vocab, hidden] accumulator once per chunk (2.7 GB at Moonlight's head), so few, long chunks: 3276
# tokens at Moonlight's vocabulary, 4152 at V3's.
_CHUNK_ELEMS_CPU = 1 << 23
_CHUNK_ELEMS_GPU = 1 << 29
# TRL's kernel (the `trl` backend): its vocabulary tile (trl 1.16.0 `_CHUNKED_LOGPROB_CHUNK_SIZE`).
_TRL_VOCAB_CHUNK = 32768
_FOLD_BLOCK = 4096


def _use_triton(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _softmax_grad_kernel(z_ptr, stride, t_ptr, nll_ptr, V, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        """One row of logits: -log p(target) into nll_ptr, and (WRITE_GRAD) the row overwritten with
        softmax(z) - onehot(target), in the row's own dtype. Online max / sum-exp in fp32."""
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride
        m = -float("inf")
        s = 0.0
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            z = tl.load(base + offs, mask=offs < V, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, 0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
            m = m_new
        lse = m + tl.log(s)
        t = tl.load(t_ptr + row)
        z_t = tl.load(base + t).to(tl.float32)
        tl.store(nll_ptr + row, lse - z_t)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                z = tl.load(base + offs, mask=offs < V, other=0.0).to(tl.float32)
                g = tl.exp(z - lse) - tl.where(offs == t, 1.0, 0.0)
                tl.store(base + offs, g.to(z_ptr.dtype.element_ty), mask=offs < V)


    @triton.jit
    def _scale_bf16_kernel(x_ptr, out_ptr, s_ptr, n, BLOCK: tl.constexpr):
        """bf16 out = x * s with the product in fp32 and one rounding to nearest even, s read from the device
        (rounded on the bits: the interpreter's casts truncate, see posttrain.triton_rounding)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        y = tl.load(x_ptr + offs, mask=mask).to(tl.float32) * tl.load(s_ptr)
        tl.store(out_ptr + offs, round_to_bf16(y).to(tl.bfloat16), mask=mask)


def softmax_grad_(logits: torch.Tensor, target: torch.Tensor, write_grad: bool = True,
                  kernel: str = "auto") -> torch.Tensor:
    """-log softmax(logits)[target] per row (fp32), and with `write_grad` `logits` overwritten with
    softmax(logits) - onehot(target): the gradient of the summed loss with respect to the logits.
    `logits` is [rows, V] with a contiguous last dim; `target` holds valid indices only. `kernel`:
    `auto` (Triton on CUDA, torch elsewhere), `triton` or `torch`."""
    rows, vocab = logits.shape
    nll = torch.empty(rows, device=logits.device, dtype=torch.float32)
    if rows == 0:
        return nll
    if kernel == "auto":
        kernel = "triton" if _use_triton(logits.device) else "torch"
    if kernel == "triton":
        _softmax_grad_kernel[(rows,)](logits, logits.stride(0), target, nll, vocab,
                                      WRITE_GRAD=write_grad, BLOCK=_FOLD_BLOCK, num_warps=8)
        return nll
    z = logits if logits.dtype == torch.float32 else logits.float()
    lse = torch.logsumexp(z, dim=-1)
    nll.copy_(lse - z.gather(1, target[:, None]).squeeze(1))
    if write_grad:
        g = z.sub_(lse[:, None]).exp_()  # in place when the logits are fp32 (the CPU case)
        g.scatter_add_(1, target[:, None], torch.full_like(g[:, :1], -1.0))
        if g is not logits:
            logits.copy_(g)
    return nll


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = True) -> None:
    """`acc += a @ b` (or `acc = a @ b` when not ``accumulate``) into an fp32 `acc` without rounding the
    product to the inputs' dtype first: summing bf16-rounded chunk products would bias the weight gradient.
    CUDA's cuBLAS does it in one GEMM (torch ≥ 2.8 `out_dtype`); elsewhere the inputs are widened. The first
    chunk writes the accumulator instead of adding to zeros: at Moonlight's head that is a 1.3 GB zero fill
    and a 1.3 GB read of it per head and step saved."""
    if acc.device.type == "cuda" and a.dtype in (torch.bfloat16, torch.float16):
        if accumulate:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        else:
            torch.mm(a, b, out_dtype=torch.float32, out=acc)
    elif accumulate:
        acc.addmm_(a.float(), b.float())
    else:
        torch.mm(a.float(), b.float(), out=acc)


def _head_operands(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None = None):
    """(compute dtype, weight, bias) of a head chunk loop: the autocast dtype under autocast, else the hidden
    states' (or `dtype` when given), with the head's parameters cast to it."""
    if dtype is None:
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    return dtype, weight.to(dtype), bias.to(dtype) if bias is not None else None


class _FusedLinearCE(torch.autograd.Function):
    """Σ -log softmax(hidden @ weightᵀ + bias)[target] over the rows, `rows` tokens at a time, with the
    gradients computed in the forward (module docstring). `with_grad=False` computes the value only."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                rows: int, with_grad: bool) -> torch.Tensor:
        device = hidden.device
        dtype, w, b = _head_operands(hidden, weight, bias)
        need_h, need_w, need_b = (with_grad and n for n in ctx.needs_input_grad[:3])
        grad_h = torch.empty_like(hidden) if need_h else None
        # the first chunk writes grad_w (no zero fill); with no rows at all it is zero
        grad_w = torch.empty(weight.shape, device=device, dtype=torch.float32) if need_w else None
        if grad_w is not None and hidden.shape[0] == 0:
            grad_w.zero_()
        grad_b = torch.zeros(bias.shape, device=device, dtype=torch.float32) if need_b else None
        total = torch.zeros((), device=device, dtype=torch.float32)
        with torch.autocast(device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                end = min(start + rows, hidden.shape[0])
                h = hidden[start:end].to(dtype)
                logits = nn.functional.linear(h, w, b)
                total += softmax_grad_(logits, target[start:end], write_grad=with_grad).sum()
                if grad_h is not None:
                    if grad_h.dtype == dtype:
                        torch.mm(logits, w, out=grad_h[start:end])  # rows of a contiguous buffer: no copy
                    else:
                        grad_h[start:end] = logits @ w
                if grad_w is not None:
                    _addmm_fp32_(grad_w, logits.t(), h, accumulate=start > 0)
                if grad_b is not None:
                    grad_b += logits.sum(0, dtype=torch.float32)
        # Held until the backward in the parameters' own dtypes (what `.grad` will be anyway).
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                              grad_b.to(bias.dtype) if grad_b is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grads = [_scaled(g, grad_total) if g is not None else None for g in ctx.saved_tensors]
        return (*grads, None, None, None)


def _scaled(x: torch.Tensor, scale: torch.Tensor, chunk_elems: int = 1 << 26, kernel: str = "auto") -> torch.Tensor:
    """`x * scale` with the product taken in fp32 (a bf16 `x` times an fp32 0-dim tensor would round the
    scale to bf16 first): one Triton pass on CUDA, elsewhere over row chunks so that the fp32 temporary
    stays bounded."""
    scale = scale.float()
    if x.dtype == torch.float32:
        return x * scale
    out = torch.empty_like(x)
    if x.numel() == 0:  # a head that saw no valid target: an empty gradient (no launch, no row to index)
        return out
    if kernel == "triton" or (kernel == "auto" and _use_triton(x.device) and x.dtype == torch.bfloat16
                              and x.is_contiguous()):
        block = 4096
        _scale_bf16_kernel[(-(-x.numel() // block),)](x, out, scale.reshape(1), x.numel(), BLOCK=block, num_warps=4)
        return out
    step = max(1, chunk_elems // max(1, x[0].numel())) if x.dim() > 1 else x.shape[0] or 1
    for start in range(0, x.shape[0], step):
        out[start:start + step] = x[start:start + step].float() * scale
    return out


class _RecomputeLinearCE(torch.autograd.Function):
    """log p(target) of `hidden @ weight.T (+ bias)` per token, computed `rows` tokens at a time with
    full-vocabulary rows and torch's own (fused) log-sum-exp / exp kernels; backward recomputes each
    chunk's logits. Keeps only the per-token log-sum-exp between forward and backward.

    Four GEMMs per head where `_FusedLinearCE` takes three, but no gradient held between forward and
    backward. The CPU default: its rounding is the one the demo's statistical acceptance was measured
    with (tests/test_demo.py); the fused path's, equal within fp32 summation order, sent the demo's
    seed-0 run down another trajectory that failed the test's interval (benchmarks/RESULTS.md, session 12).
    TRL's kernel runs on a CPU as a torch emulation of its Triton tiles, ~4x the elementwise passes of
    this one (measured +12% per SFT step on the tiny preset)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                target: torch.Tensor, rows: int) -> torch.Tensor:
        dtype, w, b = _head_operands(hidden, weight, bias)
        log_probs = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(log_probs)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], rows):
                end = min(start + rows, hidden.shape[0])
                logits = nn.functional.linear(hidden[start:end].to(dtype), w, b).float()
                lse[start:end] = torch.logsumexp(logits, dim=-1)
                log_probs[start:end] = logits.gather(1, target[start:end, None]).squeeze(1) - lse[start:end]
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.rows, ctx.dtype = rows, dtype
        return log_probs

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        rows = ctx.rows
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, w, b = _head_operands(hidden, weight, bias, ctx.dtype)
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulation over the token chunks, whatever the weight dtype
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if need_b else None
        grad_log_probs = grad_log_probs.float()
        for start in range(0, hidden.shape[0], rows):
            end = min(start + rows, hidden.shape[0])
            h = hidden[start:end].to(dtype)
            logits = nn.functional.linear(h, w, b).float()
            # d log p_t / d z = onehot(t) - softmax(z), times the incoming gradient, in place
            grad = logits.sub_(lse[start:end, None]).exp_()
            grad.scatter_add_(1, target[start:end, None], torch.full_like(grad[:, :1], -1.0))
            grad.mul_(-grad_log_probs[start:end, None])
            g = grad.to(dtype)
            if grad_h is not None:
                grad_h[start:end] = (g @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(grad.t(), h.float())
            if grad_b is not None:
                grad_b += grad.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None, None, None)


def lm_head_cross_entropy(
    hidden: torch.Tensor,
    lm_head: nn.Linear,
    target: torch.Tensor,
    *,
    num_items: torch.Tensor | int | None = None,
    backend: str = "auto",
    chunk: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of `lm_head(hidden)` against `target` (IGNORE_INDEX skipped) without the
    `[tokens, vocab]` logits: Σ -log p(target) over the valid targets, divided by their count (or
    by `num_items`). Equal in value and gradients to `lm_head` → fp32 logits → `cross_entropy` up
    to summation order (and, for bf16 weights, one more rounding of the weight gradient).

    Backends (`auto`: `fused` on CUDA / XPU, `recompute` elsewhere):
    * `fused`: `_FusedLinearCE`, `chunk` tokens at a time (default: about 2^23 logits on a CPU, 2^29
      on a GPU), three GEMMs per head, gradients made in the forward.
    * `recompute`: `_RecomputeLinearCE`, `chunk` tokens at a time (about 2^23 logits), the logits
      recomputed in the backward; four GEMMs, nothing held but the log-sum-exp.
    * `trl`: TRL's `ChunkedLogProbFunction` (trl 1.16.0): tokens × vocabulary tiles folded into an
      online log-sum-exp by its Triton kernel, tiles recomputed in the backward (four GEMMs). Its
      positional signature (hidden, weight, bias, targets, temperature, chunk_size, softcap,
      logit_scale, outputs) is TRL-internal, pinned with TRL. `chunk` is its vocabulary tile.
    Under autocast both compute the logits in the autocast dtype, as `lm_head` itself would.
    A head that is not an `nn.Linear` (peft's LoRA wrapper of `lm_head`) runs its own forward, `chunk`
    tokens at a time, whatever the backend.

    Only the valid positions are projected (prompt tokens and sample boundaries cost nothing); the
    selection is one host sync per call on CUDA (TRL's own fused head makes the same one).
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_target = target.reshape(-1).to(flat_hidden.device)
    valid = flat_target != IGNORE_INDEX
    rows = valid.nonzero().squeeze(1)  # one host sync (boolean indexing of h and t would take two)
    h, t = flat_hidden.index_select(0, rows), flat_target.index_select(0, rows)
    denominator = valid.sum().clamp(min=1) if num_items is None else num_items
    if not isinstance(lm_head, nn.Linear):
        # A wrapped head (peft's LoRA `lm_head`) computes more than its `.weight`, which is the frozen base
        # weight: the kernels below would leave the adapter out of the loss, and it would never train.
        total = _module_head_nll(lm_head, h, t, chunk or max(1, _CHUNK_ELEMS_CPU // lm_head.weight.shape[0]))
        return total / (denominator.to(total.device) if isinstance(denominator, torch.Tensor) else denominator)
    weight, bias = lm_head.weight, lm_head.bias
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch build without torch.distributed
        DTensor = ()  # noqa: N806
    if isinstance(weight, DTensor):  # a separately sharded head (FSDP2): gather it, as TRL does
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    if backend == "auto":
        backend = "fused" if h.device.type in ("cuda", "xpu") else "recompute"
    # both chunked heads add each chunk's dW product into one fp32 accumulator: few, long chunks on a GPU
    per_chunk = _CHUNK_ELEMS_GPU if h.device.type in ("cuda", "xpu") else _CHUNK_ELEMS_CPU
    chunk_rows = chunk or max(1, per_chunk // weight.shape[0])
    if backend == "fused":
        with_grad = torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (h, weight, bias))
        total = _FusedLinearCE.apply(h, weight, bias, t, chunk_rows, with_grad)
    elif backend == "recompute":
        log_probs = _RecomputeLinearCE.apply(h, weight, bias, t, chunk_rows)
        total = -log_probs.sum()
    elif backend == "trl":
        from trl.kernels import ChunkedLogProbFunction

        log_probs = ChunkedLogProbFunction.apply(h, weight, bias, t, 1.0, chunk or _TRL_VOCAB_CHUNK, None, 1.0, ())[0]
        total = -log_probs.sum()
    else:
        raise ValueError(f"backend must be one of {LM_LOSS_BACKENDS}, got {backend!r}")
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator


def _chunk_nll(lm_head: nn.Module, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(lm_head(h).float(), t, reduction="sum")


def _module_head_nll(lm_head: nn.Module, h: torch.Tensor, t: torch.Tensor, rows: int) -> torch.Tensor:
    """Σ -log p(target) through the head module's own forward, `rows` tokens at a time; each chunk's logits
    are recomputed in the backward (activation checkpointing, RNG state kept for the adapter's dropout), so
    no more than one chunk's logits are held, as with the kernels."""
    from torch.utils.checkpoint import checkpoint

    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], rows):
        total = total + checkpoint(_chunk_nll, lm_head, h[start:start + rows], t[start:start + rows],
                                   use_reentrant=False)
    return total
