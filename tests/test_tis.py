"""Truncated importance sampling with the old policy's log-probs from the training forward
(posttrain/grpo/tis.py, `old_logps_from_training_forward`): TRL's ratio in every mode, the same loss,
gradients and agreement metrics as TRL's separate forward, and that forward no longer run."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from posttrain.grpo.tis import AgreementStats, importance_ratio

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENGTH_REWARD = str(Path(__file__).with_name("rewards_for_tests.py")) + ":length_reward"
# (mode, clip_min, clip_max): bounds inside the spread the perturbed engine below produces, so every
# mode truncates or masks some tokens or sequences and keeps others
MODES = [("token_truncate", None, 1.1), ("token_mask", 0.9, 1.1), ("sequence_truncate", 0.8, 1.2),
         ("sequence_mask", 0.8, 1.2)]


# --- the ratio itself -------------------------------------------------------------------------------
def test_importance_ratio_truncates_or_masks_per_token_or_per_sequence():
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    sampling = torch.tensor([[-1.5, -1.0, float("nan"), -3.0]])  # the engine could not score token 2
    mask = torch.tensor([[1, 1, 1, 0]])  # token 3 is padding
    # per-token log ratios: +0.5, -1.0, (NaN: agrees) 0, (padding) 0
    e = math.exp

    def ratio(mode, low, high):
        return importance_ratio(old, sampling, mask, mode, low, high)[0].tolist()

    assert ratio("token_truncate", None, 1.5) == pytest.approx([1.5, e(-1.0), 1.0, 1.0])
    assert ratio("token_truncate", 0.5, None) == pytest.approx([e(0.5), 0.5, 1.0, 1.0])
    assert ratio("token_mask", 0.5, 1.5) == pytest.approx([0.0, 0.0, 1.0, 1.0])
    assert ratio("token_mask", None, 2.0) == pytest.approx([e(0.5), e(-1.0), 1.0, 1.0])
    # a sequence's ratio is the product over its tokens: exp(0.5 - 1.0)
    assert ratio("sequence_truncate", 0.7, 2.0) == pytest.approx([0.7])
    assert ratio("sequence_mask", 0.7, 2.0) == [0.0]
    assert ratio("sequence_mask", 0.5, 2.0) == pytest.approx([e(-0.5)])
    with pytest.raises(ValueError, match="token_truncate"):
        importance_ratio(old, sampling, mask, "token", None, 2.0)


def test_agreement_stats_add_up_over_micro_batches_and_ranks():
    stats = AgreementStats()
    assert stats.empty
    mask = torch.tensor([[1, 1, 0]])
    stats.add(torch.tensor([[-1.0, -2.0, 0.0]]), torch.tensor([[-1.5, -2.0, 9.0]]), mask, torch.tensor([[1.5, 1.0, 7.0]]),
              per_sequence=False)
    stats.add(torch.tensor([[-1.0, -1.0, -1.0]]), torch.tensor([[-1.0, float("nan"), -1.25]]), torch.tensor([[1, 1, 1]]),
              torch.tensor([[1.0, 1.0, 1.25]]), per_sequence=False)
    other_rank = AgreementStats()
    other_rank.add(torch.tensor([[0.0]]), torch.tensor([[-2.0]]), torch.tensor([[1]]), torch.tensor([[0.5]]),
                    per_sequence=True)
    rows = torch.stack([stats.totals, other_rank.totals])  # what accelerate's gather hands back, flattened
    m = stats.metrics(lambda t: rows.flatten())
    assert stats.empty  # reset by metrics()
    # |Δ| over scored, unmasked tokens: 0.5, 0, 0, 0.25 (NaN left out), 2.0
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx(2.75 / 5)
    assert m["sampling/sampling_logp_difference/max"] == 2.0
    # ratios over unmasked tokens: 1.5, 1.0, 1.0, 1.0, 1.25, 0.5
    assert m["sampling/importance_sampling_ratio/min"] == 0.5 and m["sampling/importance_sampling_ratio/max"] == 1.5
    assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(6.25 / 6)
    assert AgreementStats().metrics()["sampling/importance_sampling_ratio/mean"] == 0.0  # nothing measured: TRL's 0.0


# --- against TRL, on one batch ---------------------------------------------------------------------
class PerturbedLogprobs:
    """The wrapped engine's samples, with its log-probs moved by a fixed pattern: a sampler that disagrees
    with the trainer by up to ±0.3 nats a token (another kernel, dtype or FP8 would, by less)."""

    def __init__(self, engine):
        self.engine, self.name = engine, engine.name

    def generate(self, prompt_ids, n, sampling):
        out = self.engine.generate(prompt_ids, n, sampling)
        for p, completions in enumerate(out):
            for c, completion in enumerate(completions):
                completion.logprobs = [lp + 0.3 * math.sin(1.7 * i + 2.3 * c + p) for i, lp in enumerate(completion.logprobs)]
        return out

    def sync_weights(self, weights):
        return self.engine.sync_weights(weights)

    def close(self):
        self.engine.close()


def _trainer(tmp_path, model_dir, in_loss: bool, **kw):
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.grpo.run import build_trainer

    cfg = GRPORecipeConfig(output_dir=str(tmp_path / f"grpo-{in_loss}"), model_name_or_path=str(model_dir), use_vllm=False,
                           per_device_train_batch_size=8, num_generations=4, max_completion_length=10, max_prompts=8,
                           beta=0.0, save_strategy="no", seed=0, report_to="none", disable_tqdm=True,
                           reward_funcs=[LENGTH_REWARD], old_logps_from_training_forward=in_loss, **kw)
    trainer = build_trainer(cfg)
    trainer.engine = PerturbedLogprobs(trainer.engine)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before it computes a loss
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module")
def trainers(tmp_path_factory, tiny_model_dir):
    """TRL's path (a separate forward scores the old log-probs) and ours, on the same checkpoint."""
    tmp = tmp_path_factory.mktemp("tis")
    return _trainer(tmp, tiny_model_dir, in_loss=False), _trainer(tmp, tiny_model_dir, in_loss=True)


def _count_policy_forwards(trainer, monkeypatch) -> list[bool]:
    calls: list[bool] = []
    original = type(trainer)._get_per_token_logps_and_entropies

    def counted(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(trainer), "_get_per_token_logps_and_entropies", counted)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("mode,clip_min,clip_max", MODES, ids=[m[0] for m in MODES])
def test_the_ratio_from_the_training_forward_is_trls_from_its_separate_forward(trainers, monkeypatch, mode, clip_min,
                                                                               clip_max):
    """The same batch through both: TRL's scoring (its own ratio code) and then its loss, and our loss on the
    batch without TRL's old log-probs. The trainer's log-probs are the same function of the same weights and
    rows in both (a no-grad forward vs the training forward, fp32): equal up to fp32 rounding of the forward
    (|log p| < 10 here, so well under 1e-5; bit for bit on an AVX-512 CPU), far below the 0.3-nat
    disagreement the ratio corrects."""
    trl, ours = trainers
    for t in trainers:
        monkeypatch.setattr(t, "vllm_importance_sampling_mode", mode)
        monkeypatch.setattr(t, "vllm_importance_sampling_clip_min", clip_min)
        monkeypatch.setattr(t, "vllm_importance_sampling_clip_max", clip_max)
    ds = trl.train_dataset
    inputs = [dict(ds[i]) for i in range(2) for _ in range(4)]
    forwards = _count_policy_forwards(trl, monkeypatch)
    batch = trl._generate_and_score_completions(inputs)
    assert forwards == [False]  # TRL's path: one no-grad forward scores the old policy
    expected = batch["importance_sampling_ratio"]
    logged = {k: v[-1] for k, v in trl._metrics["train"].items() if k.startswith("sampling/")}

    ours_batch = {k: v for k, v in batch.items() if k not in ("old_per_token_logps", "importance_sampling_ratio")}
    losses, grads = [], []
    for trainer, b in ((trl, batch), (ours, ours_batch)):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, b)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    ratio = ours_batch["importance_sampling_ratio"]
    assert ratio.shape == expected.shape == ((8, 1) if mode.startswith("sequence") else batch["completion_mask"].shape)
    torch.testing.assert_close(ratio, expected, rtol=1e-4, atol=1e-5)
    # the bounds bite: some ratios truncated or masked, some not
    mask = batch["completion_mask"].bool() if ratio.shape[1] > 1 else torch.ones_like(ratio, dtype=torch.bool)
    bound = (ratio == 0) if mode.endswith("mask") else (ratio == clip_max) | (ratio == (clip_min or -1))
    assert bound[mask].any() and (~bound[mask]).any(), ratio
    assert losses[1] == pytest.approx(losses[0], rel=1e-5, abs=1e-7)
    assert grads[0].keys() == grads[1].keys()
    for name, expected_grad in grads[0].items():
        # fp32 sums over the batch's tokens in another order (a GPU's atomics): ~1e-6 of the tensor's scale at most
        scale = expected_grad.abs().max().item()
        torch.testing.assert_close(grads[1][name], expected_grad, rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=name)
    # the agreement metrics TRL logged from its scoring, ours from the loss
    ours._log_agreement("train")
    for key, value in logged.items():
        assert ours._metrics["train"][key][-1] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert ours._metrics["train"]["rollout/logprob_diff_max"][-1] == ours._metrics["train"][
        "sampling/sampling_logp_difference/max"][-1] > 0.1
    trl._metrics["train"].clear()
    ours._metrics["train"].clear()


@pytest.mark.slow
def test_on_policy_scoring_runs_no_forward_and_other_schedules_keep_trls(trainers, tmp_path, tiny_model_dir, monkeypatch,
                                                                        caplog):
    _, ours = trainers
    ds = ours.train_dataset
    forwards = _count_policy_forwards(ours, monkeypatch)
    batch = ours._generate_and_score_completions([dict(ds[i]) for i in range(2) for _ in range(4)])
    assert forwards == [] and "old_per_token_logps" not in batch and "sampling_per_token_logps" in batch
    ours.compute_loss(ours.model, batch)
    assert forwards == [True]  # the training forward, which also gave the ratio
    assert "importance_sampling_ratio" in batch
    ours._agreement["train"].metrics()  # leave no totals behind for other tests

    # rollouts reused across optimizer steps (generated every 2): the old policy is not the training
    # forward's, so TRL's separate forward stays
    with caplog.at_level(logging.INFO, logger="posttrain.grpo.trainer"):
        off_policy = _trainer(tmp_path, tiny_model_dir, in_loss=True, steps_per_generation=2)
    assert not off_policy._old_logps_in_loss and off_policy.vllm_importance_sampling_correction
    assert "rollouts are reused over 2 optimizer steps" in caplog.text
