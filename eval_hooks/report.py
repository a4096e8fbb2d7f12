"""The run's report card: `report.md`, its plots, and `results.json`, from what the stages wrote.

Every number comes from a stage's own output (trainer_state.json log histories, distill stats,
evaluation results); nothing here is configured. The uncertainty of held-out pass@1 is stated with it:
each stage's 95% Wilson score interval, and for each stage against the one before it (GRPO − SFT,
SFT − init) the difference with a paired 95% interval over the same problems (from the per-problem
correctness the evaluation writes to `eval/<stage>.json`). Where the evaluation set says which problems
ask the same thing (the built-in task's held-out problems are other wordings of a few arithmetic facts,
and a model gets a fact right in every wording or in none), the intervals are cluster-robust over those
groups: counting 500 wordings of 21 facts as 500 independent problems would make them several times
too narrow. Where the eval stage also sampled k answers
per problem (`sampled_pass1_k`), pass@1 as DeepSeek-R1 reports it (the mean correctness of the k
samples) is printed the same way: an interval per stage and paired differences over the problems.
Where it also measured each stage's MTP drafter on those answers (`mtp_acceptance`), its acceptance is
printed the same way (eval_hooks/mtp_acceptance.py).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any


Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion `correct`/`n` (well-behaved near 0 and 1, unlike the
    normal approximation)."""
    if n <= 0:
        return (0.0, 1.0)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_difference(before: list[bool], after: list[bool], z: float = Z95) -> dict[str, Any]:
    """`after` − `before` pass@1 on the same problems, with its paired 95% interval (normal
    approximation for paired proportions: only the problems on which the two disagree carry
    information; variance ((b + c) − (b − c)²/n) / n², b = only `after` right, c = only `before`)."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired comparison needs two equally long, non-empty lists ({len(before)}, {len(after)})")
    n = len(before)
    b = sum(1 for x, y in zip(before, after) if y and not x)
    c = sum(1 for x, y in zip(before, after) if x and not y)
    diff = (b - c) / n
    half = z * math.sqrt(max((b + c) - (b - c) ** 2 / n, 0.0)) / n
    return {"difference": diff, "ci95": [diff - half, diff + half], "better": b, "worse": c, "n": n}


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile with `df` degrees of freedom: the Cornish-Fisher expansion around the
    normal quantile (within 5e-3 of the exact value for df >= 3; exact table values below that)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= 2:
        return (12.7062, 4.3027)[df - 1]
    z, v = Z95, float(df)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * v**4))


def grouped_mean_interval(values: list[float], groups: list[str] | None = None,
                          bounds: tuple[float, float] = (0.0, 1.0)) -> dict[str, Any]:
    """The mean of per-problem values and its 95% interval when problems come in groups that succeed or
    fail together (other wordings of one fact): the cluster-robust variance of the mean, Σ_g (Σ_{i∈g}
    (v_i − mean))² · G/(G−1) / n², with Student's t on G − 1 degrees of freedom. `groups` None: every
    problem is its own group. With no spread at all, the Wilson interval of mean · G successes in G.
    The interval is clipped to `bounds`, the range the values can take."""
    n = len(values)
    groups = list(groups) if groups is not None else [str(i) for i in range(n)]
    if len(groups) != n or n == 0:
        raise ValueError(f"need one group per value ({len(groups)} groups, {n} values)")
    mean = sum(values) / n
    sums: dict[str, float] = {}
    for g, v in zip(groups, values):
        sums[g] = sums.get(g, 0.0) + (v - mean)
    n_groups = len(sums)
    var = sum(x * x for x in sums.values()) * n_groups / max(n_groups - 1, 1) / (n * n)
    if n_groups < 2:
        ci = (float("-inf"), float("inf"))
    elif var <= 1e-30:
        ci = wilson_interval(round(mean * n_groups), n_groups) if bounds == (0.0, 1.0) else (mean, mean)
    else:
        half = t_quantile_975(n_groups - 1) * math.sqrt(var)
        ci = (mean - half, mean + half)
    return {"mean": mean, "ci95": [max(bounds[0], ci[0]), min(bounds[1], ci[1])], "n": n, "groups": n_groups}


def grouped_paired_difference(before: list[float], after: list[float],
                              groups: list[str] | None = None) -> dict[str, Any]:
    """`after` − `before` per problem (0/1 correctness or fractions of correct samples) on the same
    problems, with the 95% interval of `grouped_mean_interval` over the per-problem differences."""
    if len(before) != len(after) or not before:
        raise ValueError(f"paired comparison needs two equally long, non-empty lists ({len(before)}, {len(after)})")
    d = [float(y) - float(x) for x, y in zip(before, after)]
    r = grouped_mean_interval(d, groups, bounds=(-1.0, 1.0))
    return {"difference": r["mean"], "ci95": r["ci95"], "better": sum(v > 0 for v in d),
            "worse": sum(v < 0 for v in d), "n": r["n"], "groups": r["groups"]}


def _eval_result(out: Path, name: str) -> dict[str, Any]:
    """What the eval stage wrote for one checkpoint (`eval/<name>.json`), or {}."""
    path = out / "eval" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _groups(evaluated: dict[str, Any]) -> list[str] | None:
    groups = evaluated.get("groups")
    return [str(g) for g in groups] if isinstance(groups, list) else None


def _sampled(evaluated: dict[str, Any]) -> dict[str, Any] | None:
    sampled = evaluated.get("sampled_pass1")
    return sampled if isinstance(sampled, dict) and sampled.get("fraction_correct") else None


def _per_problem(evaluated: dict[str, Any]) -> list[bool] | None:
    correct = evaluated.get("correct")
    return [bool(x) for x in correct] if isinstance(correct, list) else None


def _history(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return json.loads(path.read_text()).get("log_history", [])


def _plot_series(path: Path, title: str, series: dict[str, list[tuple[float, float]]], ylabel: str) -> str | None:
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _points(history: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    return [(h["step"], h[key]) for h in history if key in h and h.get(key) is not None and "step" in h]


def _plot_accuracy(path: Path, results: dict[str, dict[str, Any]]) -> str | None:
    if not results:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    acc = [results[n]["accuracy"] for n in names]
    err = None
    if all("ci95" in results[n] for n in names):  # the Wilson interval as (below, above) bars
        err = [[max(a - results[n]["ci95"][0], 0.0) for a, n in zip(acc, names)],
               [max(results[n]["ci95"][1] - a, 0.0) for a, n in zip(acc, names)]]
    bars = ax.bar(names, acc, yerr=err, capsize=4, color=["#999999", "#4c72b0", "#dd8452"][: len(names)])
    for bar, n in zip(bars, names):
        ax.annotate(f"{results[n]['accuracy']:.3f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom")
    ax.set_ylabel(f"held-out accuracy (n={results[names[0]]['n']})")
    ax.set_ylim(0, 1)
    ax.set_title("greedy pass@1 per stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def write_report(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    out = Path(out)
    stages = manifest.get("stages", {})
    sft_hist = _history(out / "sft" / "trainer_state.json")
    grpo_hist = _history(out / "grpo" / "trainer_state.json")
    evaluated_stage = stages.get("eval", {})
    # an eval stage restarted and not finished still holds the metrics of its earlier run: those are not measured
    # on what the eval directory now holds
    eval_metrics = (evaluated_stage.get("metrics") or {}) if evaluated_stage.get("status") == "done" else {}
    results = {name: {"accuracy": r["accuracy"], "n": r["n"]} for name, r in eval_metrics.items()}
    names = list(results)
    evaluated = {name: _eval_result(out, name) for name in names}  # each stage's file, read once
    correct_of = {name: _per_problem(evaluated[name]) for name in names}
    # what each problem asks (the eval writes it when the set names it): intervals are over those groups
    groups = next((g for g in (_groups(evaluated[name]) for name in names) if g is not None), None)
    for name, r in results.items():
        correct = correct_of[name]
        if groups is not None and correct is not None and len(correct) == len(groups):
            r["ci95"] = grouped_mean_interval([float(c) for c in correct], groups)["ci95"]
        else:
            r["ci95"] = list(wilson_interval(round(r["accuracy"] * r["n"]), r["n"]))
    comparisons: list[tuple[str, str, dict[str, Any]]] = []
    for before, after in zip(names, names[1:]):  # each stage against the one it started from
        a, b = correct_of[before], correct_of[after]
        if a is not None and b is not None and len(a) == len(b) and a:
            if groups is not None and len(groups) == len(a):
                diff = grouped_paired_difference(a, b, groups)
            else:
                diff = paired_difference(a, b)
            results[after][f"vs_{before}"] = diff
            comparisons.append((before, after, diff))
    # pass@k / maj@k (eval stage `k` > 1): computed by the eval stage, reported here too
    for name in names:
        results[name].update({key: value for key, value in evaluated[name].items()
                              if key.startswith(("pass@", "maj@")) and isinstance(value, (int, float))})
    # pass@1 as DeepSeek-R1 reports it (k samples per problem), where the eval stage measured it
    sampled = {name: _sampled(evaluated[name]) for name in names}
    sampled_comparisons: list[tuple[str, str, dict[str, Any]]] = []
    for name, smp in sampled.items():
        if smp is not None:
            g = groups if groups is not None and len(groups) == len(smp["fraction_correct"]) else None
            results[name]["sampled_pass1"] = {"pass@1": smp["pass@1"], "k": smp["k"], "temperature": smp["temperature"],
                                              "top_p": smp.get("top_p"),
                                              "ci95": grouped_mean_interval(smp["fraction_correct"], g)["ci95"]}
    for before, after in zip(names, names[1:]):
        a, b = sampled.get(before), sampled.get(after)
        if a is not None and b is not None and len(a["fraction_correct"]) == len(b["fraction_correct"]):
            g = groups if groups is not None and len(groups) == len(a["fraction_correct"]) else None
            diff = grouped_paired_difference(a["fraction_correct"], b["fraction_correct"], g)
            results[after]["sampled_pass1"][f"vs_{before}"] = diff
            sampled_comparisons.append((before, after, diff))
    # the MTP drafter's acceptance on each stage's own answers (eval stage `mtp_acceptance`)
    drafter_comparisons = _drafter_acceptance(names, evaluated, groups, results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    plots = {
        "loss": _plot_series(out / "loss.png", "SFT loss", {
            "loss": _points(sft_hist, "loss"), "mtp_loss": _points(sft_hist, "mtp_loss")}, "loss"),
        "reward": _plot_series(out / "reward.png", "GRPO reward", {"reward": _points(grpo_hist, "reward")}, "mean reward"),
        "mtp": _plot_series(out / "mtp_accept.png", "MTP acceptance (GRPO, on the policy's samples)",
                            {"mtp/accept_rate": _points(grpo_hist, "mtp/accept_rate")}, "accept rate"),
        "accuracy": _plot_accuracy(out / "accuracy.png", results),
        # the eval stage's every_n_steps (EvalCallback); x is the step within each stage
        "accuracy_during_training": _plot_series(out / "accuracy_during_training.png", "Held-out accuracy during training", {
            "sft": _points(sft_hist, "eval/accuracy"), "grpo": _points(grpo_hist, "eval/accuracy")}, "greedy pass@1"),
    }
    heatmap = out / "sft" / "expert_load.png"
    if heatmap.exists():
        shutil.copyfile(heatmap, out / "expert_load.png")
        plots["expert_load"] = "expert_load.png"

    lines = [f"# Report: {manifest.get('name', out.name)}", "", f"Recipe: `{manifest.get('recipe')}`", ""]
    n_groups = len(set(groups)) if groups is not None else None
    over = (f"over the {n_groups} groups of problems that ask the same thing, not over the problems: other "
            "wordings of one fact succeed or fail together" if n_groups else "over the problems")
    lines += ["## Held-out accuracy (greedy pass@1, measured)", "",
              f"| stage | accuracy | 95% interval ({'clustered' if n_groups else 'Wilson'}) | problems |",
              "| --- | --- | --- | --- |"]
    for name, r in results.items():
        lo, hi = r["ci95"]
        lines.append(f"| {name} | {r['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {r['n']} |")
    if comparisons:
        lines += ["", f"Paired differences on the same problems (95% interval {over}; the interval excludes 0 "
                  "when the change is not noise at that level).", ""]
        lines += _difference_table(comparisons, "only the later right", "only the earlier right")
    sampled_keys = sorted({key for r in results.values() for key in r if key.startswith(("pass@", "maj@"))},
                          key=lambda key: (key.split("@")[0] != "pass", int(key.split("@")[1])))
    if sampled_keys:
        k = sampled_keys[0].split("@")[1]
        lines += ["", f"## Held-out {' and '.join(sampled_keys)} ({k} samples per problem at temperature 1.0, "
                  "top-p 1.0; measured)", "", "| stage | " + " | ".join(sampled_keys) + " | problems |",
                  "| --- | " + " | ".join("---" for _ in sampled_keys) + " | --- |"]
        for name, r in results.items():
            cells = " | ".join(f"{r[key]:.3f}" if key in r else "" for key in sampled_keys)
            lines.append(f"| {name} | {cells} | {r['n']} |")
    clustered = " (clustered)" if n_groups else ""
    paired_note = f"Paired differences on the same problems and sampling seeds (95% interval {over})."
    with_sampled = [name for name in names if "sampled_pass1" in results[name]]
    if with_sampled:
        first = results[with_sampled[0]]["sampled_pass1"]
        lines += _measure_section(
            [f"## Held-out pass@1 over {first['k']} samples per problem (DeepSeek-R1 §3.1: temperature "
             f"{first['temperature']}, top-p {first['top_p']}; measured)"],
            ("pass@1", clustered, "problems"),
            [(name, results[name]["sampled_pass1"]["pass@1"], results[name]["sampled_pass1"]["ci95"], results[name]["n"])
             for name in with_sampled],
            paired_note, _difference_table(sampled_comparisons, "problems better", "problems worse"))
    with_drafter = [name for name in names if "mtp_acceptance" in results[name]]
    if with_drafter:
        lines += _measure_section(
            ["## MTP drafter acceptance on the evaluation's answers (measured)", "",
             "The fraction of each answer's tokens (after its first) that the stage's MTP module, given the tokens "
             "before, guessed as its top-1: the acceptance of one-token speculative decoding (V3 §5.4.3), on the "
             f"{results[with_drafter[0]]['mtp_acceptance']['on']}; mean over problems."],
            ("acceptance", clustered, "drafts"),
            [(name, results[name]["mtp_acceptance"]["mean"], results[name]["mtp_acceptance"]["ci95"],
              results[name]["mtp_acceptance"]["drafts"]) for name in with_drafter],
            paired_note, _difference_table(drafter_comparisons, "problems higher", "problems lower", "acceptance"))
    printed = len(lines)
    lines += ["", "## Stages", "", "| stage | status | seconds | output | metrics |", "| --- | --- | --- | --- | --- |"]
    for name, s in stages.items():
        if name.startswith("_"):
            continue
        metrics = json.dumps(s.get("metrics"), default=str) if name != "eval" else "see above"
        lines.append(f"| {name} | {s.get('status')} | {s.get('seconds', '')} | `{s.get('output', '')}` | {metrics} |")
    total = stages.get("_run", {}).get("seconds")
    if total is not None:
        lines += ["", f"Wall time of this invocation: {total:.0f} s."]
    if sft_hist:
        last = [h for h in sft_hist if "loss" in h]
        if last:
            lines += ["", f"SFT: first logged loss {last[0]['loss']:.3f}, last {last[-1]['loss']:.3f}."]
    if grpo_hist:
        rw = [h["reward"] for h in grpo_hist if "reward" in h]
        acc = [h["mtp/accept_rate"] for h in grpo_hist if "mtp/accept_rate" in h]
        if rw:
            k, head, tail = _first_and_last_means(rw)
            lines.append(f"GRPO: mean reward over the first {k} steps {head:.3f}, over the last {k} {tail:.3f}.")
        if acc:
            k, head, tail = _first_and_last_means(acc)
            lines.append(f"MTP acceptance on the policy's samples: first {k} steps {head:.3f}, last {k} {tail:.3f} "
                         "(other prompts in each window).")
        lam = [h["mtp_loss_weight"] for h in grpo_hist if "mtp_loss_weight" in h]
        if lam and min(lam) != max(lam):
            lines.append(f"MTP loss weight λ (closed loop): first {lam[0]:.3f}, last {lam[-1]:.3f}, "
                         f"range [{min(lam):.3f}, {max(lam):.3f}].")
        dropped = [h["sampling/groups_dropped"] for h in grpo_hist if "sampling/groups_dropped" in h]
        if dropped:
            rounds = [h.get("sampling/rounds", 1.0) for h in grpo_hist if "sampling/groups_dropped" in h]
            tied = [h["sampling/frac_reward_zero_std_sampled"] for h in grpo_hist
                    if "sampling/frac_reward_zero_std_sampled" in h]
            extra = sum(h.get("timing/extra_generation", 0.0) for h in grpo_hist)
            lines.append(f"Dynamic sampling: {sum(dropped) / len(dropped):.1f} tied groups dropped and "
                         f"{sum(rounds) / len(rounds):.2f} engine calls per step on average"
                         + (f"; tied fraction of TRL's batch {sum(tied) / len(tied):.3f}" if tied else "")
                         + f"; extra generation {extra:.0f} s in all.")
    lines += ["", "## Plots", ""]
    for key, name in plots.items():
        if name:
            lines.append(f"![{key}]({name})")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:printed]))
    return {"results": results, "report": str(out / "report.md")}


def _drafter_acceptance(names: list[str], evaluated: dict[str, dict[str, Any]], groups: list[str] | None,
                        results: dict[str, dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """Each stage's MTP acceptance (mean over problems, interval over groups) into `results`, and each
    stage against the one before it on the problems both drafted on."""
    per_problem: dict[str, list[float | None]] = {}
    for name in names:
        measured = evaluated[name].get("mtp_acceptance")
        if not isinstance(measured, dict) or not measured.get("per_problem"):
            continue
        values = measured["per_problem"]
        kept = [i for i, v in enumerate(values) if v is not None]
        if not kept:  # no answer long enough to draft on
            continue
        per_problem[name] = values
        g = [groups[i] for i in kept] if groups is not None and len(groups) == len(values) else None
        r = grouped_mean_interval([values[i] for i in kept], g)
        results[name]["mtp_acceptance"] = {"mean": r["mean"], "ci95": r["ci95"], "rate": measured["rate"],
                                           "drafts": measured["drafts"], "on": measured["on"]}
    comparisons = []
    for before, after in zip(names, names[1:]):
        a, b = per_problem.get(before), per_problem.get(after)
        if a is None or b is None or len(a) != len(b):
            continue
        both = [i for i in range(len(a)) if a[i] is not None and b[i] is not None]
        if not both:
            continue
        g = [groups[i] for i in both] if groups is not None and len(groups) == len(a) else None
        diff = grouped_paired_difference([a[i] for i in both], [b[i] for i in both], g)
        results[after]["mtp_acceptance"][f"vs_{before}"] = diff
        comparisons.append((before, after, diff))
    return comparisons


def _measure_section(heading: list[str], columns: tuple[str, str, str], rows: list[tuple[str, float, list[float], int]],
                     paired_note: str, differences: list[str]) -> list[str]:
    """A report section: its heading, a row per stage (value, 95% interval, count), and the paired
    differences between stages when there are any (`differences` from `_difference_table`)."""
    measure, interval_note, count = columns
    lines = ["", *heading, "", f"| stage | {measure} | 95% interval{interval_note} | {count} |", "| --- | --- | --- | --- |"]
    for name, value, (lo, hi), n in rows:
        lines.append(f"| {name} | {value:.3f} | [{lo:.3f}, {hi:.3f}] | {n} |")
    if len(differences) > 2:  # more than the table's header
        lines += ["", paired_note, "", *differences]
    return lines


def _difference_table(comparisons: list[tuple[str, str, dict[str, Any]]], better: str, worse: str,
                      measure: str = "pass@1") -> list[str]:
    rows = [f"| difference | {measure} | 95% interval (paired) | {better} | {worse} |", "| --- | --- | --- | --- | --- |"]
    for before, after, d in comparisons:
        lo, hi = d["ci95"]
        rows.append(f"| {after} − {before} | {d['difference']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {d['better']} | {d['worse']} |")
    return rows


def _first_and_last_means(values: list[float]) -> tuple[int, float, float]:
    """(k, mean of the first k, mean of the last k), k = up to 10 and at most half the run: one
    GRPO step's reward depends on that step's prompts, so single steps are not compared."""
    k = max(1, min(10, len(values) // 2))
    return k, sum(values[:k]) / k, sum(values[-k:]) / k
