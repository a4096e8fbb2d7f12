"""The report card's uncertainty: Wilson intervals per stage and the paired GRPO − SFT interval, on
known values, and printed by `write_report` from what the eval stage writes."""

from __future__ import annotations

import json
import random

import pytest

from eval_hooks.report import (grouped_mean_interval, grouped_paired_difference, paired_difference, t_quantile_975,
                                wilson_interval, write_report)


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
    assert (d["better"], d["worse"], d["n"]) == (15, 5, 100)
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


def test_t_quantile_known_values():
    # Student's t 97.5% quantiles from the tables
    for df, t in ((1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (20, 2.086), (100, 1.984)):
        assert t_quantile_975(df) == pytest.approx(t, abs=5e-3)


def test_grouped_intervals_on_independent_problems_match_the_textbook():
    # every problem its own group: the interval of a mean, s / sqrt(n) · t(n - 1)
    values = [0.25, 0.5, 0.5, 0.75]  # mean 0.5, sample variance 0.041667
    r = grouped_mean_interval(values)
    half = 3.182446 * (0.0416667 / 4) ** 0.5
    assert r["mean"] == pytest.approx(0.5) and r["ci95"] == pytest.approx([0.5 - half, 0.5 + half], abs=2e-3)
    assert grouped_mean_interval([0.0, 0.25, 0.5, 1.0])["ci95"][0] == 0.0  # a mean of fractions stays in [0, 1]
    d = grouped_paired_difference([0.0, 0.25, 0.5, 0.5], [0.5, 0.25, 0.75, 1.0])  # differences 0.5, 0, 0.25, 0.5
    sd = (((0.5 - 0.3125) ** 2 * 2 + 0.3125 ** 2 + 0.0625 ** 2) / 3) ** 0.5
    assert d["difference"] == pytest.approx(0.3125)
    assert d["ci95"] == pytest.approx([0.3125 - 3.182446 * sd / 2, 0.3125 + 3.182446 * sd / 2], abs=2e-3)
    assert (d["better"], d["worse"], d["n"], d["groups"]) == (3, 0, 4, 4)
    with pytest.raises(ValueError):
        grouped_paired_difference([0.5], [0.5, 1.0])


def test_grouped_interval_counts_facts_not_wordings():
    """21 facts, 20 wordings each, and a model that gets a fact right in every wording or in none (what
    the demo's held-out set shows): 3 more facts learned is +14 points. Over 420 independent problems
    that would look certain; over 21 facts it is not."""
    groups = [f"fact{f}" for f in range(21) for _ in range(20)]
    before = [f < 4 for f in range(21) for _ in range(20)]
    after = [f < 7 for f in range(21) for _ in range(20)]
    naive = paired_difference(before, after)
    grouped = grouped_paired_difference(before, after, groups)
    assert naive["difference"] == pytest.approx(grouped["difference"]) == pytest.approx(3 / 21)
    assert naive["ci95"][0] > 0.1  # 60 problems better, 0 worse: "significant" counted per problem
    assert grouped["ci95"][0] < 0 < grouped["ci95"][1] and grouped["groups"] == 21
    # the per-stage interval is over the facts too: 7 of 21, as wide as a proportion of 21 allows
    lo, hi = grouped_mean_interval([float(x) for x in after], groups)["ci95"]
    assert lo < 7 / 21 - 0.15 and hi > 7 / 21 + 0.15
    # and it is the naive one when the wordings disagree as much as independent problems would
    rng = random.Random(0)
    mixed = [float(rng.random() < 1 / 3) for _ in range(420)]  # wordings right or wrong independently
    ind = grouped_mean_interval(mixed)["ci95"]
    clu = grouped_mean_interval(mixed, groups)["ci95"]
    assert clu == pytest.approx(ind, abs=0.03)


def test_report_prints_pass_at_k_and_maj_at_k_the_eval_stage_computed(tmp_path, capsys):
    """With `stages.eval.k: 2` the eval files held pass@2 and maj@2, and neither report.md nor results.json did."""
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    for name, (acc, p2, m2) in {"sft": (0.3, 0.45, 0.35), "grpo": (0.4, 0.5, 0.4)}.items():
        (out / "eval" / f"{name}.json").write_text(json.dumps({"accuracy": acc, "n": 20, "pass@2": p2, "maj@2": m2}))
    manifest = {"name": "t", "recipe": "r.yaml", "stages": {"eval": {"status": "done", "metrics": {
        name: {"accuracy": acc, "n": 20} for name, acc in (("sft", 0.3), ("grpo", 0.4))}}}}
    write_report(out, manifest)
    printed = capsys.readouterr().out
    assert "## Held-out pass@2 and maj@2 (2 samples per problem at temperature 1.0, top-p 1.0; measured)" in printed
    assert "| sft | 0.450 | 0.350 | 20 |" in printed and "| grpo | 0.500 | 0.400 | 20 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["grpo"]["pass@2"] == 0.5 and results["sft"]["maj@2"] == 0.35
    assert "maj@2" in (out / "report.md").read_text()


def test_report_prints_sampled_pass1_and_clustered_intervals_when_the_eval_names_groups(tmp_path, capsys):
    """With `sampled_pass1_k`, the eval writes each problem's fraction of correct samples, and for the
    built-in task each problem's fact: the report prints DeepSeek-R1's pass@1 per stage and GRPO − SFT,
    with intervals over the facts."""
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    groups = [f"g{i % 10}" for i in range(100)]
    fractions = {"sft": [0.25] * 50 + [0.5] * 50, "grpo": [0.5] * 50 + [0.5] * 40 + [0.25] * 10}
    for name, fr in fractions.items():
        correct = [f >= 0.5 for f in fr]
        (out / "eval" / f"{name}.json").write_text(json.dumps({
            "accuracy": sum(correct) / 100, "n": 100, "correct": correct, "groups": groups,
            "sampled_pass1": {"pass@1": sum(fr) / 100, "k": 4, "temperature": 0.6, "top_p": 0.95,
                              "fraction_correct": fr}}))
    manifest = {"name": "t", "recipe": "r.yaml", "stages": {"eval": {"status": "done", "metrics": {
        name: {"accuracy": 0.5, "n": 100} for name in fractions}}}}
    write_report(out, manifest)
    printed = capsys.readouterr().out
    assert "pass@1 over 4 samples per problem (DeepSeek-R1 §3.1: temperature 0.6, top-p 0.95" in printed
    assert "over the 10 groups of problems that ask the same thing" in printed
    assert "| sft | 0.375 |" in printed and "| grpo | 0.475 |" in printed
    d = grouped_paired_difference(fractions["sft"], fractions["grpo"], groups)
    lo, hi = d["ci95"]
    assert f"| grpo − sft | +0.100 | [{lo:+.3f}, {hi:+.3f}] | 50 | 10 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["grpo"]["sampled_pass1"]["pass@1"] == pytest.approx(0.475)
    assert results["grpo"]["sampled_pass1"]["vs_sft"]["ci95"] == pytest.approx([lo, hi])
    assert results["grpo"]["vs_sft"]["groups"] == 10


def test_an_unfinished_eval_stage_reports_no_accuracy(tmp_path):
    """The eval stage was restarted with new settings and killed; a later `run --only sft` wrote the report.
    Before, the manifest's metrics from the stage's earlier run were printed as measured, beside eval files
    the restart had partly rewritten."""
    out = tmp_path / "run"
    (out / "eval").mkdir(parents=True)
    (out / "eval" / "init.json").write_text(json.dumps({"accuracy": 0.1, "n": 10, "correct": [True] + [False] * 9}))
    manifest = {"name": "t", "recipe": "r.yaml", "stages": {"eval": {"status": "running", "metrics": {
        "init": {"accuracy": 0.25, "n": 4}, "sft": {"accuracy": 0.5, "n": 4}}}}}
    assert write_report(out, manifest)["results"] == {}
    assert "0.500" not in (out / "report.md").read_text()
