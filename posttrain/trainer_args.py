"""Defaults that SFT and GRPO both set on their transformers `TrainingArguments`, and the one
reading of `report_to` that the recipe parser gives SFT, GRPO and RM alike."""

from __future__ import annotations

import difflib
import json
from typing import Any

from .errors import ConfigError

# What TRL's and transformers' own parsers accept as "no logging integration".
_NO_REPORTING = ("none", "null", "")


def normalize_report_to(value: Any) -> str | list[str]:
    """`report_to` as transformers understands it: "none", "all" or a list of integration names.

    Accepts what a TRL user writes: `none` / `None` / null / [] / [none] (no reporting), `all`, one
    name, a comma-separated string or a list. transformers itself turns a `None` into `[None]` and
    fails in `Trainer.__init__` ("None is not supported"); an unknown name fails there too, after the
    model is loaded. Both are a `ConfigError` here, before anything is loaded."""
    if value is None:
        return "none"
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _NO_REPORTING:
            return "none"
        if text.lower() == "all":
            return "all"
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                import yaml

                value = yaml.safe_load(text)
        else:
            value = text.split(",")
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"'report_to' expects none, all, a name or a list of names, got {value!r}")
    names = []
    for item in value:
        if item is None or (isinstance(item, str) and item.strip().lower() in _NO_REPORTING):
            continue
        if not isinstance(item, str):
            raise ConfigError(f"'report_to' expects integration names, got {item!r}")
        names.append(item.strip())
    if not names:
        return "none"
    if names == ["all"]:
        return "all"
    known = _known_integrations()
    for name in names:
        if known and name not in known:
            close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"'report_to': unknown integration {name!r}{hint} (choose none, all or any of "
                              f"{', '.join(known)})")
    return names


def _known_integrations() -> list[str]:
    try:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    except ImportError:  # another transformers layout: let transformers judge the names
        return []
    return list(INTEGRATION_TO_CALLBACK)


def apply_process_defaults(args: Any, mtp_module_unused: bool) -> None:
    """Called from the recipe configs' `__post_init__`, before transformers' own."""
    import torch

    args.report_to = normalize_report_to(args.report_to)
    if not torch.cuda.is_available():
        # Without it transformers sets up no process group on a CPU-only machine, and
        # `accelerate launch --num_processes 2` would run two independent single-process jobs.
        args.use_cpu = True
    if args.ddp_find_unused_parameters is None:
        # When the MTP module is trained every parameter takes part (routed experts are fused
        # tensors) and DDP's unused-parameter search is wasted work; it would also trip over the
        # output head, which the main and MTP heads share. With λ = 0 the MTP module is unused.
        args.ddp_find_unused_parameters = mtp_module_unused
