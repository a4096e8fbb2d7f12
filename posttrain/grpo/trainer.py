"""GRPO that updates the whole DeepSeek-V3 model: TRL's `GRPOTrainer` plus V3's needs.

TRL supplies the objective (group-normalised advantages, clipped ratio, k3 KL against a
reference, its loss variants), reward bookkeeping, logging and checkpointing. This subclass adds:

- rollouts from our engines (`engines`) through TRL's `rollout_func` hook; weight sync streams
  the layout converter's output into them (`posttrain.layout.weights_for_engine`: per-expert
  names, router biases, MTP, FP8 re-quantized for an FP8 engine) — TRL's own vLLM sync sends
  fused expert names that vLLM rejects;
- train/rollout agreement: the engine's sampled-token log-probs feed TRL's truncated importance
  sampling, and their difference from the trainer's is logged as `rollout/logprob_diff_*`; with
  on-policy rollouts the trainer's side comes from the training forward, with no separate forward
  over the batch (`old_logps_from_training_forward`, `tis.py`);
- the MTP loss on the policy's own samples and `mtp/accept_rate` (V3 report §2.2); with
  `rollout_speculative_tokens` the engine drafts with the policy's MTP module and its measured
  acceptance is logged as `rollout/spec_accept_rate`;
- aux-loss-free balancing of the router biases after each optimizer step (§2.1.2);
- a time split (generation / scoring / training / sync) and tokens/s;
- dynamic sampling (`dynamic_sampling`, DAPO §3.2; `dynamic_sampling.py`): groups whose rewards tie
  are dropped and more prompts sampled until the batch is full of groups with spread;
- the closed-loop MTP loss weight (`mtp_loss_weight: auto`; `mtp_control.py`).

Contact points with TRL internals are listed in `engines.compat` (TRL_*; exercised by
tests/test_grpo.py): `rollout_func`, `add_fused_lm_head`'s patched `model.forward`,
`_generate_and_score_completions`, `_calculate_rewards`, `_get_per_token_logps_and_entropies`, `_metrics`,
and the `use_vllm` /
`vllm_generation.sync_weights()` / `vllm_importance_sampling_correction` attributes that TRL's
`_generate` and `_generate_and_score_completions` read.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import TrainerCallback
from trl import GRPOTrainer

from engines import RolloutEngine, SamplingSettings
from engines.compat import apply_training_patches, avoid_cudnn_sdpa_replanning, silence_trl_rollout_func_warning

from ..balancing import BALANCER_STATE_FILE, BalancingCallback, ExpertLoadBalancer
from ..checkpoints import DeepSeekLayoutCheckpoints
from ..distributed import check_launch
from ..errors import ConfigError
from ..fp8.training import install_trl_reference_loader
from ..layout import weights_for_engine
from ..modeling import IGNORE_INDEX, DeepseekV3ForCausalLMWithMTP
from .config import GRPORecipeConfig
from .dynamic_sampling import (TopUp, concat_batches, extra_prompt_indices, group_rows, groups_with_spread,
                               round_seed, select_rows, split_draw)
from .mtp_control import MTPWeightController, split_mtp_param_groups
from .tis import AgreementStats, importance_ratio

log = logging.getLogger(__name__)


class _EngineSync:
    """What TRL calls `vllm_generation`: here only its `sync_weights()` is used, and it streams the
    policy's weights, in the layout the engine takes, into our engine (timed)."""

    def __init__(self, trainer: "V3GRPOTrainer"):
        self.trainer = trainer

    def sync_weights(self) -> None:
        trainer = self.trainer
        policy = trainer.accelerator.unwrap_model(trainer.model)
        seconds = trainer.engine.sync_weights(weights_for_engine(policy, trainer.engine))
        trainer._timing["sync_weights"] += seconds


MTP_CONTROL_FILE = "mtp_control.json"
# TRL's train/engine agreement metrics, also logged under the names this project's reports use
AGREEMENT_ALIASES = (("sampling/sampling_logp_difference/mean", "rollout/logprob_diff_mean"),
                     ("sampling/sampling_logp_difference/max", "rollout/logprob_diff_max"))


class _MTPWeightCallback(TrainerCallback):
    """Updates the closed-loop λ after each optimizer step (`on_step_end`: after `optimizer.step()`,
    before logging and saving; the trainer's `save_checkpoint_state` writes the controller's state)."""

    def __init__(self, trainer: "V3GRPOTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._update_mtp_weight()
        return control


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
        apply_training_patches(grpo=True)  # before accelerator.prepare (FSDP2 loading, the reference model)
        install_trl_reference_loader()  # TRL builds the reference model (beta > 0) in super().__init__
        avoid_cudnn_sdpa_replanning()  # sequence lengths change at every step
        silence_trl_rollout_func_warning()
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, rollout_func=self._rollout, **kwargs)
        args.use_vllm = use_vllm
        check_launch(self.accelerator.num_processes, self.accelerator.distributed_type)
        self.engine = engine
        self.use_vllm = wants_engine_logprobs
        # TIS's old-policy log-probs: on-policy rollouts take them from the training forward (tis.py), and TRL's
        # flag stays off but inside the loss; otherwise TRL scores them in a separate forward (kept when the user
        # turned TIS off, to measure agreement).
        # (TRL's test: gradient_accumulation_steps % (steps_per_generation * num_iterations) == 0)
        cycle = self._generation_cycle_steps()
        on_policy = (1 / cycle).denominator == 1
        self._old_logps_in_loss = args.old_logps_from_training_forward and on_policy
        self.vllm_importance_sampling_correction = not self._old_logps_in_loss
        if args.old_logps_from_training_forward and not on_policy:
            log.info("old_logps_from_training_forward: rollouts are reused over %s optimizer steps (steps_per_generation "
                     "x num_iterations / gradient_accumulation_steps), so the old policy is not the training forward's: "
                     "a separate forward scores its log-probs", cycle)
        self._loss_inputs: dict[str, Any] | None = None  # the micro-batch whose loss is being computed
        self._agreement = {"train": AgreementStats(), "eval": AgreementStats()}
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

        # dynamic sampling (DAPO §3.2): see _dynamic_batch
        self._sampling_round = 0  # 0: TRL's own batch; k > 0: the k-th extra engine call of the step
        self._round_rewards: torch.Tensor | None = None
        if args.dynamic_sampling and not hasattr(self.train_dataset, "__getitem__"):
            raise ValueError("dynamic_sampling draws extra prompts by index: it needs a map-style train_dataset")
        # closed-loop λ_mtp (`mtp_loss_weight: auto`): see mtp_control.py and _update_mtp_weight
        self.mtp_controller = None
        if args.mtp_loss_weight == "auto":
            self.mtp_controller = MTPWeightController(floor=args.mtp_loss_weight_min, ceiling=args.mtp_loss_weight_max)
        self._accept_counts = [0, 0]  # MTP hits / targets of the current optimizer step
        self._spec_rates: list[float] = []  # the engine's rollout/spec_accept_rate values of the current step
        self.add_callback(_MTPWeightCallback(self))
        self._check_resumable_saves()

    @property
    def mtp_weight(self) -> float:
        """λ of the MTP loss for the current step (fixed, or the controller's with `auto`)."""
        if self.mtp_controller is not None:
            return self.mtp_controller.weight
        return float(self.args.mtp_loss_weight)

    # -- rollouts --------------------------------------------------------------------------------
    def _tokenize_prompt(self, prompt: Any) -> list[int]:
        tok = self.processing_class
        if isinstance(prompt, list):
            # `chat_template_kwargs` (e.g. DeepSeek-V3.1's `thinking`) as TRL renders prompts with them
            return list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                **self.chat_template_kwargs)["input_ids"])
        return list(tok(prompt, add_special_tokens=False)["input_ids"])

    def _rollout(self, prompts: list[Any], trainer: GRPOTrainer) -> dict[str, list]:
        """TRL's `rollout_func`: `prompts` holds each prompt once per completion wanted (TRL's
        sampler repeats it G times in a row); consecutive copies are sampled as one group."""
        prompt_ids = [self._tokenize_prompt(p) for p in prompts]
        # TRL lays each group's G copies out consecutively over the global batch and hands every rank an equal
        # slice of it, so a group straddles two ranks when a rank's batch is not a multiple of G. Each part is
        # seeded by the place of its first sample in the group: with the same seed, both ranks would draw the
        # same samples and the group would hold duplicates.
        G = self.num_generations if self.model.training else self.num_generations_eval
        first_row = self.accelerator.process_index * len(prompts)
        groups: list[tuple[list[int], int, int]] = []  # (prompt ids, samples, place of the first one in its group)
        for i, ids in enumerate(prompt_ids):
            if groups and groups[-1][0] == ids:
                groups[-1] = (ids, groups[-1][1] + 1, groups[-1][2])
            else:
                groups.append((ids, 1, (first_row + i) % G))
        sampling = SamplingSettings(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k or 0,
            max_tokens=self.max_completion_length,
            stop_token_ids=[self.processing_class.eos_token_id],
            ignore_eos=self.rollout_ignore_eos,
            # per step and per prompt: a rerun, a resumed run or a different number of ranks (each holding whole
            # groups) samples the same
            seed=round_seed(None if self.args.seed is None else self.args.seed * 1_000_003 + self.state.global_step,
                            self._sampling_round),  # extra rounds of dynamic sampling: the round folded in
        )
        t0 = time.perf_counter()
        completion_ids: list[list[int]] = []
        logprobs: list[list[float]] = []
        by_part: dict[tuple[int, int], list[int]] = defaultdict(list)
        for gi, (_, n, place) in enumerate(groups):
            by_part[n, place].append(gi)
        results: dict[int, list] = {}
        spec_counts = getattr(self.engine, "spec_decode_counts", None)  # a speculating engine's (drafted, accepted)
        spec_before = spec_counts() if spec_counts is not None else None
        for (n, place), gis in by_part.items():
            part = sampling if place == 0 or sampling.seed is None else \
                replace(sampling, seed=sampling.seed + place * 1_000_000_009)
            outs = self.engine.generate([groups[g][0] for g in gis], n, part)
            results.update(zip(gis, outs))
        if spec_before is not None:  # MTP-speculative rollouts: the engine's own draft acceptance
            drafted, accepted = (after - before for after, before in zip(spec_counts(), spec_before))
            if drafted > 0:
                mode = "train" if self.model.training else "eval"
                self._metrics[mode]["rollout/spec_accept_rate"].append(accepted / drafted)
        for gi in range(len(groups)):
            for c in results[gi]:
                completion_ids.append(c.token_ids)
                logprobs.append(c.logprobs if c.logprobs is not None else [float("nan")] * len(c.token_ids))
        self._timing["generation"] += time.perf_counter() - t0
        if self._sampling_round:
            self._timing["extra_generation"] += time.perf_counter() - t0
        self._step_tokens += sum(len(p) for p in prompt_ids) + sum(len(c) for c in completion_ids)
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    def _generate_and_score_completions(self, inputs):
        spec = self._metrics["train"].get("rollout/spec_accept_rate")
        seen = len(spec) if spec is not None else 0
        if self.args.dynamic_sampling and self.model.training:
            out = self._dynamic_batch(inputs)
        else:
            out = self._score_batch(inputs)
        spec = self._metrics["train"].get("rollout/spec_accept_rate")
        if self.model.training and spec is not None and len(spec) > seen:  # the engine measured its drafts
            self._spec_rates.extend(spec[seen:])
        return out

    def _score_batch(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        for src, dst in AGREEMENT_ALIASES:
            if metrics.get(src) and not self._old_logps_in_loss:
                metrics[dst].append(metrics[src][-1])
        serves_fp8 = getattr(self.engine, "serves_fp8", None)
        if serves_fp8 is not None:  # 1: vLLM's FP8 layers; 0: high precision (incl. FP8 dequantized, no kernel)
            metrics["rollout/fp8"].append(float(serves_fp8))
        if not self._apply_tis and "importance_sampling_ratio" in out:
            # Agreement is measured, but the user turned the correction off.
            out["importance_sampling_ratio"] = torch.ones_like(out["importance_sampling_ratio"])
        return out

    def _dynamic_batch(self, inputs):
        """Dynamic sampling (DAPO §3.2; the pure parts and their rules are in dynamic_sampling.py):
        TRL's batch is generated and scored, groups whose rewards tie are dropped, and extra rounds of
        prompts drawn by (seed, step, round) and dealt out to the ranks are generated until every rank
        has its batch's number of groups with spread, or `max_sampling_rounds` engine calls were made,
        or no prompt of the dataset is left unsampled this step.

        Metrics: TRL's per-batch metrics (reward, completion lengths, …) are those of the first
        round — the policy on TRL's own draw of prompts, as without dynamic sampling — except
        `frac_reward_zero_std`, which is the trained batch's; the first round's value is logged as
        `sampling/frac_reward_zero_std_sampled`. The train/engine agreement (`sampling/sampling_logp_difference/*`,
        `rollout/logprob_diff_*`, the IS ratios) is the trained batch's when the training forward gives it
        (`old_logps_from_training_forward`), else the first round's."""
        G = self.num_generations
        if len(inputs) % G:
            raise ValueError(f"dynamic_sampling: each rank's generation batch ({len(inputs)} rows) must hold whole "
                             f"groups of num_generations={G}")
        metrics = self._metrics["train"]
        rank = self.accelerator.process_index
        world = self.accelerator.num_processes
        topup = TopUp(target=len(inputs) // G, world=world, rank=rank)
        ds = self.train_dataset

        def key(prompt: Any) -> str:
            return json.dumps(prompt, sort_keys=True, default=str)

        used = set(gather_object([key(x["prompt"]) for x in inputs]))  # the whole batch's, every rank's
        parts: list[dict[str, Any]] = []
        first = first_spread = mark = None
        round_inputs = inputs
        try:
            while True:
                t0 = time.perf_counter()
                self._sampling_round = topup.rounds
                out = self._score_batch(round_inputs)
                spread = groups_with_spread(self._round_rewards, self.reward_weights, G,
                                            self.multi_objective_aggregation)
                keep = topup.add_round(spread)
                if first is None:
                    first, first_spread = out, spread
                    mark = {k: len(v) for k, v in metrics.items()}
                else:
                    self._timing["extra_rounds"] += time.perf_counter() - t0
                if keep:
                    parts.append(select_rows(out, group_rows(keep, G), len(round_inputs)))
                if topup.full or topup.rounds >= self.args.max_sampling_rounds:
                    break
                drawn = split_draw(extra_prompt_indices(
                    topup.next_draw() * world, len(ds), self.args.seed, self.state.global_step, topup.rounds,
                    skip=lambda i: key(ds[i]["prompt"]) in used), world)
                if not drawn[rank]:  # the dataset has no unsampled prompt left for a round (alike on every rank)
                    break
                used.update(key(ds[i]["prompt"]) for part in drawn for i in part)
                round_inputs = [dict(ds[i]) for i in drawn[rank] for _ in range(G)]
        finally:
            self._sampling_round = 0
        rows_kept = sum(p["advantages"].shape[0] for p in parts)
        if rows_kept >= max(1, self.args.steps_per_generation):
            batch = concat_batches(parts, self._tokenizer.pad_token_id)
            zero_std = 0.0
        else:  # no group with spread: the step trains only the MTP and balancing terms (advantages are 0)
            batch = first
            zero_std = 1.0 - first_spread.view(topup.world, -1)[rank].float().mean().item()
        mask = batch["completion_mask"] if batch.get("tool_mask") is None else batch["completion_mask"] * batch["tool_mask"]
        batch["num_items_in_batch"] = self.accelerator.gather(mask.sum()).sum()
        for key in list(metrics):  # the extra rounds' TRL metrics describe other prompts: the first round's stand
            if key in mark:
                del metrics[key][mark[key]:]
            else:
                del metrics[key]
        if metrics.get("frac_reward_zero_std"):
            metrics["sampling/frac_reward_zero_std_sampled"].append(metrics["frac_reward_zero_std"][-1])
            metrics["frac_reward_zero_std"][-1] = zero_std
        metrics["sampling/rounds"].append(float(topup.rounds))
        metrics["sampling/groups_dropped"].append(float(topup.dropped))
        metrics["sampling/groups_kept"].append(float(sum(topup.kept)))
        return batch

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        t0 = time.perf_counter()
        try:
            self._round_rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            return self._round_rewards  # gathered over ranks; dynamic sampling filters groups on it
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
        weight = self.mtp_weight
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
            # Position i of the first MTP depth guesses token i+2; rows are single samples here. The loss's
            # targets include the first completion token (guessed from the prompt's end); a speculative
            # decoder never drafts it (the model samples it from the prompt), so acceptance counts a guess
            # only where token i+1 is a completion token too, as eval_hooks.mtp_acceptance does.
            target = torch.full_like(labels, IGNORE_INDEX)
            target[:, :-2] = labels[:, 2:]
            terms["mtp_targets"] = (target != IGNORE_INDEX).sum().item()
            drafted = torch.zeros_like(labels, dtype=torch.bool)
            drafted[:, :-2] = labels[:, 1:-1] != IGNORE_INDEX
            valid = (target != IGNORE_INDEX) & drafted
            hits = (mtp_logits[0].argmax(-1) == target) & valid
            terms["accept_hits"] = hits.sum().item()
            terms["accept_total"] = valid.sum().item()
        terms["mtp_loss"] = mtp_loss if weight > 0 else (mtp_loss.detach() if mtp_loss is not None else None)
        return terms

    # -- TIS from the training forward (tis.py) ----------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        out = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                         *args, **kwargs)
        inputs, self._loss_inputs = self._loss_inputs, None  # set by compute_loss: this is its policy forward
        sampling = inputs.get("sampling_per_token_logps") if inputs is not None else None
        if sampling is not None:
            old = out[0].detach()
            mask = inputs["completion_mask"] if inputs.get("tool_mask") is None else \
                inputs["completion_mask"] * inputs["tool_mask"]
            ratio = importance_ratio(old, sampling, mask, self.vllm_importance_sampling_mode,
                                     self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max)
            self._agreement["train" if self.model.training else "eval"].add(
                old, sampling, mask, ratio, per_sequence=self.vllm_importance_sampling_mode.startswith("sequence"))
            # TRL's loss reads it after this forward (times the per-token loss; vespo's weights)
            inputs["importance_sampling_ratio"] = ratio if self._apply_tis else torch.ones_like(ratio)
        return out

    def _log_agreement(self, mode: str) -> None:
        """Before TRL's log: the agreement over the batches trained (or evaluated) since the last log, as
        TRL's sampling/* metrics and rollout/logprob_diff_*."""
        stats = self._agreement[mode]
        if stats.empty:  # alike on every rank: each trains the same number of micro-batches
            return
        gather = self.accelerator.gather if self.accelerator.num_processes > 1 else None
        metrics = stats.metrics(gather, device=self.accelerator.device)
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)
        for src, dst in AGREEMENT_ALIASES:
            self._metrics[mode][dst].append(metrics[src])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._mtp_stash.clear()
        if self._old_logps_in_loss:
            self._loss_inputs = inputs
            self.vllm_importance_sampling_correction = self._apply_tis  # TRL weights the loss by the ratio
        try:
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        finally:
            if self._old_logps_in_loss:
                self._loss_inputs = None
                self.vllm_importance_sampling_correction = False
        mode = "train" if self.model.training else "eval"
        ga = self.current_gradient_accumulation_steps if mode == "train" else 1
        hits = total = 0
        mtp_losses = []
        weight = self.mtp_weight
        world = self.accelerator.num_processes
        for terms in self._mtp_stash:
            if terms.get("mtp_loss") is not None:
                mtp_losses.append(terms["mtp_loss"])
                if weight > 0 and terms["mtp_loss"].requires_grad:
                    # token mean over the global batch: DDP averages gradients over ranks, so each
                    # rank's mean is reweighted by its share of the MTP targets
                    share = 1.0
                    if world > 1:
                        count = torch.tensor(float(terms["mtp_targets"]), device=loss.device)
                        share = world * count / self.accelerator.gather(count).sum().clamp(min=1)
                    loss = loss + weight * terms["mtp_loss"] * share / ga
            if terms.get("balance_loss") is not None:
                loss = loss + terms["balance_loss"] / ga
            hits += terms.get("accept_hits", 0)
            total += terms.get("accept_total", 0)
        self._mtp_stash.clear()
        if mtp_losses:
            self._metrics[mode]["mtp_loss"].append(torch.stack([m.detach() for m in mtp_losses]).mean().item())
        if total:
            self._metrics[mode]["mtp/accept_rate"].append(hits / total)
        if mode == "train":
            self._accept_counts[0] += hits
            self._accept_counts[1] += total
            self._metrics[mode]["mtp_loss_weight"].append(weight)
        return loss

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with the MTP module's own weights in groups of their own at
        `mtp_learning_rate` (see its help: under Adam it, not λ, sets how fast the drafter follows the policy)."""
        optimizer = super().create_optimizer(model)
        if self.args.mtp_learning_rate is None:
            return optimizer
        split_mtp_param_groups(optimizer, self.accelerator.unwrap_model(self.model), self.args.mtp_learning_rate)
        return optimizer

    def _update_mtp_weight(self) -> None:
        """After each optimizer step: feed the step's measured acceptance to the λ controller
        (`mtp_loss_weight: auto`) — the engine's own (`rollout/spec_accept_rate`) when it measured
        its drafts this step, else the trainer's `mtp/accept_rate`."""
        hits, total = self._accept_counts
        spec_sum, spec_n = sum(self._spec_rates), len(self._spec_rates)
        self._accept_counts, self._spec_rates = [0, 0], []
        if self.mtp_controller is None:
            return
        if self.accelerator.num_processes > 1:
            # one λ for every rank: the step's acceptance over the global batch. On its own rank's samples each
            # controller drifted to its own λ (DDP then trained on their mean; rank 0's was logged and saved).
            counts = torch.tensor([hits, total, spec_sum, spec_n], dtype=torch.float64, device=self.accelerator.device)
            hits, total, spec_sum, spec_n = self.accelerator.reduce(counts, reduction="sum").tolist()
        rate = spec_sum / spec_n if spec_n else (hits / total if total else None)
        self.mtp_controller.update(rate)

    # -- resume ----------------------------------------------------------------------------------
    def checkpoint_state_files(self) -> list[str]:
        return [BALANCER_STATE_FILE] + ([MTP_CONTROL_FILE] if self.mtp_controller is not None else [])

    def save_checkpoint_state(self, checkpoint_dir: Path) -> None:
        self.balancer.save(checkpoint_dir)
        if self.mtp_controller is not None:
            from data_pipelines.shards import atomic_write_bytes

            atomic_write_bytes(checkpoint_dir / MTP_CONTROL_FILE, (json.dumps(self.mtp_controller.state_dict()) + "\n").encode())

    def _generation_cycle_steps(self) -> Fraction:
        """Optimizer steps per generation of rollouts: TRL generates every `steps_per_generation *
        num_iterations` micro-batches and reuses the buffered rollouts in between."""
        return Fraction(self.args.steps_per_generation * self.num_iterations, self.args.gradient_accumulation_steps)

    def _check_resumable_saves(self) -> None:
        # TRL keeps neither its micro-step counter nor its buffered rollouts in a checkpoint: a resume is exact
        # only from a step where a new generation starts, where the buffer is empty anyway.
        cycle = self._generation_cycle_steps()
        save = self.args.save_steps
        if cycle != 1 and self.args.save_strategy == "steps" and float(save).is_integer() and save >= 1 \
                and (int(save) / cycle).denominator != 1:
            raise ConfigError(
                f"save_steps={int(save)}: rollouts are generated every {cycle} optimizer steps (steps_per_generation "
                f"{self.args.steps_per_generation} x num_iterations {self.num_iterations} / gradient_accumulation_steps "
                f"{self.args.gradient_accumulation_steps}), and a checkpoint between generations cannot be resumed "
                f"exactly; use a multiple of {cycle}")

    def load_checkpoint_state(self, checkpoint_dir: Path) -> None:
        step = json.loads((checkpoint_dir / "trainer_state.json").read_text())["global_step"]
        if (step / self._generation_cycle_steps()).denominator != 1:
            raise ConfigError(
                f"{checkpoint_dir} is at step {step}, between two generations of rollouts (one every "
                f"{self._generation_cycle_steps()} optimizer steps): TRL does not checkpoint the rollouts it reuses, "
                "so a resume from it would not continue the run; resume from an earlier checkpoint")
        if not self.balancer.load(checkpoint_dir):
            log.warning("%s has no balancer state; expert-load history restarts", checkpoint_dir)
        path = checkpoint_dir / MTP_CONTROL_FILE
        if self.mtp_controller is not None:
            if path.exists():
                self.mtp_controller.load_state_dict(json.loads(path.read_text()))
            else:
                log.warning("%s has no %s; the MTP loss weight controller restarts", checkpoint_dir, MTP_CONTROL_FILE)

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
        self._log_agreement("train" if self.model.training else "eval")
        if self.model.training and self._timing.get("step"):
            t = self._timing
            other = t.get("generation", 0.0) + t.get("scoring", 0.0) + t.get("sync_weights", 0.0)
            metrics = self._metrics["train"]
            for key in ("generation", "scoring", "sync_weights"):
                metrics[f"timing/{key}"].append(t.get(key, 0.0))
            if self.args.dynamic_sampling:  # the extra rounds' engine time, and their whole time (scoring too)
                metrics["timing/extra_generation"].append(t.get("extra_generation", 0.0))
                metrics["timing/extra_rounds"].append(t.get("extra_rounds", 0.0))
            metrics["timing/training"].append(max(t["step"] - other, 0.0))
            metrics["timing/step"].append(t["step"])
            metrics["tokens_per_second"].append(self._step_tokens / t["step"])
            self._timing.clear()
            self._step_tokens = 0
        super().log(logs, start_time)
