"""Auxiliary-loss-free load balancing of DeepSeek-V3's routed experts (report §2.1.2), reusable by
any trainer (SFT, GRPO).

`ExpertLoadBalancer` puts a forward hook on every `DeepseekV3TopkRouter` (`mlp.gate` of each MoE
layer, the MTP modules' included). The router returns `(router_logits, topk_weights, topk_indices)`;
the hook counts the tokens each expert received. After each optimizer step `step()` sums the counts
over the step's micro-batches and over data-parallel ranks, then moves each layer's
`e_score_correction_bias` by γ towards balance: `b_i += γ · sign(mean_load − load_i)` (γ = 0 leaves
the bias untouched). It also measures `maxvio` (max load / mean load − 1, max over layers) and keeps
a load history for a heatmap.

Optionally it also provides the report's complementary sequence-wise balance loss (eq. 17–20):
per sequence, `α Σ_i f_i P_i` with `f_i = N_r / (K_r T) · #tokens whose K_r largest affinities include i`
and `P_i` the mean over the sequence's tokens of the normalised affinities `s_i / Σ_j s_j` (s = sigmoid(router
logits)). Eq. 18 ranks the affinities s themselves, over all N_r experts: the correction bias and the group
limit choose the experts that run (eq. 16), not this count.
A "sequence" is one packed sample; the loss is averaged over sequences and summed over MoE layers
(each layer has its own router, as DeepSeek-V2/V3 add one such term per gate).

Usage (any training loop):

    balancer = ExpertLoadBalancer(model, bias_update_speed=1e-3, seq_balance_alpha=1e-4)
    with balancer.batch(token_mask=real_tokens, sample_ids=sample_ids):
        out = model(...)
        loss = out.loss + balancer.sequence_balance_loss()
    loss.backward(); optimizer.step()
    metrics = balancer.step()          # once per optimizer step: bias update + {"moe/maxvio": ...}

or with a transformers `Trainer`: `BalancingCallback(balancer)` calls `step()` in `on_step_end`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

_LAYER_RE = re.compile(r"layers\.(\d+)\.")
BALANCER_STATE_FILE = "moe_balancer.pt"


def find_routers(model: nn.Module) -> list[tuple[int, str, DeepseekV3TopkRouter]]:
    """Every V3 router of `model` (PEFT-wrapped or not) as (layer index, module name, router), by layer."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, DeepseekV3TopkRouter):
            m = _LAYER_RE.search(name)
            found.append((int(m.group(1)) if m else len(found), name, module))
    return sorted(found, key=lambda t: t[0])


class ExpertLoadBalancer:
    """Counts expert loads through router hooks, updates the correction biases, measures balance.

    Args:
        model: a model containing `DeepseekV3TopkRouter` modules.
        bias_update_speed: γ of §2.1.2 (0 freezes the biases bit-exactly).
        seq_balance_alpha: α of the sequence-wise balance loss (0 disables it; no logits are kept).
        history_interval: keep the per-layer load of every `history_interval`-th step for the heatmap
            (0 keeps none).
    """

    def __init__(
        self,
        model: nn.Module,
        bias_update_speed: float = 1e-3,
        seq_balance_alpha: float = 0.0,
        history_interval: int = 1,
    ):
        self.routers = find_routers(model)
        if not self.routers:
            raise ValueError(f"{type(model).__name__} has no DeepseekV3TopkRouter: nothing to balance")
        self.layer_ids = [idx for idx, _, _ in self.routers]
        # layers at or after num_hidden_layers are MTP modules (labelled as such in the plot)
        self.num_main_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        self.num_experts = self.routers[0][2].num_experts
        self.top_k = self.routers[0][2].top_k
        self.bias_update_speed = float(bias_update_speed)
        self.seq_balance_alpha = float(seq_balance_alpha)
        self.history_interval = int(history_interval)
        device = self.routers[0][2].e_score_correction_bias.device
        self._counts = torch.zeros(len(self.routers), self.num_experts, device=device)
        self._token_mask: torch.Tensor | None = None
        self._sample_ids: torch.Tensor | None = None
        self._captured: list[tuple[int, torch.Tensor]] = []  # (router slot, router logits) for the balance loss
        self.paused = False
        # True from the end of the model's forward to the start of the next one. Gradient checkpointing
        # re-runs the blocks inside the backward, i.e. in that window: those routings are the same tokens
        # again and are not counted twice. A plain attribute set by hooks on the model, not a query of the
        # autograd engine (torch._C._current_graph_task_id), which torch.compile cannot trace: the router
        # hook runs inside each compiled decoder block, and Dynamo guards on this flag instead of
        # splitting the block around the router.
        self._after_forward = False
        self.num_steps = 0
        self.history: list[tuple[int, torch.Tensor]] = []  # (step, [layers, experts] load fractions)
        self.last_metrics: dict[str, float] = {}
        self._handles = [
            router.register_forward_hook(self._make_hook(i)) for i, (_, _, router) in enumerate(self.routers)
        ]
        self._handles += [
            model.register_forward_pre_hook(self._model_forward_starts),
            model.register_forward_hook(self._model_forward_ends),
        ]

    # -- hooks ---------------------------------------------------------------------------------
    def _model_forward_starts(self, module: nn.Module, args: Any) -> None:
        self._after_forward = False

    def _model_forward_ends(self, module: nn.Module, args: Any, output: Any) -> None:
        self._after_forward = True

    def _make_hook(self, slot: int):
        def hook(module: DeepseekV3TopkRouter, args: Any, output: tuple[torch.Tensor, ...]) -> None:
            if self.paused or self._after_forward or not module.training:
                return
            router_logits, _, topk_indices = output  # topk_indices: the routed experts (bias, group limit)
            mask = self._mask_for(topk_indices.shape[0], topk_indices.device)
            idx = topk_indices.reshape(-1)
            weight = (
                torch.ones(idx.shape, device=idx.device)
                if mask is None
                else mask.to(torch.float32).repeat_interleave(topk_indices.shape[1])
            )
            # index_add_ instead of bincount/boolean indexing: no device-to-host sync.
            counts = self._counts[slot]
            if counts.device != idx.device:  # the model moved after construction
                self._counts = self._counts.to(idx.device)
                counts = self._counts[slot]
            counts.index_add_(0, idx, weight)
            if self.seq_balance_alpha > 0 and torch.is_grad_enabled():
                self._captured.append((slot, router_logits))

        return hook

    def _mask_for(self, n_tokens: int, device: torch.device) -> torch.Tensor | None:
        mask = self._token_mask
        if mask is None or mask.numel() != n_tokens:
            return None
        return mask.reshape(-1).to(device)

    @contextlib.contextmanager
    def batch(self, token_mask: torch.Tensor | None = None, sample_ids: torch.Tensor | None = None) -> Iterator[None]:
        """Scope of one forward (and its loss): `token_mask` [batch, seq] marks real (non-pad) tokens,
        which alone are counted; `sample_ids` [batch, seq] numbers the packed samples of each row
        (the sequences of the balance loss; without it each row is one sequence). Without a context
        every routed token counts."""
        self._token_mask, self._sample_ids = token_mask, sample_ids
        self._captured = []
        try:
            yield
        finally:
            self._token_mask, self._sample_ids = None, None
            self._captured = []

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """No counting inside (e.g. reference/old-policy forwards in GRPO that are not trained on)."""
        prev, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = prev

    # -- sequence-wise balance loss (eq. 17-20) -------------------------------------------------
    def sequence_balance_loss(self) -> torch.Tensor | None:
        """α · mean over sequences of Σ_i f_i P_i, summed over MoE layers, for the forward(s) run inside
        the current `batch()` scope. None when α = 0 or nothing was captured."""
        if self.seq_balance_alpha <= 0 or not self._captured:
            return None
        total = None
        # The sequences are the same for every router (MoE layers and MTP): found once per call.
        groups: dict[tuple[int, torch.device], _SeqGroups] = {}
        for _, logits in self._captured:
            n = logits.shape[0]
            # report eq. 18: 1(s_{i,t} in TopK({s_{j,t} | 1 <= j <= N_r}, K_r)), the top-K of the unbiased
            # affinities over all experts (sigmoid is monotonic: the top-K of the logits), not the routing's
            topk = logits.detach().topk(self.top_k, dim=-1).indices
            key = (n, logits.device)
            if key not in groups:
                mask = self._mask_for(n, logits.device)
                groups[key] = _sequence_groups(self._sequence_index(n, logits.device), mask)
            term = _seq_balance_term(logits, topk, groups[key], self.num_experts, self.top_k)
            total = term if total is None else total + term
        return self.seq_balance_alpha * total

    def _sequence_index(self, n_tokens: int, device: torch.device) -> torch.Tensor:
        sid = self._sample_ids
        if sid is None or sid.numel() != n_tokens:
            mask = self._token_mask
            if mask is not None and mask.dim() == 2 and mask.numel() == n_tokens:  # one sequence per row
                return torch.arange(mask.shape[0], device=device).repeat_interleave(mask.shape[1])
            return torch.zeros(n_tokens, dtype=torch.long, device=device)
        sid = sid.to(device).long()
        if sid.dim() == 2:  # make sample ids unique across rows
            sid = sid - sid.min(dim=1, keepdim=True).values
            sid = sid + torch.arange(sid.shape[0], device=device).unsqueeze(1) * (sid.shape[1] + 1)
        return sid.reshape(-1)

    # -- per optimizer step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """Call once per optimizer step, after it: all-reduce the step's counts, update the biases,
        record the history, reset the counts. Returns {"moe/maxvio": ..., "moe/maxvio_mean": ...}."""
        load = self._counts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load, op=torch.distributed.ReduceOp.SUM)
        mean = load.mean(dim=-1, keepdim=True)
        if self.bias_update_speed != 0:
            delta = self.bias_update_speed * torch.sign(mean - load)
            for slot, (_, _, router) in enumerate(self.routers):
                bias = router.e_score_correction_bias
                bias.add_(delta[slot].to(device=bias.device, dtype=bias.dtype))
        mean = mean.squeeze(-1)
        active = mean > 0
        self.num_steps += 1
        metrics: dict[str, float] = {}
        # the layers that saw tokens, reduced on the device and read in one host sync (a GPU step waits
        # for each read)
        vio = load.max(dim=-1).values / torch.where(active, mean, torch.ones_like(mean)) - 1.0
        n_active = active.sum()
        vio_max = torch.where(active, vio, torch.full_like(vio, -math.inf)).max()
        vio_mean = torch.where(active, vio, torch.zeros_like(vio)).sum() / n_active.clamp(min=1)
        n_active, vio_max, vio_mean = torch.stack([n_active.to(vio.dtype), vio_max, vio_mean]).tolist()
        if n_active > 0:
            metrics = {"moe/maxvio": vio_max, "moe/maxvio_mean": vio_mean}
            if self.history_interval > 0 and (self.num_steps - 1) % self.history_interval == 0:
                frac = (load / load.sum(dim=-1, keepdim=True).clamp(min=1)).float().cpu()
                self.history.append((self.num_steps, frac))
        self._counts = torch.zeros_like(load)
        self.last_metrics = metrics
        return metrics

    def biases(self) -> torch.Tensor:
        """[layers, experts] copy of the current correction biases."""
        return torch.stack([r.e_score_correction_bias.detach().float().cpu() for _, _, r in self.routers])

    # -- state (resume) -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the biases (which live in the model's state dict)."""
        return {
            "num_steps": self.num_steps,
            "layer_ids": list(self.layer_ids),
            "history_steps": [s for s, _ in self.history],
            "history": torch.stack([h for _, h in self.history]) if self.history else torch.zeros(0),
            "pending_counts": self._counts.detach().cpu(),
            # The biases are model buffers (in every full checkpoint) but not in a LoRA adapter checkpoint.
            "biases": self.biases(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["layer_ids"]) != list(self.layer_ids):
            raise ValueError(f"balancer state is for MoE layers {state['layer_ids']}, this model has {self.layer_ids}")
        self.num_steps = int(state["num_steps"])
        hist = state["history"]
        self.history = [(int(s), hist[i].clone()) for i, s in enumerate(state["history_steps"])]
        self._counts = state["pending_counts"].to(self._counts.device, self._counts.dtype).clone()
        if "biases" in state:
            with torch.no_grad():
                for slot, (_, _, router) in enumerate(self.routers):
                    bias = router.e_score_correction_bias
                    bias.copy_(state["biases"][slot].to(bias.device, bias.dtype))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / BALANCER_STATE_FILE
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(path)  # atomic: a killed save leaves no half-written state
        return path

    def load(self, directory: str | Path) -> bool:
        path = Path(directory) / BALANCER_STATE_FILE
        if not path.exists():
            return False
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return True

    def remove(self) -> None:
        """Detach the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- plot -----------------------------------------------------------------------------------
    def plot_history(self, path: str | Path, title: str = "expert load") -> Path | None:
        """PNG heatmap per MoE layer: x = step, y = expert, colour = share of the layer's routed tokens."""
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [s for s, _ in self.history]
        data = torch.stack([h for _, h in self.history])  # [T, L, E]
        n_layers = data.shape[1]
        fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.2 + 1.6 * n_layers), squeeze=False)
        uniform = 1.0 / self.num_experts
        for li in range(n_layers):
            ax = axes[li][0]
            im = ax.imshow(
                data[:, li, :].T.numpy(),
                aspect="auto",
                origin="lower",
                cmap="viridis",
                vmin=0.0,
                vmax=max(2 * uniform, float(data[:, li, :].max())),
                extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, self.num_experts - 0.5),
                interpolation="nearest",
            )
            lid = self.layer_ids[li]
            name = "MTP layer" if self.num_main_layers is not None and lid >= self.num_main_layers else "layer"
            ax.set_ylabel(f"{name} {lid}\nexpert")
            fig.colorbar(im, ax=ax, label="load share")
        axes[-1][0].set_xlabel("optimizer step")
        fig.suptitle(f"{title} (uniform = {uniform:.3f})")
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out


class _SeqGroups(NamedTuple):
    """The sequences of one batch, for `_seq_balance_term`, built by `_sequence_groups`."""

    index: torch.Tensor  # [tokens] sequence of each token, renumbered 0.. (< tokens)
    weight: torch.Tensor  # [tokens] 1 for a real token, 0 for padding
    tokens: torch.Tensor  # [tokens] T of each sequence slot (0: no such sequence, or padding only)
    present: torch.Tensor  # [tokens] bool: the slot is a sequence with at least one real token
    num_present: torch.Tensor  # [] how many are


def _sequence_groups(seq: torch.Tensor, mask: torch.Tensor | None) -> _SeqGroups:
    """Groups tokens by sequence id with fixed-size device ops only (no host sync on CUDA).

    A batch of n tokens holds at most n sequences, so the per-sequence buffers have n slots: the ids
    are renumbered 0, 1, ... in order of value (a sort, then a cumulative count of id changes), which
    bounds them by n whatever the caller's numbering; slots without real tokens are masked out by
    `present` rather than selected away."""
    n = seq.shape[0]
    sorted_ids, order = torch.sort(seq)
    starts = torch.ones_like(sorted_ids, dtype=torch.long)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    index = torch.empty_like(order).scatter_(0, order, starts.cumsum(0) - 1)
    w = torch.ones(n, device=seq.device) if mask is None else mask.float()
    tokens = torch.zeros(n, device=seq.device).index_add_(0, index, w)  # T per sequence
    present = tokens > 0
    return _SeqGroups(index, w, tokens, present, present.sum())


def _seq_balance_term(
    logits: torch.Tensor, topk: torch.Tensor, groups: _SeqGroups, num_experts: int, top_k: int
) -> torch.Tensor:
    """mean over sequences of Σ_i f_i P_i for one layer (report eq. 18-20), differentiable in `logits`.

    The sequences are `groups` (`_sequence_groups` of the batch's sequence ids and token mask, built
    once per batch and shared by the layers). No host sync."""
    index, w, tokens, present, num_present = groups
    scores = logits.float().sigmoid()
    probs = scores / scores.sum(dim=-1, keepdim=True)  # s'_{i,t} = s_{i,t} / Σ_j s_{j,t}
    n_slots = tokens.shape[0]
    routed = torch.zeros(logits.shape[0], num_experts, device=logits.device)
    routed.scatter_(1, topk, 1.0)  # 1(s_{i,t} in top-K)
    count = torch.zeros(n_slots, num_experts, device=logits.device).index_add_(0, index, routed * w[:, None])
    prob_sum = torch.zeros(n_slots, num_experts, device=logits.device, dtype=probs.dtype).index_add_(
        0, index, probs * w[:, None]
    )
    t = torch.where(present, tokens, torch.ones_like(tokens)).unsqueeze(-1)  # empty slots: any T > 0
    f = num_experts / (top_k * t) * count  # eq. 18
    p = prob_sum / t  # eq. 20
    per_sequence = (f * p).sum(dim=-1)
    return torch.where(present, per_sequence, torch.zeros_like(per_sequence)).sum() / num_present


class BalancingCallback(TrainerCallback):
    """Drives an `ExpertLoadBalancer` from a transformers `Trainer`: `step()` after every optimizer
    step (`on_step_end` runs after `optimizer.step()` and before logging and saving, so a checkpoint
    holds the updated biases) and the heatmap at the end. The balancer's state (`save`/`load`) is the
    trainer's to write into each checkpoint (`DeepSeekLayoutCheckpoints.save_checkpoint_state`): written
    by a callback's `on_save`, it would land after Trainer has already rotated older checkpoints away."""

    def __init__(self, balancer: ExpertLoadBalancer, plot_path: str | Path | None = None):
        self.balancer = balancer
        self.plot_path = plot_path
        self.on_metrics = None  # optional callable(dict) receiving each step's metrics

    def on_step_end(self, args, state, control, **kwargs):
        metrics = self.balancer.step()
        if self.on_metrics is not None and metrics:
            self.on_metrics(metrics)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.plot_path is not None and state.is_world_process_zero:
            self.balancer.plot_history(self.plot_path)
        return control
