"""Chunked LM head + cross-entropy (issue 13): the main and MTP losses without [tokens, vocab] logits.

`posttrain.modeling.lm_head_cross_entropy` must give the loss and every gradient of today's path
(`lm_head` → fp32 logits → `cross_entropy`) up to fp32 rounding, keep no [tokens, vocab] tensor, and
the model / SFT trainer must use it when nobody reads the logits.
"""

from __future__ import annotations

import ctypes
import gc
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from posttrain.lm_loss import IGNORE_INDEX, lm_head_cross_entropy
from posttrain.modeling import DeepseekV3ForCausalLMWithMTP, _token_mean_ce

pytestmark = pytest.mark.usefixtures("one_torch_thread")
U = 2.0**-24  # fp32 unit roundoff


def _problem(n: int, hidden: int, vocab: int, device, seed: int = 0, ignore: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    head = nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=g) * 3 / math.sqrt(hidden))  # |logits| up to ~15
    t = torch.randint(0, vocab, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore] = IGNORE_INDEX
    return h.to(device).requires_grad_(), head.to(device), t.to(device)


def _loss_and_grads(fn, h, head, t):
    h.grad, head.weight.grad = None, None
    loss = fn(h, head, t)
    loss.backward()
    return loss.detach(), h.grad.clone(), head.weight.grad.clone()


def _error_bounds(h, head, t):
    """Elementwise fp32 error bounds between two evaluations that differ only in summation order.

    Each logit is a length-H dot product and each log-sum-exp sums V terms, so a per-token log-prob
    (and hence each softmax probability, relatively) is off by at most e_tok = (H + 2 log2 V + 8) u
    (max|z| + log V). The loss is a mean of n such terms: + n u · loss. Gradients are sums of n
    (dW) or V (dh) products (p - y)·x / n: off by (n u + e_tok) resp. (V u + e_tok) times the sum of
    the absolute terms — a chunk dropped, doubled or misaligned is off by the terms themselves."""
    with torch.no_grad():
        z = head(h).float()
        n_tok, hidden = h.shape
        vocab = z.shape[1]
        valid = t != IGNORE_INDEX
        n = int(valid.sum())
        p = torch.softmax(z, -1)[valid]
        y = nn.functional.one_hot(t[valid], vocab).float()
        absterm = (p + y) / n  # |p - y| <= p + y
        e_tok = (hidden + 2 * math.log2(vocab) + 8) * U * (float(z.abs().max()) + math.log(vocab))
        loss = float(_token_mean_ce(z, t))
        loss_tol = e_tok + n * U * loss
        h_tol = torch.zeros_like(h)
        h_tol[valid] = (vocab * U + e_tok) * (absterm @ head.weight.abs())
        w_tol = (n * U + e_tok) * (absterm.t() @ h[valid].abs())
    return loss_tol, h_tol, w_tol


def _ref(h, head, t):
    return _token_mean_ce(head(h), t)


@pytest.mark.parametrize("backend, chunk", [("fused", 1000), ("recompute", 1000), ("trl", 384)])
def test_chunked_ce_equals_full_logits_in_value_and_gradients(backend, chunk, device):
    """4100 tokens (two of TRL's 4096-token tiles; five 1000-token chunks for the torch backend),
    V = 1000 cut into uneven vocabulary tiles (384, 384, 232), 30% ignored targets."""
    h, head, t = _problem(4100, 16, 1000, device)
    ref = _loss_and_grads(_ref, h, head, t)
    got = _loss_and_grads(lambda a, b, c: lm_head_cross_entropy(a, b, c, backend=backend, chunk=chunk), h, head, t)
    loss_tol, h_tol, w_tol = _error_bounds(h, head, t)
    assert abs(float(got[0]) - float(ref[0])) <= loss_tol, (float(got[0]), float(ref[0]), loss_tol)
    assert ((got[1] - ref[1]).abs() <= h_tol).all(), float(((got[1] - ref[1]).abs() - h_tol).max())
    assert ((got[2] - ref[2]).abs() <= w_tol).all(), float(((got[2] - ref[2]).abs() - w_tol).max())
    assert got[1][t == IGNORE_INDEX].abs().max() == 0  # ignored positions get no gradient
    # the bound is tight enough to see a real mistake: the last 4 tokens' share of dW dropped
    kept = (t[:4096] != IGNORE_INDEX).sum() / (t != IGNORE_INDEX).sum()
    lost = _loss_and_grads(_ref, h[:4096].detach().requires_grad_(), head, t[:4096])[2] * kept
    assert not ((lost - ref[2]).abs() <= w_tol).all()


def test_chunked_ce_num_items_and_all_ignored(device):
    h, head, t = _problem(300, 8, 64, device)
    n = int((t != IGNORE_INDEX).sum())
    total = lm_head_cross_entropy(h, head, t, num_items=1)
    mean = lm_head_cross_entropy(h, head, t)
    torch.testing.assert_close(total / n, mean, rtol=1e-6, atol=0)
    empty = torch.full_like(t, IGNORE_INDEX)
    h.grad = None
    loss = lm_head_cross_entropy(h, head, empty)  # a micro-batch without targets: 0, not NaN
    loss.backward()
    assert float(loss.detach()) == 0.0 and h.grad.abs().max() == 0


def test_chunked_ce_under_bf16_autocast_computes_logits_like_lm_head(device):
    """Under autocast the reference's logits are bf16 (`lm_head` autocasts); the chunked path makes
    its tiles in the autocast dtype too. Same bf16 products, so the two agree far inside bf16's
    rounding (2^-8 relative), where fp32 tiles would not be the reference's computation."""
    h, head, t = _problem(512, 32, 2048, device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        ref = _loss_and_grads(_ref, h, head, t)
        got = _loss_and_grads(lambda a, b, c: lm_head_cross_entropy(a, b, c, backend="fused", chunk=100), h, head, t)
    fp32 = _loss_and_grads(_ref, h, head, t)
    assert abs(float(got[0]) - float(ref[0])) <= 1e-5 * float(ref[0])
    assert abs(float(fp32[0]) - float(ref[0])) > 10 * abs(float(got[0]) - float(ref[0]))
    torch.testing.assert_close(got[2], ref[2], rtol=2e-2, atol=2e-2 * float(ref[2].abs().max()))


# ---------------------------------------------------------------------------------------------
# memory


def _rss(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _peak_above_current(fn) -> int:
    """Peak resident memory of `fn()` above the resident memory before it, in this process: freed
    heap is handed back first (malloc_trim) and the kernel's high-water mark is reset (Linux
    /proc/self/clear_refs "5")."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return _rss("VmHWM") - base


@pytest.mark.parametrize("backend", ["fused", "recompute"])
def test_chunked_ce_peak_memory_stays_below_one_logits_tensor(backend):
    """2048 tokens × 32768 vocabulary: one fp32 logits tensor is 256 MiB. Today's path keeps the
    logits, their log-softmax and the logits' gradient (measured 768 MiB above the start); the
    chunked path keeps 32 MiB tiles and the weight gradient (measured 65-73 MiB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        ctypes.CDLL("libc.so.6")
    except OSError as e:
        pytest.skip(f"needs Linux /proc/self/clear_refs and glibc: {e}")
    n, vocab = 2048, 32768
    h, head, t = _problem(n, 64, vocab, "cpu", ignore=0.0)
    logits_bytes = n * vocab * 4

    def run(fn):
        def step():
            h.grad, head.weight.grad = None, None
            fn(h, head, t).backward()
        return step

    run(_ref)()  # first-call allocations (thread pools, kernels) out of the measurement
    chunked = _peak_above_current(run(lambda a, b, c: lm_head_cross_entropy(a, b, c, backend=backend)))
    full = _peak_above_current(run(_ref))
    assert chunked < logits_bytes < full, (chunked / 2**20, logits_bytes / 2**20, full / 2**20)
    assert full > 2 * logits_bytes  # the measurement sees the full path's logits, log-softmax and gradient


# ---------------------------------------------------------------------------------------------
# the model


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any op (forward or backward) produces. torch internals: the
    dispatch-mode API of torch 2.x (torch/utils/_python_dispatch.py)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def _packed_batch(vocab: int, device, seq: int = 256):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, seq), generator=g)
    lengths = [[100, 156], [40, 88, 128]]
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    labels = ids.clone()
    labels[:, :12] = IGNORE_INDEX  # a prompt
    for r, row in enumerate(lengths):  # each sample's first token (as PackedCollator does)
        labels[r, torch.tensor([0] + list(torch.tensor(row).cumsum(0)[:-1]))] = IGNORE_INDEX
    return ids.to(device), pos.to(device), labels.to(device)


def test_model_losses_and_every_gradient_match_the_logits_path(tiny_model_dir, device):
    """return_logits=False: main and MTP losses through the chunked head, on packed rows; equal to
    the default path's within fp32 rounding carried through the backward (measured 7e-7 of each
    gradient's largest entry; bound 1e-5), no logits returned."""
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32).to(device)
    ids, pos, labels = _packed_batch(model.config.vocab_size, device)

    def run(return_logits: bool):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels, position_ids=pos, use_cache=False, return_logits=return_logits)
        (out.loss + 0.3 * out.mtp_loss).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    ref, ref_grads = run(True)
    got, grads = run(False)
    assert ref.logits is not None and len(ref.mtp_logits) == 1
    assert got.logits is None and got.mtp_logits is None
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.mtp_loss, ref.mtp_loss, rtol=1e-6, atol=0)
    assert grads.keys() == ref_grads.keys()
    assert "lm_head.weight" in grads and f"model.layers.{model.config.num_hidden_layers}.eh_proj.weight" in grads
    for name, g in grads.items():
        scale = float(ref_grads[name].abs().max())
        assert float((g - ref_grads[name]).abs().max()) <= 1e-5 * scale, name
    # without labels the logits are the output, whatever return_logits says
    with torch.no_grad():
        assert model(input_ids=ids, position_ids=pos, use_cache=False, return_logits=False).logits is not None


def test_model_never_makes_a_tokens_by_vocab_tensor(tiny_model_dir, device, monkeypatch):
    """No op of the forward or backward produces a [tokens, vocab] tensor with return_logits=False;
    the default path does (so the check sees one when it is there). 512 tokens × 65536 vocabulary in
    chunks of 128 tokens (2^23 logits: the CPU's budget, set for CUDA's too, whose 2^29 would hold these
    512 tokens in one chunk)."""
    from posttrain import lm_loss
    from posttrain.presets import preset_config

    monkeypatch.setattr(lm_loss, "_CHUNK_ELEMS_GPU", lm_loss._CHUNK_ELEMS_CPU)

    vocab = 65536
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLMWithMTP(preset_config("tiny", vocab_size=vocab)).to(device)
    ids, pos, labels = _packed_batch(vocab, device)
    tokens_by_vocab = ids.numel() * vocab
    largest = {}
    for return_logits in (True, False):
        mode = _LargestTensor()
        with mode:
            out = model(input_ids=ids, labels=labels, position_ids=pos, use_cache=False, return_logits=return_logits)
            (out.loss + 0.3 * out.mtp_loss).backward()
        largest[return_logits] = mode.largest
        model.zero_grad(set_to_none=True)
    assert largest[True] >= tokens_by_vocab > 1.5 * largest[False], (largest, tokens_by_vocab)


def test_grpo_style_mtp_call_still_returns_logits(tiny_model_dir):
    """GRPO's MTP acceptance rate reads `_mtp(...)[0][0]` (posttrain/grpo/trainer.py): the default
    keeps the logits."""
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids, _, labels = _packed_batch(model.config.vocab_size, "cpu")
    with torch.no_grad():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        logits, loss = model._mtp(hidden, ids, None, labels, None, detach_input=False)
        none, loss2 = model._mtp(hidden, ids, None, labels, None, detach_input=False, return_logits=False)
    assert logits[0].shape == (*ids.shape, model.config.vocab_size) and none is None
    torch.testing.assert_close(loss2, loss, rtol=1e-6, atol=0)


def test_sft_trainer_trains_and_evaluates_without_logits_and_matches_the_logits_path(tiny_model_dir, tmp_path):
    """`chunked_lm_loss` (default on): the trainer's forward returns no logits in training and in
    loss-only evaluation; 3 optimizer steps log the same losses and land on the same weights as
    with `chunked_lm_loss: false` (fp32 rounding only: measured weight differences <= 1 ulp)."""
    import json

    from data_pipelines.arith_task import sft_rows
    from posttrain.recipe import build_config
    from posttrain.sft import SFTRecipeConfig, build_trainer, run_sft

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(48)))
    runs = {}
    for chunked in (True, False):
        cfg = build_config(SFTRecipeConfig, dict(
            model_name_or_path=str(tiny_model_dir), dataset_name=str(data), output_dir=str(tmp_path / f"c{chunked}"),
            # SGD: the weights move linearly in the gradients (Adam's normalisation would blow fp32
            # rounding of near-zero gradient entries up to ~lr)
            max_steps=3, learning_rate=1e-1, optim="sgd", warmup_steps=0, per_device_train_batch_size=2, max_length=256,
            logging_steps=1, save_strategy="no", save_final_model=False, seed=0, disable_tqdm=True,
            chunked_lm_loss=chunked))
        trainer = build_trainer(cfg)
        seen: list[tuple[bool, bool]] = []
        trainer.model.register_forward_hook(lambda m, a, out: seen.append((m.training, out.logits is None)))
        run_sft(cfg, trainer=trainer)
        metrics = trainer.evaluate(eval_dataset=trainer.train_dataset.select(range(2)))
        assert math.isfinite(metrics["eval_loss"]) and "eval_mtp_loss" in metrics
        logs = [h for h in trainer.state.log_history if "lm_loss" in h and "eval_loss" not in h]
        runs[chunked] = (seen, logs, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    seen, logs, state = runs[True]
    assert seen and all(no_logits for _, no_logits in seen)  # training and evaluation steps alike
    assert any(train for train, _ in seen) and any(not train for train, _ in seen)
    assert not any(no_logits for _, no_logits in runs[False][0])
    assert len(logs) == 3
    for a, b in zip(logs, runs[False][1]):
        for key in ("lm_loss", "mtp_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)
    for k, v in state.items():
        torch.testing.assert_close(v, runs[False][2][k], rtol=1e-6, atol=1e-7, msg=k)  # measured <= 7.5e-9


# ---------------------------------------------------------------------------------------------
# CUDA fast path (the fused head's Triton kernel; TRL's for comparison)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "trl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backends_match_reference(dtype, backend):
    """On CUDA `auto` is the fused head with its Triton kernel; it and TRL's Triton kernel: fp32 within
    the derived bound, bf16 weights within bf16 rounding of the logits (the reference's are bf16 too)."""
    from posttrain.lm_loss import _use_triton

    device = torch.device("cuda")
    assert _use_triton(device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the derived bound
    h, head, t = _problem(8192, 256, 50000, device)
    if dtype == torch.bfloat16:
        head = head.to(dtype)
        h = h.detach().to(dtype).requires_grad_()
    ref = _loss_and_grads(_ref, h, head, t)
    got = _loss_and_grads(lambda a, b, c: lm_head_cross_entropy(a, b, c, backend=backend), h, head, t)
    if dtype == torch.float32:
        loss_tol, h_tol, w_tol = _error_bounds(h, head, t)
        assert abs(float(got[0]) - float(ref[0])) <= loss_tol
        assert ((got[1] - ref[1]).abs() <= h_tol).all() and ((got[2] - ref[2]).abs() <= w_tol).all()
    else:
        assert abs(float(got[0]) - float(ref[0])) <= 2**-8 * float(ref[0])
        for a, b in zip(got[1:], ref[1:]):
            assert float((a.float() - b.float()).norm() / b.float().norm()) < 2e-2


def test_sft_config_picks_the_head_implementation(tiny_model_dir, tmp_path, monkeypatch):
    """`lm_loss_backend` reaches the model's loss (here `fused` on the CPU, whose default is `recompute`);
    an unknown name is a config error that names the field and the choices."""
    import json

    from data_pipelines.arith_task import sft_rows
    from posttrain import lm_loss
    from posttrain.errors import ConfigError
    from posttrain.recipe import build_config
    from posttrain.sft import SFTRecipeConfig, build_trainer, run_sft

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(8)))
    base = dict(model_name_or_path=str(tiny_model_dir), dataset_name=str(data), output_dir=str(tmp_path / "out"),
                max_steps=1, per_device_train_batch_size=2, max_length=256, save_strategy="no",
                save_final_model=False, disable_tqdm=True, report_to="none")
    with pytest.raises(ConfigError, match="lm_loss_backend must be one of auto, fused, recompute, trl, got 'liger'"):
        build_config(SFTRecipeConfig, dict(base, lm_loss_backend="liger"))
    calls = {"_FusedLinearCE": 0, "_RecomputeLinearCE": 0}
    for name in calls:
        real = getattr(lm_loss, name).apply
        monkeypatch.setattr(getattr(lm_loss, name), "apply",
                            lambda *a, _n=name, _r=real: calls.__setitem__(_n, calls[_n] + 1) or _r(*a))
    cfg = build_config(SFTRecipeConfig, dict(base, lm_loss_backend="fused"))
    run_sft(cfg, trainer=build_trainer(cfg))
    assert calls["_FusedLinearCE"] >= 2 and calls["_RecomputeLinearCE"] == 0, calls  # main + MTP head
