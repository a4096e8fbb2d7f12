"""Which Trainer checkpoint a run resumes from (SFT, GRPO and the recipe chain share this)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


RUN_CONFIG_FILE = "run_config.json"
# What a saved model leaves in a directory (the final output of sft, grpo, rm train; init-model; convert)
MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_config.json")
# Settings a resumed run may change without changing what it trains: bookkeeping and where it stops.
_RESUME_FREE = {"output_dir", "resume_from_checkpoint", "max_steps", "num_train_epochs", "run_name", "report_to",
                "disable_tqdm", "overwrite_output_dir", "dataloader_num_workers", "push_to_hub", "project"}
_RESUME_FREE_PREFIXES = ("logging_", "log_", "save_", "eval_", "hub_", "trackio_")


def resumable_settings(config: Any) -> dict[str, Any]:
    """The config as a resumed run compares it with the one that wrote the checkpoint (no secrets: no
    `*token*` fields)."""
    from .recipe import config_to_dict

    return {k: v for k, v in config_to_dict(config).items()
            if "token" not in k and k not in _RESUME_FREE and not k.startswith(_RESUME_FREE_PREFIXES)}


def changed_settings(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`name: old -> new` for each setting that differs (a setting only one side has counts)."""
    def shown(settings: dict[str, Any], key: str) -> str:
        return repr(settings[key]) if key in settings else "(unset)"

    return [f"{k}: {shown(before, k)} -> {shown(now, k)}" for k in sorted(set(before) | set(now))
            if k not in before or k not in now or before[k] != now[k]]


class DeepSeekLayoutCheckpoints:
    """Trainer mixin (put it before the Trainer class): checkpoints and the final model are
    DeepSeek-layout directories whatever the process layout, and resume through the one strict,
    layout-aware loader.

    Under FSDP2 transformers (5.19) writes model weights only for `FULL_STATE_DICT` (the shipped
    671B config uses `SHARDED_STATE_DICT`, which would leave `checkpoint-N` without weights that
    transformers or vLLM can read). Here every rank takes part in gathering the full state dict
    and rank 0 writes it with the model's `save_pretrained` (per-expert names, the MTP layer at
    `model.layers.{N}`, the routers' biases)."""

    # -- the trainer's own state beside each checkpoint ------------------------------------------
    def checkpoint_state_files(self) -> list[str]:
        """Files this trainer writes into every `checkpoint-N` besides Trainer's (the balancer's state,
        GRPO's λ controller). A checkpoint without all of them is incomplete and never resumed from."""
        return []

    def save_checkpoint_state(self, checkpoint_dir: Path) -> None:
        """Writes `checkpoint_state_files()` into `checkpoint_dir`, each atomically (rank 0 only)."""

    def load_checkpoint_state(self, checkpoint_dir: Path) -> None:
        """Restores what `save_checkpoint_state` wrote, before training resumes."""

    def resolve_resume(self, value: str | bool | Path | None) -> str | None:
        """`resume_from_checkpoint` as SFT, GRPO and the chain read it, with this trainer's own
        completeness rule (`checkpoint_state_files`). A fresh start in an output_dir that holds an
        earlier run is refused unless `overwrite_output_dir` (Trainer would write over its checkpoints
        and final model, and a later resume could pick up one of the earlier run's checkpoints)."""
        found = resolve_resume(value, self.args.output_dir, self.checkpoint_state_files())
        if found is None:
            self._clear_earlier_run()
        return found

    def _clear_earlier_run(self) -> None:
        from .errors import ConfigError

        out = Path(self.args.output_dir)
        checkpoints = sorted(p for p in out.glob("checkpoint-*") if p.is_dir() and p.name[len("checkpoint-"):].isdigit())
        # a model written there (another run's output, or the very model this run starts from) would be written over
        model_files = [name for name in MODEL_FILES if (out / name).is_file()]
        if not checkpoints and not (out / "trainer_state.json").is_file() and not model_files:
            return
        if not getattr(self.args, "overwrite_output_dir", False):
            source = getattr(self.args, "model_name_or_path", None)
            if source and Path(source).expanduser().resolve() == out.expanduser().resolve():
                raise ConfigError(f"output_dir {out} is model_name_or_path: the run would write over the model it "
                                  "starts from; choose another output_dir")
            earlier = [p.name for p in checkpoints[:3]] or (["trainer_state.json"] if (out / "trainer_state.json").is_file()
                                                            else model_files)
            raise ConfigError(f"output_dir {out} holds an earlier run ({', '.join(earlier)}{' …' if len(checkpoints) > 3 else ''}): "
                              "resume it with --resume_from_checkpoint true, choose another output_dir, or start "
                              "over with --overwrite_output_dir true")
        if self.args.should_save:
            import shutil

            for ckpt in checkpoints:
                shutil.rmtree(ckpt)
            log.warning("overwrite_output_dir: removed %d checkpoint(s) of the earlier run in %s", len(checkpoints), out)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model, trial) -> None:
        # Trainer (5.19) writes trainer_state.json, then deletes checkpoints beyond save_total_limit, then
        # runs the on_save callbacks: state saved there is missing from the new checkpoint while the old
        # ones are already gone, so a kill in between leaves nothing to resume from. Written first, the
        # state is in place before trainer_state.json marks the checkpoint written and before any rotation.
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            checkpoint_dir = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            self.save_checkpoint_state(checkpoint_dir)
            from data_pipelines.shards import atomic_write_bytes

            settings = json.dumps(resumable_settings(self.args), indent=1, sort_keys=True, default=str) + "\n"
            atomic_write_bytes(checkpoint_dir / RUN_CONFIG_FILE, settings.encode())
        super()._save_checkpoint(model, trial)

    def _warn_changed_settings(self, checkpoint_dir: Path) -> None:
        """A resume with other settings than the run that wrote the checkpoint is allowed (as in Trainer) but
        said: the new values apply, except that the optimizer and LR scheduler continue from their saved state."""
        try:
            before = json.loads((checkpoint_dir / RUN_CONFIG_FILE).read_text())
        except (OSError, ValueError):
            return  # written before run_config.json existed
        changed = changed_settings(before, resumable_settings(self.args))
        if changed:
            log.warning("resuming %s with settings that differ from the run that wrote it (the optimizer and the "
                        "learning-rate schedule continue from their saved state): %s", checkpoint_dir,
                        "; ".join(changed))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """A restart from a checkpoint that already reached `max_steps` trains nothing (transformers
        5.19 would run one more step): the checkpoint's weights and state are loaded, so what the
        caller saves afterwards is the finished run's model."""
        from transformers.trainer_utils import TrainOutput

        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = self.resolve_resume(True)
        if isinstance(checkpoint, (str, Path)):
            self.load_checkpoint_state(Path(checkpoint))
            self._warn_changed_settings(Path(checkpoint))
        if isinstance(checkpoint, (str, Path)) and self.args.max_steps and self.args.max_steps > 0:
            from transformers import TrainerState

            state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
            if state.global_step >= self.args.max_steps:
                log.info("%s is at step %d of max_steps %d: nothing left to train", checkpoint, state.global_step,
                         self.args.max_steps)
                self._load_from_checkpoint(str(checkpoint))
                self.state = state
                return TrainOutput(state.global_step, None, {"train_runtime": 0.0})
        return super().train(resume_from_checkpoint=checkpoint, **kwargs)

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
    with `load_state_dict(strict=False)`, which silently skips the per-expert tensors.

    The names and shapes are checked against the model from the files' headers first, then the
    tensors are read one decoder layer at a time (the grouping of the weight sync): host memory holds
    one layer and its fused copy, not the whole checkpoint twice -- 5.5 TB per rank for V3's fp32
    master weights. Under FSDP2 only rank 0 reads, and broadcasts each layer into the other ranks'
    shards (a collective: every rank calls this)."""
    import contextlib

    import torch
    import torch.distributed as dist
    from safetensors import safe_open

    from . import distributed
    from .errors import UserError
    from .layout import from_deepseek_layout, layer_group, layer_group_order
    from .modeling import unwrap_model

    files = sorted(Path(checkpoint_dir).glob("model*.safetensors"))
    if not files:
        return False
    live = unwrap_model(model)
    sharded = distributed.model_is_sharded(live)
    reads = not sharded or not dist.is_initialized() or dist.get_rank() == 0
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu")) for f in files]
        where = {name: h for h in handles for name in h.keys()}
        # every rank plans the same groups from the headers, so the collectives below pair up
        groups: dict[str, list[str]] = {}
        for name in where:
            groups.setdefault(layer_group(name), []).append(name)
        try:
            planned = from_deepseek_layout(
                {n: torch.empty(where[n].get_slice(n).get_shape(), device="meta") for n in where})
        except ValueError as e:
            raise UserError(f"checkpoint {checkpoint_dir} does not match the model: {e}") from None
        _check_same_tensors(checkpoint_dir, planned, live.state_dict())
        for group in sorted(groups, key=layer_group_order):
            state = from_deepseek_layout({n: where[n].get_tensor(n) for n in groups[group]}) if reads else {}
            distributed.load_full_state_dict(live, state, strict=False, from_rank0=sharded)
            del state
    return True


def _check_same_tensors(checkpoint_dir: str | Path, planned: dict, live: dict) -> None:
    """What a strict `load_state_dict` checks (the same names, the same shapes), before anything is read."""
    from .errors import UserError

    problems = []
    if missing := sorted(set(live) - set(planned)):
        problems.append(f"missing {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    if unexpected := sorted(set(planned) - set(live)):
        problems.append(f"unexpected {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
    problems += [f"{k} has shape {tuple(planned[k].shape)} in the checkpoint, {tuple(live[k].shape)} in the model"
                 for k in sorted(set(planned) & set(live)) if tuple(planned[k].shape) != tuple(live[k].shape)]
    if problems:
        raise UserError(f"checkpoint {checkpoint_dir} does not match the model: {'; '.join(problems)}")
