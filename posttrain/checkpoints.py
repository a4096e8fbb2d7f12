"""Which Trainer checkpoint a run resumes from (SFT, GRPO and the recipe chain share this)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


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
