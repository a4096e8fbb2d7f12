"""The fused LM head + cross-entropy (posttrain.lm_loss): gradients made in the forward, three GEMMs a head.

What it promises, each checked here (the value and gradients against the full-logits path, on packed
model rows, are in tests/test_chunked_loss.py):
* one projection of each chunk's logits: 3 matmuls per chunk over forward + backward (TRL's kernel takes 4);
* value only, 1 matmul per chunk, under `no_grad`; no weight GEMM for a frozen head;
* the backward's scale is applied in fp32 to bf16 gradients (not rounded to bf16 first);
* the Triton kernel that turns a chunk's logits into their gradient equals the torch one (CPU interpreter,
  in a fresh process: ``python tests/test_lm_loss.py`` with ``TRITON_INTERPRET=1``) and compiles for an H100.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

import pytest
import torch
from subprocess_env import run_in_triton_interpreter  # noqa: E402
from torch import nn

from posttrain import lm_loss
from posttrain.lm_loss import IGNORE_INDEX, lm_head_cross_entropy, softmax_grad_

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _problem(n: int, hidden: int, vocab: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(dtype).requires_grad_()
    head = nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * 3 / math.sqrt(hidden))
    t = torch.randint(0, vocab, (n,), generator=g)
    t[torch.rand(n, generator=g) < 0.2] = IGNORE_INDEX
    return h, head.to(dtype), t


class _CountMatmuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the matrix products any op runs (forward or backward). torch internals: the dispatch-mode
    API of torch 2.x (torch/utils/_python_dispatch.py) and aten's matmul op names."""


    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).split(".")[1] in ("mm", "addmm", "addmm_", "bmm"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _matmuls(fn) -> int:
    mode = _CountMatmuls()
    with mode:
        fn()
    return mode.count


@pytest.mark.parametrize("backend, chunks, per_chunk", [("fused", 4, 3), ("recompute", 4, 4), ("trl", 4, 4)])
def test_fused_head_projects_each_chunk_once_the_others_twice(backend, chunks, per_chunk):
    """400 valid tokens; fused and recompute: 4 chunks of 100 tokens; TRL: 4 vocabulary tiles of 64 (its
    tokens go in one 4096-token tile). Forward + backward: 3 matmuls per chunk (logits, dh, dW) against 4
    (the logits again in the backward)."""
    h, head, t = _problem(400, 16, 256)
    t[:] = 1
    chunk = 64 if backend == "trl" else 100

    def step():
        lm_head_cross_entropy(h, head, t, backend=backend, chunk=chunk).backward()

    assert _matmuls(step) == chunks * per_chunk


def test_auto_is_fused_on_gpus_and_recompute_on_the_cpu(monkeypatch):
    """`auto`: the fused head where its speed counts (CUDA); on the CPU the recompute path, whose rounding
    the demo's acceptance was measured with (posttrain/lm_loss.py)."""
    seen = []
    for name in ("_FusedLinearCE", "_RecomputeLinearCE"):
        real = getattr(lm_loss, name).apply
        monkeypatch.setattr(getattr(lm_loss, name), "apply", lambda *a, _n=name, _r=real: seen.append(_n) or _r(*a))
    h, head, t = _problem(50, 8, 32)
    lm_head_cross_entropy(h, head, t)
    assert seen == ["_RecomputeLinearCE"]
    if torch.cuda.is_available():
        lm_head_cross_entropy(h.detach().cuda(), head.cuda(), t.cuda())
        assert seen[-1] == "_FusedLinearCE"


def test_no_grad_computes_the_value_only_and_a_frozen_head_gets_no_weight_gemm():
    h, head, t = _problem(300, 16, 256)
    def loss():
        return lm_head_cross_entropy(h, head, t, chunk=100, backend="fused")

    with torch.no_grad():
        assert _matmuls(loss) == 3
        value = loss()
    torch.testing.assert_close(value, loss().detach(), rtol=0, atol=0)
    head.weight.requires_grad_(False)  # a LoRA run freezes the head
    h.grad = None
    assert _matmuls(lambda: loss().backward()) == 3 * 2
    assert head.weight.grad is None and h.grad is not None


class _WeightSizedFills(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that fill a tensor of ``numel`` elements with a constant (zeros, zero_, fill_)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.fills = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in ("zeros", "zero_", "fill_", "new_zeros", "zeros_like") and out.numel() == self.numel:
            self.fills.append(name)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_heads_weight_gradient_starts_at_its_first_chunk_not_at_zeros(monkeypatch, dtype):
    """The fp32 weight-gradient accumulator is written by the first chunk's product, not zero-filled and added
    to (a 1.3 GB fill and a 1.3 GB read per head and step at Moonlight's head): no fill of a weight-sized
    buffer, and bit for bit the gradient that adding every chunk to zeros gives."""
    h, head, t = _problem(300, 16, 256, dtype)
    fills = _WeightSizedFills(head.weight.numel())
    with fills:
        lm_head_cross_entropy(h, head, t, chunk=100, backend="fused").backward()
    assert fills.fills == []
    first_chunk_writes = head.weight.grad.clone()
    real = lm_loss._addmm_fp32_

    def from_zeros(acc, a, b, accumulate=True):  # the previous code: a zero-filled accumulator, every chunk added
        if not accumulate:
            acc.zero_()
        real(acc, a, b, accumulate=True)

    monkeypatch.setattr(lm_loss, "_addmm_fp32_", from_zeros)
    head.weight.grad = None
    lm_head_cross_entropy(h, head, t, chunk=100, backend="fused").backward()
    assert torch.equal(first_chunk_writes, head.weight.grad)
    empty = lm_head_cross_entropy(h[:0], head, t[:0], backend="fused")  # no rows: a zero gradient, not garbage
    head.weight.grad = None
    empty.backward()
    assert not head.weight.grad.any()


def test_the_backward_scale_is_applied_in_fp32_to_bf16_gradients():
    """The incoming gradient of a mean loss is 1/n; bf16 holds 1/3 as 0.333984375. The stored bf16
    gradients are multiplied by the fp32 scale (one bf16 rounding of the product), so the result equals
    the fp32 product rounded once, not the product with a bf16-rounded scale."""
    x = (torch.arange(1, 4097, dtype=torch.float32) / 4096).to(torch.bfloat16).reshape(64, 64)
    scale = torch.tensor(1 / 3)
    want = (x.float() * scale).to(torch.bfloat16)
    assert torch.equal(lm_loss._scaled(x, scale, chunk_elems=1000), want)
    assert not torch.equal(x * scale.to(torch.bfloat16), want)  # what rounding the scale first gives


def test_bf16_weights_match_the_full_logits_path_within_bf16_rounding():
    """bf16 hidden states and head: the same loss as bf16 logits → fp32 cross-entropy, gradients within
    bf16 rounding (the weight gradient is rounded once more than autograd's: stored, then scaled)."""
    h, head, t = _problem(512, 32, 1000, torch.bfloat16)
    valid = t != IGNORE_INDEX

    def ref():
        logits = head(h).float()
        return nn.functional.cross_entropy(logits[valid], t[valid])

    def got():
        return lm_head_cross_entropy(h, head, t, chunk=128, backend="fused")

    out = {}
    for name, fn in (("ref", ref), ("got", got)):
        h.grad, head.weight.grad = None, None
        loss = fn()
        loss.backward()
        out[name] = (loss.detach(), h.grad.float(), head.weight.grad.float())
    assert abs(float(out["got"][0]) - float(out["ref"][0])) <= 1e-5 * float(out["ref"][0])
    for a, b in zip(out["got"][1:], out["ref"][1:]):
        assert float((a - b).norm() / b.norm()) < 2**-7


def test_one_host_sync_per_call():
    """Selecting the valid targets is the call's only wait for the GPU on CUDA (one `nonzero`; boolean
    indexing of the hidden states and the targets would make two), forward and backward."""
    from tests.host_sync import HostSyncRecorder

    h, head, t = _problem(300, 16, 256)
    for backend in ("fused", "recompute"):
        with HostSyncRecorder() as rec:
            lm_head_cross_entropy(h, head, t, chunk=100, backend=backend).backward()
        assert len(rec.syncs) == 1 and "nonzero" in rec.syncs[0], (backend, rec.syncs)


# ---------------------------------------------------------------------------------------------
# the Triton kernel


def run_cases() -> dict:
    """The Triton kernel against the torch fold on logits with V not a multiple of its block, large and
    small logits, fp32 and bf16, with and without the gradient."""
    results = {}
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for write_grad in (True, False):
            z = (torch.randn(7, 5000, generator=g) * 8).to(dtype)
            z[0, :] = -30.0  # a flat row
            z[1, 17] = 60.0  # one dominant logit
            t = torch.randint(0, 5000, (7,), generator=g)
            t[1] = 17
            a, b = z.clone(), z.clone()
            nll_torch = softmax_grad_(a, t, write_grad=write_grad, kernel="torch")
            nll_triton = softmax_grad_(b, t, write_grad=write_grad, kernel="triton")
            # fp32: sums of 5000 exps in two orders, |logits| <= 60: a few ulp of the log-sum-exp
            nll_err = float((nll_torch - nll_triton).abs().max())
            grad_err = float((a.float() - b.float()).abs().max())
            results[f"{dtype} grad={write_grad}"] = {"nll_err": nll_err, "grad_err": grad_err,
                                                     "unchanged": bool(torch.equal(b, z)),
                                                     "grad_sums": float(b.float().sum(1).abs().max())}
    # the backward's scaling: one fp32 product, one rounding to bf16, as the torch path
    x = (torch.randn(300, 70, generator=g) * 3).to(torch.bfloat16)
    scale = torch.tensor(1 / 3)
    # ... and ties: 1.0 * (1 + 2^-8) lies halfway between two bf16 values (rounds to the even one, 1.0); times 1.5,
    # 1 + k/128 lands halfway for every k = 2 mod 4 at or above 2.0, half of them rounding up
    ties = torch.cat([x.reshape(-1), (1 + torch.arange(128) / 128).to(torch.bfloat16)])
    results["scale bf16"] = {"equal": all(
        torch.equal(lm_loss._scaled(ties, s, kernel="triton"), lm_loss._scaled(ties, s, chunk_elems=1000, kernel="torch"))
        for s in (scale, torch.tensor(1 + 2**-8), torch.tensor(1.5)))}
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return run_in_triton_interpreter(__file__)


def test_triton_softmax_gradient_equals_the_torch_fold_in_the_interpreter(interpreted):
    """nll within fp32 summation-order rounding (log-sum-exp of 5000 terms up to 60: 2^-24·(60 + log 5000)·
    log2(5000)·2 < 1e-4); the gradient p - y within that error of p (p = exp(z - lse), p ≤ 1) plus one
    rounding of its dtype (measured: 0 and 1.2e-6 in fp32); each
    gradient row sums to 0 (softmax sums to 1, minus the target's 1); without `write_grad` the logits stay."""
    interpreted = dict(interpreted)
    assert interpreted.pop("scale bf16") == {"equal": True}  # the backward's scaling kernel: bit for bit
    for name, r in interpreted.items():
        bf16 = "bfloat16" in name
        assert r["nll_err"] <= 1e-4, name
        if name.endswith("grad=True"):
            assert r["grad_err"] <= (2**-8 if bf16 else 1e-4 + 2**-23), name
            assert r["grad_sums"] <= (5000 * 2**-9 if bf16 else 1e-4), name
            assert not r["unchanged"], name
        else:
            assert r["unchanged"], name


@pytest.mark.gpu
def test_triton_softmax_gradient_on_cuda_matches_the_torch_fold():
    z = torch.randn(64, 163840, device="cuda", dtype=torch.bfloat16) * 4
    t = torch.randint(0, 163840, (64,), device="cuda")
    a, b = z.clone(), z.clone()
    nll_a = softmax_grad_(a, t, kernel="torch")
    nll_b = softmax_grad_(b, t, kernel="triton")
    assert float((nll_a - nll_b).abs().max()) <= 1e-3
    assert float((a.float() - b.float()).abs().max()) <= 2**-8


def test_the_kernel_compiles_for_the_h100_with_vector_loads_and_stores():
    """Triton's wheel carries ptxas: the kernel compiles for sm_90 here. bf16 logits are read and written in
    vectors (the kernel is memory-bound: two reads and one write of the chunk)."""
    pytest.importorskip("triton")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = lm_loss._softmax_grad_kernel
    types = {"z_ptr": "*bf16", "t_ptr": "*i64", "nll_ptr": "*fp32", "stride": "i32", "V": "i32"}
    signature, attrs = {}, {}
    for i, param in enumerate(kernel.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        else:
            signature[param.name] = types[param.name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # aligned pointers, 163840 and 129280 divisible by 16
    src = ASTSource(fn=kernel, signature=signature, constexprs={"WRITE_GRAD": True, "BLOCK": lm_loss._FOLD_BLOCK},
                    attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert re.search(r"ld\.global(\.\w+)*\.v4", ptx)
    assert re.search(r"st\.global(\.\w+)*\.v4", ptx)
    scale = lm_loss._scale_bf16_kernel
    sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "s_ptr": "*fp32", "n": "i64", "BLOCK": "constexpr"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(scale.params) if p.name in ("x_ptr", "out_ptr", "n")}
    ptx = triton.compile(ASTSource(fn=scale, signature=sig, constexprs={"BLOCK": 4096}, attrs=attrs),
                         target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    assert re.search(r"ld\.global(\.\w+)*\.v4", ptx) and re.search(r"st\.global(\.\w+)*\.v4", ptx)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the tests in this file do)")
    print(json.dumps(run_cases()))


@pytest.mark.parametrize("backend", ["recompute", "fused"])
def test_a_lora_wrapped_head_is_projected_through_its_adapter(backend):
    """peft's LoRA `lm_head` is not an nn.Linear, and its `.weight` is the frozen base weight: read
    directly, the loss left the adapter out and it never trained (SFT with `lora_target_modules:
    [lm_head, ...]` exported an unchanged head)."""
    from peft import LoraConfig, inject_adapter_in_model

    h, head, t = _problem(50, 8, 32)
    holder = nn.Module()
    holder.lm_head = head
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"]), holder)
    lora = holder.lm_head
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()  # a trained adapter: not the zero init
    reference = nn.functional.cross_entropy(lora(h).float(), t, ignore_index=IGNORE_INDEX)
    want = torch.autograd.grad(reference, [h, lora.lora_A["default"].weight, lora.lora_B["default"].weight])
    loss = lm_head_cross_entropy(h, lora, t, backend=backend, chunk=16)
    got = torch.autograd.grad(loss, [h, lora.lora_A["default"].weight, lora.lora_B["default"].weight])
    torch.testing.assert_close(loss, reference)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
