"""The report card's uncertainty: Wilson intervals per stage and the paired GRPO − SFT interval, on
known values, and printed by `write_report` from what the eval stage writes."""

from __future__ import annotations

import json

import pytest

from eval_hooks.report import paired_difference, wilson_interval, write_report


def test_wilson_interval_known_values():
    # 30 of 100: the textbook 95% Wilson interval is [0.2189, 0.3958]
    assert wilson_interval(30, 100) == pytest.approx((0.21895, 0.39585), abs=5e-5)
    # at the edges it stays inside [0, 1] and is not degenerate: 0 of 10 -> [0, 0.2775]
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=5e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=5e-5)


def test_paired_difference_known_values():
    # 100 problems: 15 only the later checkpoint gets right, 5 only the earlier, 80 agree
    before = [False] * 15 + [True] * 5 + [True] * 40 + [False] * 40
    after = [True] * 15 + [False] * 5 + [True] * 40 + [False] * 40
    d = paired_difference(before, after)
    # (15 - 5) / 100 ± 1.96 · sqrt(20 - 10² / 100) / 100
    assert d["difference"] == pytest.approx(0.10)
    assert d["ci95"] == pytest.approx([0.10 - 0.085433, 0.10 + 0.085433], abs=1e-5)
    assert (d["only_after_right"], d["only_before_right"], d["n"]) == (15, 5, 100)
    # the same accuracies with many more disagreements: a wider interval that includes 0
    wide = paired_difference([True] * 30 + [False] * 70, [False] * 25 + [True] * 40 + [False] * 35)
    assert wide["difference"] == pytest.approx(0.10) and wide["ci95"][0] < 0 < wide["ci95"][1]
    with pytest.raises(ValueError):
        paired_difference([True], [True, False])


def test_report_prints_intervals_and_the_paired_difference(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    per_problem = {"init": [False] * 100,
                   "sft": [True] * 30 + [False] * 70,
                   "grpo": [True] * 25 + [False] * 5 + [True] * 15 + [False] * 55}
    for name, correct in per_problem.items():
        (out / "eval" / f"{name}.json").write_text(json.dumps({"accuracy": sum(correct) / 100, "n": 100,
                                                               "correct": correct}))
    manifest = {"name": "t", "recipe": "r.yaml", "stages": {"eval": {"status": "done", "metrics": {
        name: {"accuracy": sum(c) / 100, "n": 100} for name, c in per_problem.items()}}}}
    write_report(out, manifest)
    printed = capsys.readouterr().out
    assert "| sft | 0.300 | [0.219, 0.396] | 100 |" in printed
    assert "| grpo | 0.400 | [0.309, 0.498] | 100 |" in printed
    # grpo − sft: 15 only GRPO right, 5 only SFT right -> +0.100 [+0.015, +0.185]
    assert "| grpo − sft | +0.100 | [+0.015, +0.185] | 15 | 5 |" in printed
    assert "| sft − init | +0.300 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"init", "sft", "grpo"}
    assert results["grpo"]["vs_sft"]["ci95"] == pytest.approx([0.014567, 0.185433], abs=1e-5)
    assert "grpo − sft" in (out / "report.md").read_text()
