"""Statistics and the length histogram of a distillation run, rebuilt from its shards
(so a resumed run reports the same numbers as an uninterrupted one)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from .formatting import SAMPLE_TYPE_R1


def percentiles(values: list[int]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "mean": None, "p5": None, "p25": None, "p50": None, "p75": None, "p95": None, "max": None}
    import numpy as np

    a = np.asarray(values, dtype=float)
    q = np.percentile(a, [5, 25, 50, 75, 95])
    return {"count": len(values), "mean": round(float(a.mean()), 2),
            **{f"p{p}": round(float(v), 2) for p, v in zip((5, 25, 50, 75, 95), q)}, "max": int(a.max())}


def _length(row: dict[str, Any], unit: str) -> int:
    return row["completion_tokens"] if unit == "tokens" else row["completion_chars"]


def build_stats(kept_rows: Iterable[dict[str, Any]], rejected_rows: Iterable[dict[str, Any]],
                prompt_stats: dict[str, Any], teacher: str, config: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Returns (stats, lengths) where lengths = {"unit", "kept", "rejected"} for the histogram."""
    r1 = []
    sample_types: Counter[str] = Counter()
    for row in kept_rows:
        sample_types[row["sample_type"]] += 1
        if row["sample_type"] == SAMPLE_TYPE_R1:
            r1.append(row)
    rejected = list(rejected_rows)
    samples = r1 + rejected
    # Tokens only when every sample has a count; mixing units would make the figures meaningless.
    unit = "tokens" if samples and all(r.get("completion_tokens") is not None for r in samples) else "chars"
    reasons = Counter(r["rejection_reason"] for r in rejected)
    verdicts = Counter(r["verdict"] for r in samples)
    total = len(samples)
    kept_sources = {r["source_id"] for r in r1}
    lengths = {"unit": unit, "kept": [_length(r, unit) for r in r1],
               "rejected": [_length(r, unit) for r in rejected]}
    stats = {
        "teacher": teacher,
        "synthetic": teacher.startswith("scripted"),
        "prompts": {**prompt_stats, "with_kept_sample": len(kept_sources)},
        "samples": {
            "total": total,
            "kept": len(r1),
            "rejected": len(rejected),
            "acceptance_rate": round(len(r1) / total, 6) if total else None,
            "verdicts": dict(sorted(verdicts.items())),
        },
        "rejections": {reason: {"count": c, "rate": round(c / total, 6)} for reason, c in sorted(reasons.items())},
        "sft_rows": dict(sorted(sample_types.items())),
        "lengths": {"unit": unit, "kept": percentiles(lengths["kept"]), "rejected": percentiles(lengths["rejected"])},
        "config": config,
    }
    return stats, lengths


def write_histogram(path: Path, lengths: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    kept, rejected = lengths["kept"], lengths["rejected"]
    fig, ax = plt.subplots(figsize=(7, 4))
    both = kept + rejected
    if both:
        lo, hi = min(both), max(both)
        bins = min(50, max(1, hi - lo + 1))
        ax.hist([kept, rejected], bins=bins, range=(lo, hi + 1), label=[f"kept ({len(kept)})",
                f"rejected ({len(rejected)})"], color=["tab:green", "tab:red"], alpha=0.75, histtype="stepfilled")
        ax.legend()
    ax.set_xlabel(f"response length ({lengths['unit']})")
    ax.set_ylabel("samples")
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def write_stats(path: Path, stats: dict[str, Any]) -> None:
    from .shards import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(stats, indent=2, sort_keys=False) + "\n").encode())
