"""Dynamic sampling (DAPO §3.2): groups whose rewards tie are dropped, more prompts are sampled until
the batch is full of groups with spread, and a resumed run samples the same.

The pure parts (group filter, top-up bookkeeping, prompt draws, batch surgery) on synthetic rewards;
then the trainer with transformers `generate` on the tiny model and a reward that ties on every
prompt with an even answer and varies on the others.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from posttrain.grpo.dynamic_sampling import (TopUp, concat_batches, extra_prompt_indices, group_rows,
                                             groups_with_spread, round_seed, select_rows, split_draw)


def parity_reward(prompts, completions, answer, **kwargs):
    """Ties (1.0 for the whole group) when the gold answer is even; varies with the completion otherwise."""
    return [1.0 if int(a) % 2 == 0 else len(str(c)) / 50.0 + 0.001 * (i % 3) for i, (c, a) in
            enumerate(zip(completions, answer))]


# -- the group filter ---------------------------------------------------------------------------------
def test_groups_with_spread_on_synthetic_rewards():
    r = torch.tensor([[0.0], [0.0], [0.0],   # all wrong: tie
                      [1.0], [1.0], [1.0],   # all right: tie
                      [0.0], [1.0], [0.0],   # spread
                      [float("nan")], [1.0], [1.0],  # one unscored, the rest tie
                      [float("nan")], [0.0], [1.0]])  # one unscored, the rest differ
    assert groups_with_spread(r, None, 3).tolist() == [False, False, True, False, True]
    # the weighted sum decides with sum_then_normalize: here the two functions cancel out
    two = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    assert groups_with_spread(two, torch.tensor([1.0, 1.0]), 2).tolist() == [False, False]
    assert groups_with_spread(two, torch.tensor([2.0, 1.0]), 2).tolist() == [True, True]
    # normalize_then_sum normalises each function within the group: one that differs is enough
    assert groups_with_spread(two, torch.tensor([1.0, 1.0]), 2, "normalize_then_sum").tolist() == [True, True]
    with pytest.raises(ValueError, match="groups of 4"):
        groups_with_spread(torch.zeros(6, 1), None, 4)



def test_groups_with_spread_keeps_to_the_rewards_device_without_weights():
    """`weights=None` (no `reward_weights`): the implicit weights live where the rewards do (CUDA in a
    run). The meta device stands in for a non-CPU one: any tensor created on the CPU fails there."""
    r = torch.empty(8, 2, device="meta")
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        spread = groups_with_spread(r, None, 4, aggregation)
        assert spread.device.type == "meta" and spread.shape == (2,)

# -- top-up bookkeeping -------------------------------------------------------------------------------
def test_top_up_keeps_the_first_groups_with_spread_and_sizes_the_next_round():
    t = TopUp(target=4)
    assert t.add_round(torch.tensor([True, False, True, False])) == [0, 2]
    assert (t.kept, t.dropped, t.rounds, t.full) == ([2], 2, 1, False)
    assert t.next_draw() == 4  # 2 short at a spread rate of 1/2
    assert t.add_round(torch.tensor([False, True, True, True])) == [1, 2]  # only 2 were needed
    assert (t.kept, t.dropped, t.rounds, t.full) == ([4], 3, 2, True)
    assert t.next_draw() == 0
    # nothing with spread yet: a whole batch's worth; never more than a batch, never less than the need
    t = TopUp(target=3)
    t.add_round(torch.tensor([False, False, False]))
    assert t.next_draw() == 3
    t = TopUp(target=8)
    t.add_round(torch.tensor([True] * 7 + [False]))
    assert t.next_draw() == 2  # ceil(1 / (7/8))


def test_top_up_across_ranks_runs_until_every_rank_is_full():
    # gathered in rank order: rank 0's four groups, then rank 1's
    spread = torch.tensor([True, False, False, False, True, True, False, True])
    per_rank = [TopUp(target=2, world=2, rank=r) for r in (0, 1)]
    assert [t.add_round(spread) for t in per_rank] == [[0], [0, 1]]
    for t in per_rank:  # every rank has the same view, so they take the same number of rounds
        assert t.kept == [1, 2] and not t.full and t.next_draw() == 2 and t.dropped == 4
    assert [t.add_round(torch.tensor([False, True, True, True])) for t in per_rank] == [[1], []]
    assert all(t.full for t in per_rank)


def test_extra_prompt_draws_are_deterministic_distinct_and_skip_the_batch():
    a = extra_prompt_indices(5, 100, seed=0, step=3, round_index=1, skip=lambda i: i % 2 == 0)
    assert a == extra_prompt_indices(5, 100, seed=0, step=3, round_index=1, skip=lambda i: i % 2 == 0)
    assert len(set(a)) == 5 and all(i % 2 for i in a)
    others = [extra_prompt_indices(5, 100, 0, 3, 2), extra_prompt_indices(5, 100, 0, 4, 1),
              extra_prompt_indices(5, 100, 1, 3, 1)]
    assert all(o != a for o in others)  # round, step and seed each change the draw
    assert sorted(extra_prompt_indices(10, 10, 0, 0, 1)) == list(range(10))
    assert round_seed(12345, 0) == 12345 and round_seed(12345, 1) != 12345 and round_seed(None, 2) is None


def test_one_draw_is_dealt_out_to_the_ranks_in_equal_disjoint_slices():
    """Ranks drew their extra prompts each on their own, so two ranks could sample the same prompt in one
    round — with the same seed, i.e. the same completions: a duplicated group in the batch."""
    draw = extra_prompt_indices(4 * 2, 40, seed=0, step=1, round_index=1)
    ranks = split_draw(draw, 2)
    assert [len(r) for r in ranks] == [4, 4] and not set(ranks[0]) & set(ranks[1])
    assert split_draw([7, 8, 9], 2) == [[7], [8]]  # uneven: every rank gets as many (TRL gathers need it)
    assert split_draw([7], 2) == [[], []]  # fewer prompts left than ranks: no round at all


def test_select_and_concat_repad_prompts_left_and_completions_right():
    a = {"prompt_ids": torch.tensor([[9, 1], [2, 3]]), "prompt_mask": torch.tensor([[0, 1], [1, 1]]),
         "completion_ids": torch.tensor([[4, 9], [5, 6]]), "completion_mask": torch.tensor([[1, 0], [1, 1]]),
         "advantages": torch.tensor([0.5, -0.5]), "num_items_in_batch": torch.tensor(3)}
    b = {"prompt_ids": torch.tensor([[7, 7, 7]]), "prompt_mask": torch.tensor([[1, 1, 1]]),
         "completion_ids": torch.tensor([[8]]), "completion_mask": torch.tensor([[1]]),
         "advantages": torch.tensor([1.0]), "num_items_in_batch": torch.tensor(1)}
    picked = select_rows(a, [1], 2)
    assert picked["prompt_ids"].tolist() == [[2, 3]] and picked["advantages"].tolist() == [-0.5]
    both = concat_batches([picked, b], pad_token_id=9)
    assert both["prompt_ids"].tolist() == [[9, 2, 3], [7, 7, 7]]
    assert both["prompt_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert both["completion_ids"].tolist() == [[5, 6], [8, 9]]
    assert both["completion_mask"].tolist() == [[1, 1], [1, 0]]
    assert both["advantages"].tolist() == [-0.5, 1.0]
    assert group_rows([0, 2], 3) == [0, 1, 2, 6, 7, 8]


# -- the trainer ----------------------------------------------------------------------------------------
def _cfg(tmp_path: Path, model_dir: Path, **kw):
    from posttrain.grpo.config import GRPORecipeConfig

    base = dict(output_dir=str(tmp_path / "grpo"), model_name_or_path=str(model_dir), use_vllm=False,
                dynamic_sampling=True, max_sampling_rounds=4, per_device_train_batch_size=16, num_generations=4,
                max_completion_length=8, learning_rate=1e-3, max_prompts=64, beta=0.0, save_strategy="no",
                seed=0, logging_steps=1, disable_tqdm=True, report_to="none",
                reward_funcs=[f"{Path(__file__).resolve()}:parity_reward"])
    base.update(kw)
    return GRPORecipeConfig(**base)


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_model_dir, one_torch_thread):
    from posttrain.grpo.run import build_trainer

    return build_trainer(_cfg(tmp_path_factory.mktemp("dynamic_sampling"), tiny_model_dir))


@pytest.mark.slow
def test_tied_groups_are_dropped_and_refilled(trainer):
    ds = trainer.train_dataset
    even = [i for i in range(len(ds)) if int(ds[i]["answer"]) % 2 == 0]
    odd = [i for i in range(len(ds)) if int(ds[i]["answer"]) % 2 == 1]
    tied = {tuple(trainer._tokenize_prompt(ds[i]["prompt"])) for i in even}
    picked = [even[0], odd[0], even[1], odd[1]]  # half of TRL's batch ties
    inputs = [dict(ds[i]) for i in picked for _ in range(4)]
    trainer.model.train()
    batch = trainer._generate_and_score_completions(inputs)
    metrics = trainer._metrics["train"]
    assert metrics["sampling/groups_dropped"][-1] >= 2 and metrics["sampling/rounds"][-1] >= 2
    assert metrics["sampling/groups_kept"][-1] == 4 and metrics["frac_reward_zero_std"][-1] == 0.0
    assert metrics["sampling/frac_reward_zero_std_sampled"][-1] == pytest.approx(0.5)
    # the batch the loss gets: 4 whole groups, none of them from a prompt whose rewards tie
    assert batch["completion_ids"].shape[0] == 16 and batch["advantages"].shape == (16,)
    prompts = [tuple(ids[m.bool()].tolist()) for ids, m in zip(batch["prompt_ids"], batch["prompt_mask"])]
    assert not set(prompts) & tied
    assert all(prompts[i] == prompts[i - i % 4] for i in range(16))
    assert batch["num_items_in_batch"].item() == batch["completion_mask"].sum().item()
    assert math.isfinite(batch["advantages"].abs().sum().item()) and batch["advantages"].abs().sum() > 0


@pytest.mark.slow
def test_a_batch_that_holds_every_prompt_trains_on_its_groups_with_spread(trainer, monkeypatch):
    """No prompt left to top up with (a dataset no larger than the batch): the extra round had no rows and
    TRL's scoring failed on them (IndexError in _generate_and_score_completions)."""
    ds = trainer.train_dataset
    even = [i for i in range(len(ds)) if int(ds[i]["answer"]) % 2 == 0][:2]
    odd = [i for i in range(len(ds)) if int(ds[i]["answer"]) % 2 == 1][:2]
    monkeypatch.setattr(trainer, "train_dataset", ds.select(even + odd))
    inputs = [dict(trainer.train_dataset[i]) for i in range(4) for _ in range(4)]
    trainer.model.train()
    batch = trainer._generate_and_score_completions(inputs)
    metrics = trainer._metrics["train"]
    assert metrics["sampling/rounds"][-1] == 1 and metrics["sampling/groups_kept"][-1] == 2
    assert batch["completion_ids"].shape[0] == 8 and batch["advantages"].abs().sum() > 0


@pytest.mark.slow
def test_grpo_run_with_dynamic_sampling_and_auto_mtp_weight_logs_and_resumes_exactly(tmp_path, tiny_model_dir,
                                                                                     one_torch_thread):
    """Three steps, checkpointed every step; a run resumed from checkpoint-2 logs the same third step:
    the same extra prompts, samples and rewards, and the same closed-loop λ (its state is saved with
    each checkpoint; warm-up shortened to one step so that λ moves within the run)."""
    from posttrain.grpo.run import build_trainer

    keys = ("loss", "reward", "sampling/groups_dropped", "sampling/rounds", "frac_reward_zero_std", "mtp_loss_weight")
    common = dict(max_steps=3, save_strategy="steps", save_steps=1, lr_scheduler_type="constant", mtp_loss_weight="auto",
                  mtp_learning_rate=3e-3)  # the MTP module's own optimizer groups are resumed too
    full = build_trainer(_cfg(tmp_path / "a", tiny_model_dir, **common))
    full.mtp_controller.warmup_steps = 1
    full.train()
    logs = {h["step"]: h for h in full.state.log_history if "loss" in h}
    assert sorted(logs) == [1, 2, 3]
    assert sum(logs[s]["sampling/groups_dropped"] for s in logs) > 0
    assert all(logs[s]["frac_reward_zero_std"] == 0.0 and "timing/extra_generation" in logs[s] for s in logs)
    # λ per step: the start value until the target is known, then one ×1.5 or ×0.9 move
    assert [logs[s]["mtp_loss_weight"] for s in (1, 2)] == [0.3, 0.3]
    assert logs[3]["mtp_loss_weight"] in (pytest.approx(0.45), pytest.approx(0.27))

    resumed = build_trainer(_cfg(tmp_path / "b", tiny_model_dir, **common))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "grpo" / "checkpoint-2"))
    again = {h["step"]: h for h in resumed.state.log_history if "loss" in h}
    for key in keys:
        assert again[3][key] == pytest.approx(logs[3][key], rel=1e-5, abs=1e-7), key
