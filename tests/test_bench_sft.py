"""benchmarks/bench_sft.py: the throughput it reports counts the tokens of the steps it times."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_sft  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _CountingModel(nn.Module):
    """Records the real tokens of every batch its forward gets (one forward per optimizer step here)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen: list[int] = []

    def forward(self, input_ids, attention_mask, **kwargs):
        self.seen.append(int(attention_mask.sum()))
        return {"loss": (self.w * input_ids.float().mean()).sum()}


def _pad(examples):
    width = max(len(e["ids"]) for e in examples)
    ids = torch.tensor([e["ids"] + [0] * (width - len(e["ids"])) for e in examples])
    mask = torch.tensor([[1] * len(e["ids"]) + [0] * (width - len(e["ids"])) for e in examples])
    return {"input_ids": ids, "attention_mask": mask}


def test_timed_tokens_are_those_of_the_timed_steps(tmp_path, monkeypatch):
    """The Trainer's dataloader (accelerate) collates one batch ahead of the step that uses it, so the meter has one
    batch more than there were steps; step i (from 1) trains on the i-th collated batch. The timed steps' tokens
    must be those batches', not the next ones' (the last of which was never trained on)."""
    from transformers import Trainer, TrainingArguments

    data = [{"ids": list(range(1, 2 + (7 * i) % 23))} for i in range(64)]  # lengths 1..23 tokens
    model = _CountingModel()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=7, per_device_train_batch_size=2, report_to="none",
                             save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_pin_memory=False,
                             disable_tqdm=True, remove_unused_columns=False, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=_pad)
    # its end-of-training gc.collect() walks every object of the test worker: seconds, for nothing here
    monkeypatch.setattr(trainer.accelerator, "free_memory", lambda *objects: objects)
    warmup = 3
    result = bench_sft._train_timed(trainer, "toy", warmup)
    timed = model.seen[warmup:]
    assert len(model.seen) == 7 and len(timed) == 4
    assert result["tokens_per_step"] == pytest.approx(sum(timed) / len(timed))
