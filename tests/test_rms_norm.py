"""posttrain.rms_norm: DeepSeek-V3's RMSNorm through torch's fused kernel on CUDA, transformers' formula elsewhere."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

from posttrain import rms_norm
from posttrain.modeling import DeepseekV3ForCausalLMWithMTP
from posttrain.presets import preset_config
from posttrain.rms_norm import DeepseekV3FusedRMSNorm, fused_rms_norm_usable, use_fused_rms_norm

BF16_STEP = torch.finfo(torch.bfloat16).eps  # spacing of bf16 values in [1, 2): one step, relative


def _pair(width: int, eps: float, dtype: torch.dtype, device: str = "cpu"):
    """transformers' module and ours with the same weight."""
    g = torch.Generator().manual_seed(0)
    weight = (0.5 + torch.rand(width, generator=g)).to(device, dtype)
    mods = []
    for cls in (DeepseekV3RMSNorm, DeepseekV3FusedRMSNorm):
        m = cls(width, eps=eps).to(device, dtype)
        with torch.no_grad():
            m.weight.copy_(weight)
        mods.append(m)
    return mods


def _run(module, x, gy):
    x = x.detach().clone().requires_grad_(True)
    module.weight.grad = None
    y = module(x)
    y.backward(gy)
    return y.detach(), x.grad, module.weight.grad


def _steps_apart(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| in bf16 steps of `want` (relative spacing at each element)."""
    spacing = BF16_STEP * want.double().abs().clamp_min(1e-30)
    return float(((got.double() - want.double()).abs() / spacing).max())


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """Takes the fused branch on the CPU, where `F.rms_norm` is torch's composite of the fused kernel's formula
    (fp32 inside, one rounding): the branch's arithmetic, without a GPU."""
    monkeypatch.setattr(rms_norm, "FUSED_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(rms_norm, "_checked", {})


def test_every_rms_norm_of_the_model_is_the_fused_class_keeping_its_parameters():
    cfg = preset_config("tiny")
    model = DeepseekV3ForCausalLMWithMTP(cfg)
    norms = {n: m for n, m in model.named_modules() if isinstance(m, DeepseekV3RMSNorm)}
    per_block = 2 + (cfg.q_lora_rank is not None) + 1  # input, post-attention, q_a (with q LoRA), kv_a
    n_mtp = len(model.mtp_layers)
    assert len(norms) == per_block * (cfg.num_hidden_layers + n_mtp) + 1 + 3 * n_mtp  # + final norm, MTP's 3
    assert all(type(m) is DeepseekV3FusedRMSNorm for m in norms.values())
    assert "model.layers.%d.shared_head.norm" % cfg.num_hidden_layers in norms

    # in place: the same Parameter objects and state-dict keys, nothing allocated (meta stays meta)
    with torch.device("meta"):
        plain = torch.nn.Sequential(DeepseekV3RMSNorm(64), torch.nn.Sequential(DeepseekV3RMSNorm(32)))
    before = {k: id(v) for k, v in plain.state_dict(keep_vars=True).items()}
    assert use_fused_rms_norm(plain) == 2
    assert {k: id(v) for k, v in plain.state_dict(keep_vars=True).items()} == before
    assert all(type(m) is DeepseekV3FusedRMSNorm for m in (plain[0], plain[1][0]))
    assert plain[0].weight.is_meta and use_fused_rms_norm(plain) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_the_cpu_it_is_transformers_formula_bit_for_bit(dtype):
    theirs, ours = _pair(320, 1e-6, dtype)
    x = torch.randn(40, 320, dtype=dtype) * 10.0 ** torch.randint(-2, 3, (40, 1))
    gy = torch.randn(40, 320, dtype=dtype)
    assert not fused_rms_norm_usable(x, ours.weight)
    for got, want in zip(_run(ours, x, gy), _run(theirs, x, gy)):
        assert torch.equal(got, want)


def test_the_fused_branch_is_f_rms_norm_with_the_modules_eps_and_weight(fused_on_cpu):
    eps = 0.25  # large against the inputs' mean square (~0.1): a dropped or default eps would show
    theirs, ours = _pair(320, eps, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    x = (0.3 * torch.randn(40, 320, generator=g)).to(torch.bfloat16)
    gy = torch.randn(40, 320, generator=g).to(torch.bfloat16)
    assert fused_rms_norm_usable(x, ours.weight)
    y, dx, dw = _run(ours, x, gy)
    y_eager, dx_eager, dw_eager = _run(theirs, x, gy)

    # the fused formula rounds once: round(x * rstd * w), from float64 here
    x64, w64 = x.double(), ours.weight.detach().double()
    exact = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64
    # round to nearest (half a step) of a value computed in fp32 to within r relative: the mean of 320 squares
    # (all positive: within 319·2^-24 of itself), halved by the rsqrt, the rsqrt and two products
    r = (319 / 2 + 3) * 2.0**-24
    assert _steps_apart(y, exact) <= (r + BF16_STEP / 2 * (1 + r)) / BF16_STEP
    wrong_eps = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
    assert _steps_apart(y, wrong_eps) > 10
    # transformers rounds twice (the normalized x, then the product): at most one step from ours
    assert _steps_apart(y, y_eager) <= 1.0
    assert not torch.equal(y, y_eager)  # the two branches really are different code
    for got, want in ((dx, dx_eager), (dw, dw_eager)):
        assert ((got.double() - want.double()).norm() / want.double().norm()) < 4 * BF16_STEP

    # under autocast the kernel sees x and w as they are; the result has the eager formula's dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours(x), y)
        assert ours(x).dtype == theirs(x).dtype == torch.bfloat16


def test_the_fused_branch_is_not_taken_where_it_does_not_apply(fused_on_cpu, monkeypatch):
    theirs, ours = _pair(64, 1e-6, torch.float32)
    x32 = torch.randn(8, 64)
    # another dtype for x than the weight's (fp32 master weights, bf16 activations): transformers' formula
    assert not fused_rms_norm_usable(x32.to(torch.bfloat16), ours.weight)
    assert fused_rms_norm_usable(x32, ours.weight)
    monkeypatch.setenv(rms_norm.FUSED_RMS_NORM_ENV, "0")
    assert not fused_rms_norm_usable(x32, ours.weight)
    monkeypatch.delenv(rms_norm.FUSED_RMS_NORM_ENV)
    # under torch.compile the generated kernel fuses the eager formula: the compiled graph stays what it was
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not fused_rms_norm_usable(x32, ours.weight)


def test_a_fused_kernel_that_fails_its_start_up_check_is_not_used(fused_on_cpu, monkeypatch, caplog):
    calls, real = [], torch.nn.functional.rms_norm

    def off_by_eps(x, shape, weight=None, eps=None):  # a kernel that ignores eps
        calls.append(1)
        return real(x, shape, weight, 0.5)

    monkeypatch.setattr(rms_norm.F, "rms_norm", off_by_eps)
    theirs, ours = _pair(64, 1e-6, torch.bfloat16)
    x = torch.randn(8, 64).to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="posttrain.rms_norm"):
        assert torch.equal(ours(x), theirs(x))
        assert torch.equal(ours(x), theirs(x))
    assert len(calls) == 1  # checked once per device, then never called
    assert [r.getMessage() for r in caplog.records if "start-up check" in r.getMessage()] == [
        "torch's fused RMSNorm failed its start-up check on cpu (forward differs from the formula by more than one "
        "bf16 step); using transformers' eager RMSNorm there"]


def test_the_start_up_check_passes_torchs_kernel():
    assert rms_norm._start_up_check(torch.device("cpu")) is None
    if torch.cuda.is_available():
        assert rms_norm._start_up_check(torch.device("cuda")) is None


@pytest.mark.gpu
def test_on_cuda_one_fused_kernel_each_way_within_one_step_of_eager_keeping_less():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    theirs, ours = _pair(2048, 1e-6, torch.bfloat16, "cuda")
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn_like(x)
    assert fused_rms_norm_usable(x, ours.weight)  # (its start-up check runs here, outside the op count)
    with Ops() as ops:
        y, dx, dw = _run(ours, x, gy)
    assert "_fused_rms_norm" in ops.names and "_fused_rms_norm_backward" in ops.names
    assert "pow" not in ops.names and "rsqrt" not in ops.names
    y_eager, dx_eager, _ = _run(theirs, x, gy)
    assert _steps_apart(y, y_eager) <= 1.0
    assert ((dx.double() - dx_eager.double()).norm() / dx_eager.double().norm()) < 4 * BF16_STEP

    def saved(module) -> int:
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        xr = x.detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(xr)
        return sum(kept.values())

    # the fused kernel keeps x (bf16) and an fp32 rstd per row; the eager formula an fp32 copy of x and more
    assert saved(ours) <= x.numel() * 2 + x.shape[0] * 4 + ours.weight.numel() * 2
    assert saved(theirs) >= 2 * saved(ours)
