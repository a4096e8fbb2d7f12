"""Which Trainer checkpoint a run resumes from (SFT, GRPO and the recipe chain share this)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


RESUME_LAST = ("true", "last", "latest", "yes", "1")
RESUME_NO = ("false", "no", "none", "0", "")


def resolve_resume(value: str | bool | Path | None, output_dir: str | Path, required_files: Sequence[str] = ()) -> str | None:
    """The one resume rule of SFT, GRPO, the reward model and the chain: `resume_from_checkpoint`
    is false/None (start fresh), true / "last" (the newest complete checkpoint in `output_dir`; an
    error if there is none) or a checkpoint directory. Returns the directory to resume from, or None."""
    from .errors import ConfigError

    if value is None or value is False:
        return None
    text = str(value).strip()
    if value is True or text.lower() in RESUME_LAST:
        found = last_complete_checkpoint(output_dir, required_files)
        if found is None:
            raise ConfigError(f"resume_from_checkpoint: no complete checkpoint-N in {output_dir} to resume from")
        return found
    if text.lower() in RESUME_NO:
        return None
    if not (Path(text) / "trainer_state.json").is_file():
        raise ConfigError(f"resume_from_checkpoint: {text} is not a checkpoint directory (no trainer_state.json)")
    return text


def last_complete_checkpoint(output_dir: str | Path, required_files: Sequence[str] = ()) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that was written to the end, or None.

    Trainer (transformers 5.19) writes a checkpoint in place — model, optimizer, RNG, then
    `trainer_state.json`; callbacks such as the balancer's save after that — so a run killed while
    saving leaves a partial last checkpoint, which `transformers.trainer_utils.get_last_checkpoint`
    would pick. Complete means a readable `trainer_state.json` plus every file in `required_files`.
    """
    out = Path(output_dir)
    if not out.is_dir():
        return None
    steps = sorted(
        (int(p.name[len("checkpoint-"):]) for p in out.glob("checkpoint-*")
         if p.is_dir() and p.name[len("checkpoint-"):].isdigit()),
        reverse=True,
    )
    for step in steps:
        ckpt = out / f"checkpoint-{step}"
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
        except (OSError, ValueError):
            log.warning("skipping incomplete checkpoint %s (no readable trainer_state.json)", ckpt)
            continue
        missing = [f for f in required_files if not (ckpt / f).exists()]
        if missing:
            log.warning("skipping incomplete checkpoint %s (missing %s)", ckpt, ", ".join(missing))
            continue
        return str(ckpt)
    return None


class DeepSeekLayoutCheckpoints:
    """Trainer mixin (put it before the Trainer class): checkpoints and the final model are
    DeepSeek-layout directories whatever the process layout, and resume through the one strict,
    layout-aware loader.

    Under FSDP2 transformers (5.19) writes model weights only for `FULL_STATE_DICT` (the shipped
    671B config uses `SHARDED_STATE_DICT`, which would leave `checkpoint-N` without weights that
    transformers or vLLM can read). Here every rank takes part in gathering the full state dict
    and rank 0 writes it with the model's `save_pretrained` (per-expert names, the MTP layer at
    `model.layers.{N}`, the routers' biases)."""

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """A restart from a checkpoint that already reached `max_steps` trains nothing (transformers
        5.19 would run one more step): the checkpoint's weights and state are loaded, so what the
        caller saves afterwards is the finished run's model."""
        from transformers.trainer_utils import TrainOutput

        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = last_complete_checkpoint(self.args.output_dir)
        if isinstance(checkpoint, (str, Path)) and self.args.max_steps and self.args.max_steps > 0:
            from transformers import TrainerState

            state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
            if state.global_step >= self.args.max_steps:
                log.info("%s is at step %d of max_steps %d: nothing left to train", checkpoint, state.global_step,
                         self.args.max_steps)
                self._load_from_checkpoint(str(checkpoint))
                self.state = state
                return TrainOutput(state.global_step, None, {"train_runtime": 0.0})
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        from .distributed import gather_full_state_dict, model_is_sharded
        from .modeling import unwrap_model

        if not model_is_sharded(self.model):
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state = gather_full_state_dict(self.model)  # collective: every rank, rank 0 receives
        if self.args.should_save:
            import os

            import torch
            from transformers.trainer import TRAINING_ARGS_NAME

            os.makedirs(output_dir, exist_ok=True)
            unwrap_model(self.model).save_pretrained(output_dir, state_dict=state)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.model if model is None else model
        if not load_deepseek_checkpoint(model, resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)


def load_deepseek_checkpoint(model: "torch.nn.Module", checkpoint_dir: str | Path) -> bool:
    """Loads a DeepSeek-layout checkpoint (`model*.safetensors`, per-expert names) into a live
    model, strictly, sharded (FSDP2) or not. False when the directory has no such files (an
    adapter or FSDP-native checkpoint: the caller falls back to Trainer's loading).

    The one resume path of SFT, GRPO and the reward model: transformers' Trainer (5.19) reloads
    with `load_state_dict(strict=False)`, which silently skips the per-expert tensors."""
    from safetensors.torch import load_file

    from .distributed import load_full_state_dict
    from .errors import UserError
    from .layout import from_deepseek_layout
    from .modeling import unwrap_model

    files = sorted(Path(checkpoint_dir).glob("model*.safetensors"))
    if not files:
        return False
    state: dict = {}
    for f in files:
        state.update(load_file(str(f), device="cpu"))
    try:
        load_full_state_dict(unwrap_model(model), from_deepseek_layout(state), strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"checkpoint {checkpoint_dir} does not match the model: {e}") from None
    return True
