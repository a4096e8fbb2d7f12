"""`dsv3-posttrain rm`: train the V3-based reward model, or score a jsonl file with one.

    dsv3-posttrain rm train --recipe recipes/rm-tiny.yaml [--key value ...]
    dsv3-posttrain rm score --model runs/rm-tiny --input rows.jsonl --output scored.jsonl

`cli.py` routes `rm` here (`main_rm(argv)`); user errors raise `UserError` / `RewardError`, which the
top-level command prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError

USAGE = """usage: dsv3-posttrain rm {train,score} ...

The V3-based reward model (DeepSeek-V3 report §5.2.1): a DeepSeek-V3 backbone with a scalar head,
trained on preference pairs with the Bradley-Terry loss, then used as a reward (`reward_model:PATH`).

  rm train --recipe FILE [--key value ...]   train on (prompt, chosen, rejected) pairs; see `rm train --help`
  rm score --model DIR --input FILE.jsonl --output FILE.jsonl [--batch_size N] [--max_length N]
                                             score each row's (prompt, completion); see `rm score --help`
"""


def main_rm(argv: list[str]) -> int:
    """Entry point of `dsv3-posttrain rm`; returns the exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    action, rest = argv[0], list(argv[1:])
    if action == "train":
        return _train(rest)
    if action == "score":
        return _score(rest)
    raise UserError(f"unknown action {action!r}: use `rm train` or `rm score` (see `dsv3-posttrain rm --help`)")


# --- train -------------------------------------------------------------------------------------
def _train(argv: list[str]) -> int:
    from ..recipe import describe_fields, load_config, require_output_path, split_recipe_arg
    from .config import RMRecipeConfig

    if any(a in ("-h", "--help") for a in argv):
        print("usage: dsv3-posttrain rm train [--recipe FILE] [--key value ...]\n\n"
              "Train the reward model (report §5.2.1): V3 backbone + scalar head, Bradley-Terry loss on "
              "(prompt, chosen, rejected) pairs, TRL's RewardTrainer. Writes the model and tokenizer to "
              "output_dir (AutoModelForSequenceClassification layout) and rm_summary.json with the "
              "held-out pairwise accuracy.\n\n"
              f"Options (any field below, from the recipe or as --key value):\n{describe_fields(RMRecipeConfig)}")
        return 0
    recipe, rest = split_recipe_arg(argv)
    cfg = load_config(RMRecipeConfig, recipe, rest, section="rm")
    require_output_path(cfg.output_dir, "output_dir", directory=True)
    from .run import run_rm_training

    summary = run_rm_training(cfg)
    acc = summary.get("eval_accuracy")
    extra = f", held-out accuracy {acc:.3f} on {summary['eval_pairs']} pairs" if acc is not None else ""
    print(f"rm train: {summary['global_step']} steps on {summary['train_pairs']} pairs -> {cfg.output_dir}{extra}")
    return 0


# --- score -------------------------------------------------------------------------------------
def read_score_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file, each with `prompt` (text or messages) and `completion` (text or messages)."""
    from data_pipelines.errors import DataError
    from data_pipelines.loading import read_jsonl_objects
    from rewards import RewardError

    if not path.is_file():
        raise RewardError(f"{path}: no such file")
    try:
        records, line_numbers = read_jsonl_objects(path)
    except DataError as e:
        raise RewardError(str(e)) from None
    rows = []
    for row, n in zip(records, line_numbers):
        missing = [c for c in ("prompt", "completion") if c not in row or row[c] is None]
        if missing:
            raise RewardError(f"{path} line {n}: missing {' and '.join(repr(c) for c in missing)} "
                              f"(columns: {sorted(row)})")
        for col in ("prompt", "completion"):
            v = row[col]
            ok = isinstance(v, str) or (isinstance(v, list) and v and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in v))
            if not ok:
                raise RewardError(f"{path} line {n}: '{col}' must be text or a list of "
                                  f"{{'role', 'content'}} messages, got {json.dumps(v)[:80]}")
        rows.append(row)
    if not rows:
        raise RewardError(f"{path}: no rows")
    return rows


def _score(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dsv3-posttrain rm score",
        description="Score each row of a jsonl file (`prompt` + `completion`, text or chat messages) with a "
        "reward model from `rm train`; writes the rows back with a `score` column (the RM's scalar output).",
    )
    p.add_argument("--model", required=True, help="reward model directory (`rm train` output_dir)")
    p.add_argument("--input", required=True, help="jsonl with `prompt` and `completion` columns")
    p.add_argument("--output", required=True, help="jsonl to write (input rows + `score`)")
    p.add_argument("--batch_size", type=int, default=16, help="rows per forward pass (default: 16)")
    p.add_argument("--max_length", type=int, default=None, help="longest tokenized row; longer rows keep their end")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--sigmoid", action="store_true", help="write sigmoid(score) in (0, 1) instead of the raw score")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # argparse already printed the problem (or --help)
        return int(e.code or 0)
    from rewards.reward_model import RewardModelScorer

    from ..recipe import require_model_dir, require_output_path

    rows = read_score_rows(Path(args.input))
    require_output_path(args.output, "output", directory=False)
    require_model_dir(args.model, "model")
    scorer = RewardModelScorer(args.model, batch_size=args.batch_size, device=args.device,
                               max_length=args.max_length, sigmoid=args.sigmoid, show_progress=True)
    scores = scorer([r["prompt"] for r in rows], [r["completion"] for r in rows])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row, s in zip(rows, scores):
            f.write(json.dumps({**row, "score": s}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    print(f"rm score: {len(rows)} rows -> {out}", file=sys.stderr)
    return 0
