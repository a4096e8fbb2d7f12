"""GRPO that updates the whole DeepSeek-V3 model: TRL's `GRPOTrainer` plus V3's needs.

TRL supplies the objective (group-normalised advantages, clipped ratio, k3 KL against a
reference, its loss variants), reward bookkeeping, logging and checkpointing. This subclass adds:

- rollouts from our engines (`posttrain.rollout.engines`) through TRL's `rollout_func` hook, so
  weight sync goes through the layout converter (per-expert names, router biases, MTP) — TRL's
  own vLLM sync sends fused expert names that vLLM rejects;
- train/rollout agreement: the engine's sampled-token log-probs feed TRL's truncated importance
  sampling, and their difference from the trainer's is logged as `rollout/logprob_diff_*`;
- the MTP loss on the policy's own samples and `mtp/accept_rate` (V3 report §2.2);
- aux-loss-free balancing of the router biases after each optimizer step (§2.1.2);
- a time split (generation / scoring / training / sync) and tokens/s.

Contact points with TRL internals (pinned trl==1.16.0, exercised by tests/test_grpo.py):
`add_fused_lm_head`'s patched `model.forward`, `_calculate_rewards`, `_metrics`, and the
`use_vllm` / `vllm_generation.sync_weights()` / `vllm_importance_sampling_correction` attributes
that TRL's `_generate` and `_generate_and_score_completions` read.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from typing import Any

import torch
from trl import GRPOTrainer

from ..balancing import BalancingCallback, ExpertLoadBalancer
from ..checkpoints import DeepSeekLayoutCheckpoints
from ..compat import apply_training_patches
from ..distributed import check_launch
from ..modeling import IGNORE_INDEX, DeepseekV3ForCausalLMWithMTP
from ..rollout.engines import RolloutEngine, SamplingSettings
from .config import GRPORecipeConfig

log = logging.getLogger(__name__)

# `rollout_func` is how our engines plug into TRL (tested against trl==1.16.0); its "experimental"
# warning would otherwise print on every run.
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


class _EngineSync:
    """What TRL calls `vllm_generation`: here only its `sync_weights()` is used, and it pushes the
    policy's weights into our engine (timed)."""

    def __init__(self, trainer: "V3GRPOTrainer"):
        self.trainer = trainer

    def sync_weights(self) -> None:
        trainer = self.trainer
        seconds = trainer.engine.sync_weights(trainer.accelerator.unwrap_model(trainer.model))
        trainer._timing["sync_weights"] += seconds


class V3GRPOTrainer(DeepSeekLayoutCheckpoints, GRPOTrainer):
    def __init__(
        self,
        model: DeepseekV3ForCausalLMWithMTP,
        args: GRPORecipeConfig,
        engine: RolloutEngine,
        reward_funcs: list,
        **kwargs: Any,
    ):
        wants_engine_logprobs = True  # every engine returns sampled-token log-probs
        self._apply_tis = bool(args.vllm_importance_sampling_correction)
        use_vllm = args.use_vllm
        # TRL must not start its own vLLM (its sync cannot send fused experts); ours comes in
        # through `rollout_func`, and the flags below route TRL's IS-correction code to it.
        args.use_vllm = False
        apply_training_patches()  # before accelerator.prepare (FSDP2 loading)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, rollout_func=self._rollout, **kwargs)
        args.use_vllm = use_vllm
        check_launch(self.accelerator.num_processes, self.accelerator.distributed_type)
        self.engine = engine
        self.use_vllm = wants_engine_logprobs
        self.vllm_importance_sampling_correction = True  # always score old log-probs to measure agreement
        self.vllm_generation = _EngineSync(self)
        self._last_loaded_step = -1
        self._timing: dict[str, float] = defaultdict(float)
        self._step_tokens = 0
        self._mtp_stash: list[dict[str, Any]] = []
        self.rollout_ignore_eos = False  # benchmarks set it so every engine generates the same lengths

        unwrapped = self.accelerator.unwrap_model(self.model)
        self.balancer = ExpertLoadBalancer(
            unwrapped, bias_update_speed=args.bias_update_speed, seq_balance_alpha=args.seq_balance_alpha
        )
        self.balancer.paused = True  # counts only inside the training forward (see _wrap_forward)
        callback = BalancingCallback(self.balancer, plot_path=f"{args.output_dir}/expert_load.png")
        callback.on_metrics = self._log_balancing
        self.add_callback(callback)
        self._wrap_forward(unwrapped)

    # -- rollouts --------------------------------------------------------------------------------
    def _tokenize_prompt(self, prompt: Any) -> list[int]:
        tok = self.processing_class
        if isinstance(prompt, list):
            return list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        return list(tok(prompt, add_special_tokens=False)["input_ids"])

    def _rollout(self, prompts: list[Any], trainer: GRPOTrainer) -> dict[str, list]:
        """TRL's `rollout_func`: `prompts` holds each prompt once per completion wanted (TRL's
        sampler repeats it G times in a row); consecutive copies are sampled as one group."""
        prompt_ids = [self._tokenize_prompt(p) for p in prompts]
        groups: list[tuple[list[int], int]] = []
        for ids in prompt_ids:
            if groups and groups[-1][0] == ids:
                groups[-1] = (ids, groups[-1][1] + 1)
            else:
                groups.append((ids, 1))
        sampling = SamplingSettings(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k or 0,
            max_tokens=self.max_completion_length,
            stop_token_ids=[self.processing_class.eos_token_id],
            ignore_eos=self.rollout_ignore_eos,
            # per step and per prompt: a rerun, a resumed run or a different number of ranks samples the same
            seed=None if self.args.seed is None else self.args.seed * 1_000_003 + self.state.global_step,
        )
        t0 = time.perf_counter()
        completion_ids: list[list[int]] = []
        logprobs: list[list[float]] = []
        by_n: dict[int, list[int]] = defaultdict(list)
        for gi, (_, n) in enumerate(groups):
            by_n[n].append(gi)
        results: dict[int, list] = {}
        for n, gis in by_n.items():
            outs = self.engine.generate([groups[g][0] for g in gis], n, sampling)
            results.update(zip(gis, outs))
        for gi in range(len(groups)):
            for c in results[gi]:
                completion_ids.append(c.token_ids)
                logprobs.append(c.logprobs if c.logprobs is not None else [float("nan")] * len(c.token_ids))
        self._timing["generation"] += time.perf_counter() - t0
        self._step_tokens += sum(len(p) for p in prompt_ids) + sum(len(c) for c in completion_ids)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        for src, dst in (("sampling/sampling_logp_difference/mean", "rollout/logprob_diff_mean"),
                         ("sampling/sampling_logp_difference/max", "rollout/logprob_diff_max")):
            if metrics.get(src):
                metrics[dst].append(metrics[src][-1])
        serves_fp8 = getattr(self.engine, "serves_fp8", None)
        if serves_fp8 is not None:  # 1: vLLM's FP8 layers; 0: high precision (incl. FP8 dequantized, no kernel)
            metrics["rollout/fp8"].append(float(serves_fp8))
        if not self._apply_tis and "importance_sampling_ratio" in out:
            # Agreement is measured, but the user turned the correction off.
            out["importance_sampling_ratio"] = torch.ones_like(out["importance_sampling_ratio"])
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        t0 = time.perf_counter()
        try:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        finally:
            self._timing["scoring"] += time.perf_counter() - t0

    # -- MTP and balancing inside the training forward -------------------------------------------
    def _wrap_forward(self, model: DeepseekV3ForCausalLMWithMTP) -> None:
        fused_forward = model.forward  # TRL's fused-LM-head forward (add_fused_lm_head)
        trainer = self

        def forward(*args: Any, fused_lm_head: bool = False, labels=None, **kwargs: Any):
            if not fused_lm_head:
                return fused_forward(*args, labels=labels, **kwargs)
            if not (torch.is_grad_enabled() and model.training):
                # old-policy / reference scoring: not trained on, so not counted for balancing
                return fused_forward(*args, fused_lm_head=True, labels=labels, **kwargs)
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            attention_mask = kwargs.get("attention_mask")
            captured: dict[str, torch.Tensor] = {}
            handle = model.model.register_forward_hook(
                lambda module, inp, output: captured.__setitem__("hidden", output.last_hidden_state)
            )
            try:
                self.balancer.paused = False
                with self.balancer.batch(token_mask=attention_mask):
                    out = fused_forward(*args, fused_lm_head=True, labels=labels, **kwargs)
                    handle.remove()
                    # the MTP block's router is balanced too, when the MTP module is trained
                    terms = trainer._mtp_terms(model, captured["hidden"], input_ids, labels, attention_mask)
                    terms["balance_loss"] = self.balancer.sequence_balance_loss()
            finally:
                self.balancer.paused = True
                handle.remove()
            trainer._mtp_stash.append(terms)
            return out

        model.forward = forward

    def _mtp_terms(self, model, hidden, input_ids, labels, attention_mask) -> dict[str, Any]:
        """MTP loss on the sampled sequences (completion tokens only) and the acceptance a
        speculative decoder would see: the MTP module's top-1 guess for the token after next."""
        weight = self.args.mtp_loss_weight
        terms: dict[str, Any] = {}
        if not model.mtp_layers:
            return terms
        if weight > 0:
            ctx = torch.enable_grad()
        else:  # measured only: no gradient, and its routing does not move the MTP router's bias
            ctx = torch.no_grad()
            self.balancer.paused = True
        with ctx:
            mtp_logits, mtp_loss = model._mtp(
                hidden, input_ids, None, labels, attention_mask, detach_input=self.args.mtp_detach_input
            )
        with torch.no_grad():
            # Position i of the first MTP depth guesses token i+2; rows are single samples here.
            target = torch.full_like(labels, IGNORE_INDEX)
            target[:, :-2] = labels[:, 2:]
            valid = target != IGNORE_INDEX
            hits = (mtp_logits[0].argmax(-1) == target) & valid
            terms["accept_hits"] = hits.sum().item()
            terms["accept_total"] = valid.sum().item()
        terms["mtp_loss"] = mtp_loss if weight > 0 else (mtp_loss.detach() if mtp_loss is not None else None)
        return terms

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._mtp_stash.clear()
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        hits = total = 0
        mtp_losses = []
        world = self.accelerator.num_processes
        for terms in self._mtp_stash:
            if terms.get("mtp_loss") is not None:
                mtp_losses.append(terms["mtp_loss"])
                if self.args.mtp_loss_weight > 0 and terms["mtp_loss"].requires_grad:
                    # token mean over the global batch: DDP averages gradients over ranks, so each
                    # rank's mean is reweighted by its share of the MTP targets
                    share = 1.0
                    if world > 1:
                        count = torch.tensor(float(terms["accept_total"]), device=loss.device)
                        share = world * count / self.accelerator.gather(count).sum().clamp(min=1)
                    loss = loss + self.args.mtp_loss_weight * terms["mtp_loss"] * share / ga
            if terms.get("balance_loss") is not None:
                loss = loss + terms["balance_loss"] / ga
            hits += terms.get("accept_hits", 0)
            total += terms.get("accept_total", 0)
        self._mtp_stash.clear()
        if mtp_losses:
            self._metrics[mode]["mtp_loss"].append(torch.stack([m.detach() for m in mtp_losses]).mean().item())
        if total:
            self._metrics[mode]["mtp/accept_rate"].append(hits / total)
        return loss

    def _log_balancing(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self._metrics["train"][k].append(v)

    # -- step timing ------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch):
        t0 = time.perf_counter()
        out = super().training_step(model, inputs, num_items_in_batch)
        self._timing["step"] += time.perf_counter() - t0
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and self._timing.get("step"):
            t = self._timing
            other = t.get("generation", 0.0) + t.get("scoring", 0.0) + t.get("sync_weights", 0.0)
            metrics = self._metrics["train"]
            for key in ("generation", "scoring", "sync_weights"):
                metrics[f"timing/{key}"].append(t.get(key, 0.0))
            metrics["timing/training"].append(max(t["step"] - other, 0.0))
            metrics["timing/step"].append(t["step"])
            metrics["tokens_per_second"].append(self._step_tokens / t["step"])
            self._timing.clear()
            self._step_tokens = 0
        super().log(logs, start_time)
