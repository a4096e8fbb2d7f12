"""Aux-loss-free balancing (report §2.1.2) and the sequence-wise balance loss (eq. 17-20)."""

from __future__ import annotations

import pytest
import torch

from posttrain.balancing import ExpertLoadBalancer, _seq_balance_term, _sequence_groups, find_routers
from posttrain.modeling import DeepseekV3ForCausalLMWithMTP, sample_ids_from_positions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(tiny_model_dir, **kw):
    torch.manual_seed(0)
    return DeepseekV3ForCausalLMWithMTP.from_pretrained(tiny_model_dir, dtype=torch.float32, **kw).train()


def _batch(seed=0, b=2, n=48, pad=8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (b, n), generator=g)
    pos = torch.cat([torch.arange(20), torch.arange(n - 20 - pad), torch.arange(pad)]).expand(b, -1).contiguous()
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[:, n - pad :] = False  # a pad segment
    return ids, pos, mask


def _manual_counts(model, ids, pos, mask):
    """Expert counts recomputed from each router's topk output, real tokens only."""
    got = []
    hooks = []
    for _, _, r in find_routers(model):
        hooks.append(r.register_forward_hook(lambda m, a, out: got.append(out[2])))
    with torch.no_grad():
        model(ids, position_ids=pos, labels=ids, use_cache=False)
    for h in hooks:
        h.remove()
    flat = mask.reshape(-1)
    return torch.stack([torch.bincount(t[flat].reshape(-1), minlength=8).float() for t in got])


def test_routers_found_including_mtp(tiny_model_dir):
    model = _model(tiny_model_dir)
    layers = [i for i, _, _ in find_routers(model)]
    cfg = model.config
    # MoE layers from first_k_dense_replace, plus the MTP module's block at index num_hidden_layers
    assert layers == list(range(cfg.first_k_dense_replace, cfg.num_hidden_layers + 1))


def test_counts_real_tokens_only(tiny_model_dir):
    model = _model(tiny_model_dir)
    ids, pos, mask = _batch()
    expected = _manual_counts(model, ids, pos, mask)
    bal = ExpertLoadBalancer(model, bias_update_speed=0.0)
    with bal.batch(token_mask=mask):
        out = model(ids, position_ids=pos, labels=ids, use_cache=False)
    (out.loss + out.mtp_loss).backward()
    assert torch.equal(bal._counts, expected)
    assert bal._counts.sum(-1).tolist() == [mask.sum().item() * model.config.num_experts_per_tok] * 2
    # eval-mode forwards (generation, scoring) are not training traffic
    model.eval()
    with torch.no_grad():
        model(ids, position_ids=pos, use_cache=False)
    assert torch.equal(bal._counts, expected)
    bal.remove()


def test_gradient_checkpointing_does_not_double_count(tiny_model_dir):
    model = _model(tiny_model_dir)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, pos, mask = _batch(1)
    expected = _manual_counts(model, ids, pos, mask)
    calls = []
    h = find_routers(model)[0][2].register_forward_hook(lambda *a: calls.append(1))
    bal = ExpertLoadBalancer(model, bias_update_speed=0.0, seq_balance_alpha=1e-2)
    with bal.batch(token_mask=mask, sample_ids=sample_ids_from_positions(pos)):
        out = model(ids, position_ids=pos, labels=ids, use_cache=False)
        n_forward = len(calls)
        loss = out.loss + bal.sequence_balance_loss()
    loss.backward()
    h.remove()
    assert len(calls) == 2 * n_forward  # the backward did recompute the routers …
    assert torch.equal(bal._counts, expected)  # … and those were not counted
    assert model.model.layers[1].mlp.gate.weight.grad is not None


def _skew_routers(model, ids, pos, expert=0, scale=6.0):
    """Point one expert's router row along the mean routed hidden state: it wins most tokens."""
    inputs = {}
    hooks = [r.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for i, (_, _, r) in enumerate(find_routers(model))]
    with torch.no_grad():
        model(ids, position_ids=pos, labels=ids, use_cache=False)  # labels: the MTP block runs too
        for h in hooks:
            h.remove()
        for i, (_, _, r) in enumerate(find_routers(model)):
            mean = inputs[i].mean(0)
            r.weight[expert] = scale * mean / mean.norm() ** 2


def test_bias_update_reduces_maxvio_on_skewed_router(tiny_model_dir):
    model = _model(tiny_model_dir)
    ids, pos, mask = _batch(2, b=4, n=64)
    _skew_routers(model, ids, pos)
    bal = ExpertLoadBalancer(model, bias_update_speed=0.02)
    before = bal.biases()
    vios = []
    for _ in range(30):
        with bal.batch(token_mask=mask), torch.no_grad():
            model(ids, position_ids=pos, labels=ids, use_cache=False)
        vios.append(bal.step()["moe/maxvio"])
    after = bal.biases()
    assert vios[0] > 1.5, vios  # the skew is real
    assert max(vios[-5:]) < 0.6 * vios[0], vios
    assert after[:, 0].max() < before[:, 0].max()  # the overloaded expert's bias went down
    assert len(bal.history) == 30 and torch.allclose(bal.history[0][1].sum(-1), torch.ones(2))
    bal.remove()


def test_zero_speed_freezes_bias_bit_exactly(tiny_model_dir):
    model = _model(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, pos, mask = _batch(3)
    bal = ExpertLoadBalancer(model, bias_update_speed=0.0, seq_balance_alpha=1e-3)
    before = [r.e_score_correction_bias.clone() for _, _, r in bal.routers]
    gate_before = bal.routers[0][2].weight.detach().clone()
    for _ in range(3):
        with bal.batch(token_mask=mask, sample_ids=sample_ids_from_positions(pos)):
            out = model(ids, position_ids=pos, labels=ids, use_cache=False)
            loss = out.loss + out.mtp_loss + bal.sequence_balance_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        metrics = bal.step()
        assert metrics["moe/maxvio"] >= 0
    assert all(torch.equal(b, r.e_score_correction_bias) for b, (_, _, r) in zip(before, bal.routers))
    assert not torch.equal(gate_before, bal.routers[0][2].weight)  # the router itself did train
    bal.remove()


def _term(logits, topk, seq, mask, num_experts, top_k):
    """One layer's sequence-wise balance term for sequence ids `seq` and token mask `mask`."""
    return _seq_balance_term(logits, topk, _sequence_groups(seq, mask), num_experts, top_k)


def _naive_seq_balance(logits, topk, seq, mask, n_exp, k):
    total, n = 0.0, 0
    for s in seq.unique():
        sel = (seq == s) & mask
        t = int(sel.sum())
        if t == 0:
            continue
        sc = logits[sel].sigmoid()
        p = (sc / sc.sum(-1, keepdim=True)).mean(0)
        cnt = torch.zeros(n_exp)
        for row in topk[sel]:
            cnt[row] += 1
        f = n_exp / (k * t) * cnt
        total = total + (f * p).sum()
        n += 1
    return total / n


def test_sequence_balance_loss_matches_definition():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(30, 8, generator=g, requires_grad=True)
    topk = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(30)])
    seq = torch.tensor([0] * 10 + [1] * 12 + [2] * 8)
    mask = torch.ones(30, dtype=torch.bool)
    mask[-8:] = False  # sequence 2 is padding: not a sequence at all
    got = _term(logits, topk, seq, mask, 8, 2)
    want = _naive_seq_balance(logits.detach(), topk, seq, mask, 8, 2)
    assert torch.allclose(got, want, atol=1e-6)
    got.backward()
    assert logits.grad[:22].abs().sum() > 0 and logits.grad[22:].abs().sum() == 0
    # perfectly balanced routing with uniform affinities gives the minimum, 1
    uniform = _term(torch.zeros(8, 8), torch.arange(16).view(8, 2) % 8, torch.zeros(8, dtype=torch.long), None, 8, 2)
    assert torch.allclose(uniform, torch.tensor(1.0))


def test_state_roundtrip_and_heatmap(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir)
    ids, pos, mask = _batch(4)
    bal = ExpertLoadBalancer(model, bias_update_speed=0.01)
    for _ in range(3):
        with bal.batch(token_mask=mask), torch.no_grad():
            model(ids, position_ids=pos, use_cache=False)
        bal.step()
    bal.save(tmp_path)
    png = bal.plot_history(tmp_path / "load.png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    other = _model(tiny_model_dir)
    bal2 = ExpertLoadBalancer(other, bias_update_speed=0.01)
    assert bal2.load(tmp_path)
    assert bal2.num_steps == 3 and [s for s, _ in bal2.history] == [1, 2, 3]
    assert torch.equal(bal2.biases(), bal.biases())
    bal.remove()
    bal2.remove()


def _router_stack(seed: int = 0):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    cfg = DeepseekV3Config(hidden_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2)
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList(
        [torch.nn.ModuleDict({"gate": DeepseekV3TopkRouter(cfg)}) for _ in range(2)])})
    for layer in model["layers"]:
        torch.nn.init.normal_(layer["gate"].weight)
    return model.train()


def _rank_hidden(rank: int) -> torch.Tensor:
    return torch.randn(40 + 10 * rank, 16, generator=torch.Generator().manual_seed(100 + rank))


def _dp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = _router_stack()
    bal = ExpertLoadBalancer(model, bias_update_speed=0.01)
    for layer in model["layers"]:
        layer["gate"](_rank_hidden(rank))
    metrics = bal.step()
    torch.save({"bias": bal.biases(), "maxvio": metrics["moe/maxvio"]}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_counts_are_all_reduced_across_data_parallel_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: forking a process that already runs threads (tqdm, torch, tokenizers) can
    # deadlock the children; fresh interpreters cost a re-import of torch and transformers.
    mp.start_processes(_dp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    # reference: one process that sees both ranks' tokens in one step
    model = _router_stack()
    bal = ExpertLoadBalancer(model, bias_update_speed=0.01)
    for layer in model["layers"]:
        layer["gate"](torch.cat([_rank_hidden(0), _rank_hidden(1)]))
    ref = bal.step()
    local = ExpertLoadBalancer(_router_stack(), bias_update_speed=0.01)  # rank 0 alone, for contrast
    for layer in local.routers:
        layer[2](_rank_hidden(0))
    local_metrics = local.step()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0["bias"], r1["bias"]) and torch.equal(r0["bias"], bal.biases())
    assert r0["maxvio"] == ref["moe/maxvio"] != local_metrics["moe/maxvio"]


def test_rows_are_sequences_without_sample_ids():
    """GRPO-style batches (no packing): each row of the token mask is one sequence of the balance loss."""
    model = _router_stack()
    bal = ExpertLoadBalancer(model, bias_update_speed=0.0, seq_balance_alpha=1.0)
    h = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    gate = model["layers"][0]["gate"]
    with bal.batch(token_mask=mask):
        logits, _, _ = gate(h)
        loss = bal.sequence_balance_loss()
    topk = logits.detach().topk(2, dim=-1).indices  # eq. 18: the affinities' top-K, not the group-limited routing
    rows = torch.arange(2).repeat_interleave(5)
    want = _term(logits, topk, rows, mask.reshape(-1).bool(), 8, 2)
    assert torch.allclose(loss, want)
    one_sequence = _term(logits, topk, torch.zeros(10, dtype=torch.long), mask.reshape(-1).bool(), 8, 2)
    assert not torch.allclose(loss, one_sequence)


def test_sequence_balance_loss_counts_the_affinities_top_k_not_the_biased_group_limited_routing():
    """Report eq. 18 counts 1(s_{i,t} in TopK({s_{j,t} | 1 <= j <= N_r}, K_r)): the top-K of the affinities
    themselves. The bias (eq. 16) and the group limit choose the experts that run, not f_i; with drifted biases
    the routed experts are others, and the loss must not follow them."""
    model = _router_stack(3)
    gate = model["layers"][0]["gate"]
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.tensor([-1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]))
    bal = ExpertLoadBalancer(model, bias_update_speed=0.0, seq_balance_alpha=1.0)
    h = torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(0))
    with bal.batch():
        logits, _, routed = gate(h)
        loss = bal.sequence_balance_loss()
    seq = torch.zeros(10, dtype=torch.long)
    affinity_top_k = logits.detach().topk(2, dim=-1).indices
    assert not torch.equal(routed.sort(-1).values, affinity_top_k.sort(-1).values)  # the bias moved the routing
    all_real = torch.ones(10, dtype=torch.bool)
    torch.testing.assert_close(loss.detach(), _naive_seq_balance(logits.detach(), affinity_top_k, seq, all_real, 8, 2))
    bal.remove()


# -- F3: the sequence-wise balance loss without host syncs -----------------------------------------

def _reference_seq_balance_term(logits, topk, seq, mask, num_experts, top_k):
    """The implementation before the host-sync fix (int(seq.max()), boolean selects), verbatim: the
    value the sync-free one must keep."""
    scores = logits.float().sigmoid()
    probs = scores / scores.sum(dim=-1, keepdim=True)
    w = torch.ones(logits.shape[0], device=logits.device) if mask is None else mask.float()
    n_seq = int(seq.max()) + 1
    tokens = torch.zeros(n_seq, device=logits.device).index_add_(0, seq, w)
    routed = torch.zeros(logits.shape[0], num_experts, device=logits.device)
    routed.scatter_(1, topk, 1.0)
    count = torch.zeros(n_seq, num_experts, device=logits.device).index_add_(0, seq, routed * w[:, None])
    prob_sum = torch.zeros(n_seq, num_experts, device=logits.device, dtype=probs.dtype).index_add_(
        0, seq, probs * w[:, None]
    )
    present = tokens > 0
    t = tokens[present].unsqueeze(-1)
    f = num_experts / (top_k * t) * count[present]
    p = prob_sum[present] / t
    return (f * p).sum(dim=-1).mean()


def _packed_router_batch():
    """3 rows of 12 tokens: packed samples (positions restart at 0), a trailing pad segment in row 0,
    a row that is padding only after its first sample, and a row of one sample without padding."""
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 0, 1, 2],
                        [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3],
                        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]])
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, 9:] = False  # row 0: its last sample is padding
    mask[1, 3:] = False  # row 1: only its first sample is real
    h = torch.randn(3, 12, 16, generator=torch.Generator().manual_seed(7))
    return h, pos, mask


def test_sequence_balance_loss_keeps_its_value_on_packed_rows_with_padding():
    model = _router_stack(1)
    bal = ExpertLoadBalancer(model, bias_update_speed=0.0, seq_balance_alpha=0.5)
    h, pos, mask = _packed_router_batch()
    sid = sample_ids_from_positions(pos)
    with bal.batch(token_mask=mask, sample_ids=sid):
        outs = [layer["gate"](h) for layer in model["layers"]]
        loss = bal.sequence_balance_loss()
    # today's implementation, with its own sequence index (row-unique sample ids)
    seq = (sid - sid.min(dim=1, keepdim=True).values + torch.arange(3)[:, None] * 13).reshape(-1)
    flat = mask.reshape(-1)
    top = [lg.detach().topk(2, dim=-1).indices for lg, _, _ in outs]  # eq. 18: the affinities' top-K
    ref = 0.5 * sum(_reference_seq_balance_term(lg, tk, seq, flat, 8, 2) for (lg, _, _), tk in zip(outs, top))
    naive = 0.5 * sum(_naive_seq_balance(lg.detach(), tk, seq, flat, 8, 2) for (lg, _, _), tk in zip(outs, top))
    # equal up to fp32 summation order (the mean over sequences now sums fixed-size, masked buffers)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.detach(), naive, rtol=1e-5, atol=0)
    weights = [layer["gate"].weight for layer in model["layers"]]
    for got, want in zip(torch.autograd.grad(loss, weights, retain_graph=True), torch.autograd.grad(ref, weights)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    # arbitrary (non-contiguous, negative, large) sample ids: only which tokens share one matters
    weird = (seq * 1000 - 5000).reshape(3, 12)
    with bal.batch(token_mask=mask, sample_ids=weird):
        for layer in model["layers"]:
            layer["gate"](h)
        again = bal.sequence_balance_loss()
    torch.testing.assert_close(again, loss, rtol=1e-6, atol=0)


def test_sequence_balance_loss_and_router_hooks_make_no_host_sync():
    """On CUDA a host sync per router (MoE layers + MTP) per micro-batch stalls the step: the hooks'
    counting and the balance loss (forward and backward) must be fixed-size device ops only."""
    from tests.host_sync import HostSyncRecorder

    model = _router_stack(2)
    bal = ExpertLoadBalancer(model, bias_update_speed=0.0, seq_balance_alpha=1e-2)
    h, pos, mask = _packed_router_batch()
    sid = sample_ids_from_positions(pos)
    for scope in ({"token_mask": mask, "sample_ids": sid}, {"token_mask": mask}, {}):
        with HostSyncRecorder() as rec:
            with bal.batch(**scope):
                for layer in model["layers"]:
                    layer["gate"](h)
                loss = bal.sequence_balance_loss()
            loss.backward()
        assert rec.syncs == [], (list(scope), rec.syncs)
    bal.remove()


def test_step_reads_the_device_once_and_reports_maxvio_over_the_layers_that_saw_tokens():
    """`step()` runs once per optimizer step on CUDA: its metrics are reduced on the device and read in one
    host sync (it made five). maxvio = max load / mean load − 1, max and mean over the layers that saw
    tokens; a layer with no tokens (an MTP depth not run) is left out, and no tokens at all means no metrics."""
    from tests.host_sync import HostSyncRecorder

    model = _router_stack(0)
    bal = ExpertLoadBalancer(model, bias_update_speed=1e-3, seq_balance_alpha=0.0)
    counts = torch.tensor([[4.0, 0, 2, 2, 0, 0, 0, 0], [0.0] * 8])  # layer 1 saw nothing
    bal._counts = counts.clone()
    with HostSyncRecorder() as rec:
        metrics = bal.step()
    assert rec.syncs == ["Tensor.tolist"], rec.syncs
    assert metrics == {"moe/maxvio": pytest.approx(4 / 1 - 1), "moe/maxvio_mean": pytest.approx(3.0)}
    bal._counts = torch.tensor([[4.0, 0, 2, 2, 0, 0, 0, 0], [1.0] * 8])
    assert bal.step() == {"moe/maxvio": pytest.approx(3.0), "moe/maxvio_mean": pytest.approx(1.5)}
    assert bal.step() == {}  # no tokens since the last step
    bal.remove()


class _CompiledBlocks(torch.nn.Module):
    """A model whose forward runs a torch.compile'd block of routers, as accelerate's regional compilation
    (`compile_regions`, `torch_compile: true`) compiles each decoder block with its router hooks inside."""

    def __init__(self, stack: torch.nn.Module):
        super().__init__()
        self.stack = stack
        self.block = torch.compile(self._route, fullgraph=True, backend="aot_eager", dynamic=False)

    def _route(self, h: torch.Tensor) -> torch.Tensor:
        return sum(layer["gate"](h)[1].sum() for layer in self.stack["layers"])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block(h)


def test_router_hooks_compile_into_the_block_graph_and_count_as_in_eager():
    """Under torch.compile the router hook is traced into the block's graph (`fullgraph=True` raises at a
    graph break; asking the autograd engine whether it runs a backward split every MoE block in two). It
    counts what eager counts, and routings after the model's forward (gradient checkpointing's recompute
    in the backward) are still not counted: the compiled block is guarded on the balancer's flag."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    h, pos, mask = _packed_router_batch()
    scope = {"token_mask": mask, "sample_ids": sample_ids_from_positions(pos)}
    runs = {}
    for compiled in (False, True):
        stack = _router_stack(3)
        model = _CompiledBlocks(stack) if compiled else stack
        bal = ExpertLoadBalancer(model, bias_update_speed=0.0, seq_balance_alpha=1e-2)
        x = h.clone().requires_grad_(True)
        with bal.batch(**scope):
            out = model(x) if compiled else sum(layer["gate"](x)[1].sum() for layer in stack["layers"])
            (out + bal.sequence_balance_loss()).backward()
        if compiled:
            with bal.batch(**scope):
                model.block(h)  # the blocks run again after the forward: a recompute, not counted
        runs[compiled] = (bal._counts.clone(), x.grad, [layer["gate"].weight.grad for layer in stack["layers"]])
        bal.remove()
    assert not counters["graph_break"]
    assert torch.equal(runs[True][0], runs[False][0])
    assert runs[True][0].sum() == 2 * 2 * mask.sum()  # 2 layers x top-2 x real tokens, each once
    torch.testing.assert_close(runs[True][1], runs[False][1])
    for got, want in zip(runs[True][2], runs[False][2]):
        torch.testing.assert_close(got, want)


def test_router_hooks_compile_into_checkpointed_blocks_with_the_training_patches():
    """With activation checkpointing inside a compiled block (regional compilation of a checkpointed decoder
    layer), Dynamo refuses the hooks' side effects and broke the graph at every router. The trainers'
    `apply_training_patches` lets them run once, in the forward: one graph, and the counts, the sequence
    balance loss and the gradients are eager's (where the recompute is not counted either)."""
    from torch._dynamo.utils import counters
    from torch.utils.checkpoint import checkpoint

    from engines import compat

    def route(stack, h):
        return sum(checkpoint(lambda x, gate=layer["gate"]: gate(x)[1] * x.reshape(-1, 16).sum(-1, keepdim=True),
                              h, use_reentrant=False).sum() for layer in stack["layers"])

    class Checkpointed(torch.nn.Module):
        def __init__(self, stack, compiled):
            super().__init__()
            self.stack = stack
            fn = lambda h: route(self.stack, h)  # noqa: E731
            self.block = torch.compile(fn, fullgraph=True, backend="aot_eager") if compiled else fn

        def forward(self, h):
            return self.block(h)

    h, pos, mask = _packed_router_batch()
    scope = {"token_mask": mask, "sample_ids": sample_ids_from_positions(pos)}

    def run(compiled):
        torch._dynamo.reset()
        counters.clear()
        stack = _router_stack(5)
        model = Checkpointed(stack, compiled)
        bal = ExpertLoadBalancer(model, bias_update_speed=0.0, seq_balance_alpha=0.1)
        x = h.clone().requires_grad_(True)
        with bal.batch(**scope):
            out = model(x)
            balance = bal.sequence_balance_loss()
            (out + balance).backward()
        bal.remove()
        return bal._counts, balance.detach(), x.grad, [layer["gate"].weight.grad for layer in stack["layers"]]

    want = run(compiled=False)
    compat.restore()  # a trainer built earlier in this process applied the patches already
    with pytest.raises(Exception, match="HOP|side effect|Mutating"):
        run(compiled=True)  # without the patch: a graph break, which fullgraph=True turns into an error
    try:
        compat.apply_training_patches()
        got = run(compiled=True)
    finally:
        compat.restore()
    assert not counters["graph_break"]
    assert torch.equal(got[0], want[0]) and got[0].sum() == 2 * 2 * mask.sum()
    torch.testing.assert_close(got[1:], want[1:])
