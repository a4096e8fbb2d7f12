"""Distillation with the scripted teacher on the built-in task: rejection sampling, the
report's two SFT sample types, output layout, stats, keep policies, decontamination and
bad input.  (OpenAI / vLLM / hf backends and SIGKILL-resume live in test_distill_*.py.)"""

import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from data_pipelines import DataError
from data_pipelines import arith_task as A
from data_pipelines.decontaminate import ngrams
from data_pipelines.distill import DistillConfig, run_distill
from data_pipelines.filters import FilterConfig, first_failure
from data_pipelines.formatting import DEFAULT_SYSTEM_PROMPT

ROOT = Path(__file__).resolve().parents[1]


def _cfg(out, **kw):
    base = dict(dataset_name="builtin:arith?n_train=150", output_dir=str(out), shard_size=32, disable_tqdm=True)
    base.update(kw)
    return DistillConfig(**base)


def _rows(out, sub="data"):
    rows = []
    for p in sorted((Path(out) / sub).glob("*.jsonl")):
        rows += [json.loads(line) for line in p.read_text().splitlines()]
    return rows


def _boxed(text):
    m = re.findall(r"\\boxed\{(-?\d+)\}", text)
    return m[-1] if m else None


def _tree_digest(out):
    h = {}
    for p in sorted(Path(out).rglob("*")):
        if p.is_file():
            h[str(p.relative_to(out))] = hashlib.sha1(p.read_bytes()).hexdigest()
    return h


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("distill")
    cfg = _cfg(out, wrong_fraction=0.3, reference_column="solution")
    return cfg, run_distill(cfg), out


def test_kept_samples_correct_and_rejection_rate_matches(scripted_run):
    cfg, stats, out = scripted_run
    kept = [r for r in _rows(out) if r["sample_type"] == "r1_system"]
    rejected = _rows(out, "rejected")
    n = 150 * 4
    assert len(kept) + len(rejected) == n == stats["samples"]["total"]
    for r in kept:  # re-check every kept answer against the problem text, not the pipeline
        problem = r["messages"][1]["content"]
        assert _boxed(r["messages"][-1]["content"]) == str(A.evaluate(*A.parse_problem(problem))) == r["answer"]
        assert r["verdict"] == "correct" and r["rejection_reason"] is None
    for r in rejected:
        assert r["rejection_reason"] == "wrong_answer" and _boxed(r["response"]) != r["answer"]
    # The scripted teacher is wrong with probability 0.3 per sample; all wrong samples are
    # rejected and nothing else is.  Binomial bound: |rate - 0.3| <= 4 sigma.
    rate = len(rejected) / n
    sigma = math.sqrt(0.3 * 0.7 / n)
    assert abs(rate - 0.3) <= 4 * sigma, (rate, sigma)
    assert stats["rejections"]["wrong_answer"]["count"] == len(rejected)
    assert stats["samples"]["acceptance_rate"] == pytest.approx(len(kept) / n, abs=1e-6)


def test_both_sample_types(scripted_run):
    cfg, stats, out = scripted_run
    rows = _rows(out)
    r1 = [r for r in rows if r["sample_type"] == "r1_system"]
    orig = [r for r in rows if r["sample_type"] == "original"]
    assert r1 and orig
    for r in r1:
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        assert r["messages"][0]["content"] == DEFAULT_SYSTEM_PROMPT
        assert r["messages"][2]["content"].startswith("<think>\n") and r["teacher"] == "scripted (synthetic)"
    # <problem, original response>: once per instance with a kept sample, no system prompt
    assert {r["source_id"] for r in orig} == {r["source_id"] for r in r1} and len(orig) == len({r["source_id"] for r in r1})
    for r in orig:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert r["messages"][1]["content"].endswith(f"\\boxed{{{r['answer']}}}.")
    assert stats["sft_rows"] == {"original": len(orig), "r1_system": len(r1)}
    assert len({r["id"] for r in rows}) == len(rows)


def test_output_loadable_and_stats_files(scripted_run):
    cfg, stats, out = scripted_run
    ds = datasets.load_dataset("json", data_dir=str(out / "data"), split="train")
    assert ds.num_rows == len(_rows(out))
    top = datasets.load_dataset("json", data_dir=str(out), split="train")  # split found by name
    assert top.num_rows == ds.num_rows
    from data_pipelines.loading import load_rows
    assert sorted(load_rows(str(out))["id"]) == sorted(ds["id"])
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["samples"] == stats["samples"] and on_disk["teacher"] == "scripted (synthetic)"
    assert on_disk["synthetic"] is True and on_disk["config"]["wrong_fraction"] == 0.3
    assert on_disk["lengths"]["unit"] == "chars" and on_disk["lengths"]["kept"]["count"] == stats["samples"]["kept"]
    assert (out / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_deterministic_and_rerun_is_a_noop(scripted_run, tmp_path):
    cfg, stats, out = scripted_run
    other = _cfg(tmp_path / "b", wrong_fraction=0.3, reference_column="solution")
    run_distill(other)
    for sub in ("data", "rejected"):
        assert _tree_digest(out / sub) == _tree_digest(tmp_path / "b" / sub)
    before = _tree_digest(tmp_path / "b" / "data")
    again = run_distill(other)  # everything committed: nothing regenerated
    assert _tree_digest(tmp_path / "b" / "data") == before and again["samples"] == stats["samples"]


def test_resume_after_torn_ledger_and_orphan_shard(scripted_run, tmp_path):
    cfg, stats, out = scripted_run
    b = tmp_path / "b"
    run_distill(_cfg(b, wrong_fraction=0.3, reference_column="solution"))
    ledger = (b / "ledger.jsonl").read_text().splitlines(keepends=True)
    # as if killed while appending the 4th ledger line, after shard 3's files were in place
    (b / "ledger.jsonl").write_text("".join(ledger[:3]) + ledger[3][:10])
    (b / "data" / ".train-00004.jsonl.tmp").write_text('{"half": ')
    run_distill(_cfg(b, wrong_fraction=0.3, reference_column="solution"))
    assert _tree_digest(b / "data") == _tree_digest(out / "data")
    assert (b / "ledger.jsonl").read_text() == (out / "ledger.jsonl").read_text()


def test_kill_during_overwrite_then_resume_loses_no_rows(scripted_run, tmp_path, monkeypatch):
    """overwrite deleted the shard files before the ledger: killed in between, the directory still
    listed every shard as committed, and a resume (overwrite off) regenerated nothing and finished
    with the shards' rows missing."""
    import shutil

    import data_pipelines.shards as S

    cfg, stats, out = scripted_run
    b = tmp_path / "b"
    run_distill(_cfg(b, wrong_fraction=0.3, reference_column="solution"))
    real_rmtree = shutil.rmtree

    def killed_after_one(path, *a, **kw):  # SIGKILL once the first folder is gone
        real_rmtree(path, *a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(S.shutil, "rmtree", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        run_distill(_cfg(b, wrong_fraction=0.3, reference_column="solution", overwrite=True))
    monkeypatch.setattr(S.shutil, "rmtree", real_rmtree)
    again = run_distill(_cfg(b, wrong_fraction=0.3, reference_column="solution"))
    assert _tree_digest(b / "data") == _tree_digest(out / "data")
    assert again["samples"] == stats["samples"]


def test_settings_mismatch_refused_without_touching_output(scripted_run):
    cfg, stats, out = scripted_run
    before = _tree_digest(out)
    with pytest.raises(DataError, match="different settings.*wrong_fraction"):
        run_distill(_cfg(out, wrong_fraction=0.1, reference_column="solution"))
    assert _tree_digest(out) == before


def test_keep_policies(tmp_path):
    base = dict(dataset_name="builtin:arith?n_train=40", wrong_fraction=0.4, num_generations=5)
    runs = {}
    for policy, extra in [("all_correct", {}), ("shortest_correct", {}), ("first_k_correct", {"keep_k": 2})]:
        out = tmp_path / policy
        run_distill(_cfg(out, keep_policy=policy, **base, **extra))
        runs[policy] = (_rows(out), _rows(out, "rejected"))
    everything = {}  # (source, index) -> (verdict, length): identical samples in each run
    for r in runs["all_correct"][0]:
        everything[(r["source_id"], r["sample_index"])] = ("correct", r["completion_chars"])
    for r in runs["all_correct"][1]:
        everything[(r["source_id"], r["sample_index"])] = (r["verdict"], r["completion_chars"])
    correct = {}
    for (sid, i), (v, length) in everything.items():
        if v == "correct":
            correct.setdefault(sid, []).append((i, length))
    kept, rej = runs["shortest_correct"]
    got = {r["source_id"]: r["sample_index"] for r in kept}
    assert got == {sid: min(c, key=lambda x: (x[1], x[0]))[0] for sid, c in correct.items()}
    assert sum(r["rejection_reason"] == "not_selected" for r in rej) == sum(len(c) - 1 for c in correct.values())
    kept, rej = runs["first_k_correct"]
    got = {}
    for r in kept:
        got.setdefault(r["source_id"], []).append(r["sample_index"])
    assert {k: sorted(v) for k, v in got.items()} == {sid: sorted(i for i, _ in c)[:2] for sid, c in correct.items()}
    assert all(r["verdict"] == "correct" for r in rej if r["rejection_reason"] == "not_selected")


def test_filters_each_reason():
    cfg = FilterConfig(min_length=30, max_length=400)
    good = "<think>\n2 + 3 = 5. Check: 5 - 3 = 2. Correct.\n</think>\n\nThe answer is \\boxed{5}."
    assert first_failure(good, None, "stop", cfg) is None
    assert first_failure(good.replace("</think>", ""), None, "stop", cfg) == "unclosed_think"
    assert first_failure("The answer is \\boxed{5}." + " " * 30, None, "stop", cfg) == "no_think"
    assert first_failure(good, None, "length", cfg) == "too_long"
    assert first_failure(good + " " * 400, None, "stop", cfg) == "too_long"
    assert first_failure(good, 401, "stop", cfg) == "too_long"  # tokens, when counted, win over chars
    assert first_failure("<think>x</think>\\boxed{5}", None, "stop", cfg) == "too_short"
    mixed = "<think>\n2 + 3 = 5. 所以答案是五，检查一下。 Check: 5 - 3 = 2.\n</think>\n\\boxed{5}"
    assert first_failure(mixed, None, "stop", cfg) == "language_mixing"
    loop = "<think>\n" + "so the answer is 5 " * 15 + "\n</think>\n\\boxed{5}"
    assert first_failure(loop, None, "stop", cfg) == "repetition"
    # garbled think blocks were kept when the last answer was right; GRPO's format reward scores them 0
    for garbled in ("<think>\n2 + 3 = 6\n</think>\\boxed{6}<think>\nwait, 2 + 3 = 5\n</think>\n\\boxed{5}",
                    "<think>\n2 + 3 = 5, checked twice.\n</think>\nHmm <think> let me recheck \\boxed{5}",
                    "</think>\n<think>\n2 + 3 = 5, checked twice.\n</think>\n\\boxed{5}"):
        assert first_failure(garbled, None, "stop", cfg) == "malformed_think", garbled
    assert first_failure(good.replace("<think>", ""), None, "stop", cfg) is None  # the tag in the prompt (R1)
    # math notation and accented Latin are not language mixing (a share of non-ASCII letters said they were)
    greek = "<think>\nThe circle has radius 2, so its area is π·2² = 4π. Check: π r² with r = 2 gives 4π.\n</think>\n\\boxed{4\\pi}"
    accents = "<think>\nLike Schrödinger's café example: 2 + 3 = 5, and 5 - 3 = 2.\n</think>\n\\boxed{5}"
    assert first_failure(greek, None, "stop", cfg) is None and first_failure(accents, None, "stop", cfg) is None


def test_filters_and_verifier_reasons_in_pipeline(tmp_path, monkeypatch):
    """Responses that break each rule are rejected with that reason (a stub teacher)."""
    import data_pipelines.teachers as T
    from engines import Completion

    rows = A.generate_split("train", 3)
    texts = lambda r: [  # noqa: E731
        f"<think>\nfine\n</think>\n\n\\boxed{{{r['answer']}}}",
        f"<think>\nnever closed \\boxed{{{r['answer']}}}",
        "<think>\nok\n</think>\n\nno box here",
        f"<think>\n这是中文推理过程\n</think>\n\\boxed{{{r['answer']}}}",
        "<think>\n" + "again and again and " * 20 + f"\n</think>\n\\boxed{{{r['answer']}}}",
        f"<think>\nwrong\n</think>\n\\boxed{{{int(r['answer']) + 1}}}",
    ]

    class Stub:
        name = "stub"
        def generate(self, prompts, n, sampling):
            by_problem = {r["problem"]: r for r in rows}
            return [[Completion(text=t, finish_reason="stop") for t in texts(by_problem[p[-1]["content"]])] for p in prompts]
        def close(self):
            pass

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    monkeypatch.setattr(T, "make_teacher", lambda cfg: Stub())
    stats = run_distill(_cfg(tmp_path / "o", dataset_name=str(path), num_generations=6))
    reasons = {k: v["count"] for k, v in stats["rejections"].items()}
    assert reasons == {"unclosed_think": 3, "no_answer": 3, "language_mixing": 3, "repetition": 3, "wrong_answer": 3}
    assert stats["samples"]["kept"] == 3


def test_decontamination(tmp_path):
    train = A.generate_split("train", 40)
    leaked = [r["problem"].upper() for r in train[:5]]  # case and spacing do not hide a copy
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text("".join(json.dumps({"question": q}) + "\n" for q in leaked))
    stats = run_distill(_cfg(tmp_path / "o", dataset_name="builtin:arith?n_train=40",
                             decontaminate_against=[str(evalset)]))
    used = {r["source_id"] for r in _rows(tmp_path / "o")} | {r["source_id"] for r in _rows(tmp_path / "o", "rejected")}
    from data_pipelines.distill import _hash
    eval_grams = set().union(*(ngrams(q, 8) for q in leaked))
    dropped = 0
    for r in train:
        sid = _hash("prompt", r["prompt"])
        hit = bool(ngrams(r["problem"], 8) & eval_grams)
        assert (sid not in used) == hit
        dropped += hit
    assert dropped >= 5 and stats["prompts"]["decontaminated"] == dropped
    assert stats["prompts"]["used"] == 40 - dropped


def test_decontamination_short_texts(tmp_path):
    from data_pipelines.decontaminate import Decontaminator
    from data_pipelines.distill import prepare_prompts

    problem = "Compute $\\dbinom{31}{28}$."  # 4 words: fewer than ngram=8
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text(json.dumps({"problem": problem}) + "\n")
    prompts = [problem + " Please reason step by step, and put your final answer within \\boxed{}.",
               problem, "Compute $\\dbinom{12}{3}$. Please reason step by step."]
    p = _jsonl(tmp_path / "train.jsonl", [{"prompt": q, "answer": "1"} for q in prompts])
    items, stats = prepare_prompts(_cfg(tmp_path / "o", dataset_name=p, decontaminate_against=[str(evalset)]))
    assert stats["decontaminated"] == 2 and [it.messages[-1]["content"] for it in items] == prompts[2:]
    # the reverse: a short training prompt inside a longer eval text
    long_eval = "Solve the following problem. What is 17 times 23? Put the answer in a box."
    assert Decontaminator(["What is 17 times 23?"], 8).contaminated(long_eval)
    assert Decontaminator([long_eval], 8).contaminated("what is 17 TIMES 23")
    assert not Decontaminator([long_eval], 8).contaminated("What is 17 times 24?")
    # 1-2 word texts only match an identical text, never by containment
    assert not Decontaminator(["Compute 5"], 8).contaminated("Compute 5 plus 7, then double it.")
    assert not Decontaminator(["Compute 5 plus 7, then double it."], 8).contaminated("compute 5")
    assert Decontaminator(["Compute 5"], 8).contaminated("compute 5!")


def _jsonl(path, rows, raw_lines=None):
    lines = [json.dumps(r) for r in rows]
    for i, text in (raw_lines or {}).items():
        lines[i] = text
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture()
def good_rows():
    return [{"prompt": r["problem"], "answer": r["answer"]} for r in A.generate_split("train", 12)]


def test_bad_input_errors_name_file_line_column(tmp_path, good_rows):
    out = tmp_path / "o"
    p = _jsonl(tmp_path / "noprompt.jsonl", [{"question": "q", "answer": "1"}])
    with pytest.raises(DataError, match=r"noprompt\.jsonl: missing column 'prompt'; columns are: \['question', 'answer'\]"):
        run_distill(_cfg(out, dataset_name=p))
    p = _jsonl(tmp_path / "noanswer.jsonl", [{"prompt": "q"}])
    with pytest.raises(DataError, match=r"missing column 'answer'"):
        run_distill(_cfg(out, dataset_name=p))
    rows = [dict(r) for r in good_rows]
    rows[4]["prompt"] = "   "
    p = _jsonl(tmp_path / "empty.jsonl", rows)
    with pytest.raises(DataError, match=r"empty\.jsonl line 5: prompt is empty \(column 'prompt'\)"):
        run_distill(_cfg(out, dataset_name=p))
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in good_rows]
    rows[10]["prompt"][0]["content"] = ""
    p = _jsonl(tmp_path / "msgs.jsonl", rows)
    with pytest.raises(DataError, match=r"msgs\.jsonl line 11: prompt has no non-empty user message"):
        run_distill(_cfg(out, dataset_name=p))
    rows = [dict(r) for r in good_rows]
    rows[6]["prompt"] = [{"role": "user", "content": "x"}]
    p = _jsonl(tmp_path / "nonstr.jsonl", rows)
    with pytest.raises(DataError, match=r"nonstr\.jsonl line 7: .*column 'prompt'"):
        run_distill(_cfg(out, dataset_name=p))
    rows = [dict(r) for r in good_rows]
    rows[2]["answer"] = None
    p = _jsonl(tmp_path / "nullans.jsonl", rows)
    with pytest.raises(DataError, match=r"nullans\.jsonl line 3: answer is null \(column 'answer'\)"):
        run_distill(_cfg(out, dataset_name=p))
    p = _jsonl(tmp_path / "broken.jsonl", good_rows, {8: '{"prompt": "unterminated'})
    with pytest.raises(DataError, match=r"broken\.jsonl line 9: invalid JSON"):
        run_distill(_cfg(out, dataset_name=p))
    with pytest.raises(DataError, match="unknown backend 'gpt5'"):
        run_distill(_cfg(out, backend="gpt5"))
    for n in (0, -1):  # was an empty run that "succeeded": kept 0 of 0 samples
        with pytest.raises(DataError, match=f"max_prompts must be >= 1 .*got {n}"):
            run_distill(_cfg(out, max_prompts=n))
    with pytest.raises(DataError, match="needs model_name_or_path"):
        run_distill(_cfg(out, backend="vllm"))
    assert not (out / "data").exists() or not any((out / "data").iterdir())


def test_on_bad_row_skip_counts(tmp_path, good_rows):
    rows = [dict(r) for r in good_rows]
    rows[1]["prompt"] = ""
    rows[3]["answer"] = None
    rows[5]["prompt"] = 42  # wrong type in a string column
    p = _jsonl(tmp_path / "mixed.jsonl", rows, {7: "not json at all"})
    stats = run_distill(_cfg(tmp_path / "o", dataset_name=p, on_bad_row="skip"))
    pr = stats["prompts"]
    assert pr["skipped_bad_rows"] == 4 and pr["used"] == 8 and pr["input_rows"] == 12
    where = sorted(b["location"].rsplit(" ", 1)[-1] for b in pr["bad_rows"])
    assert where == ["2", "4", "6", "8"]
    assert json.loads((tmp_path / "o" / "stats.json").read_text())["prompts"]["skipped_bad_rows"] == 4
    assert stats["samples"]["total"] == 8 * 4


def test_parquet_output(tmp_path, scripted_run):
    cfg, stats, out = scripted_run
    run_distill(_cfg(tmp_path / "pq", wrong_fraction=0.3, reference_column="solution", output_format="parquet"))
    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "pq" / "data"), split="train")
    jl = _rows(out)
    assert sorted(ds["id"]) == sorted(r["id"] for r in jl)
    assert ds.to_list()[0]["messages"] == next(r for r in jl if r["id"] == ds[0]["id"])["messages"]


def test_cli_error_without_traceback(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"), "distill", "--backend", "nope",
                          "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "distill: error:" in res.stderr and "unknown backend 'nope'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_unknown_dtype_is_a_config_error_not_a_traceback(tmp_path):
    """--dtype bf16 ended in AttributeError (hf: getattr(torch, 'bf16')) or a pydantic ValidationError
    (vllm) once the teacher was built; it is refused with the other settings, in one line."""
    for backend in ("hf", "vllm"):
        with pytest.raises(DataError, match=r"distill config: dtype must be one of auto, bfloat16, .*got 'bf16'"):
            DistillConfig(backend=backend, model_name_or_path=str(tmp_path), dtype="bf16", output_dir=str(tmp_path))
    for dtype in ("auto", "bfloat16", "float16", "float32", "half", "float"):
        DistillConfig(backend="hf", model_name_or_path=str(tmp_path), dtype=dtype, output_dir=str(tmp_path))


def test_code_rows_checked_by_their_tests(tmp_path, monkeypatch):
    """Rows with a `tests` column are verified by running the code (rewards' sandbox)."""
    import data_pipelines.teachers as T
    from engines import Completion

    good = "<think>\nread two ints, print the sum\n</think>\n\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    bad = good.replace("a + b", "a - b")
    nocode = "<think>\nhmm\n</think>\n\nJust add them."

    class Stub:
        name = "stub"
        def generate(self, prompts, n, sampling):
            return [[Completion(text=t, finish_reason="stop") for t in (good, bad, nocode)] for _ in prompts]
        def close(self):
            pass

    monkeypatch.setattr(T, "make_teacher", lambda cfg: Stub())
    tests = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6\n"}]
    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"prompt": "Add two integers from stdin.", "tests": tests}) + "\n"
                    + json.dumps({"prompt": "Sum a and b.", "tests": tests}) + "\n")
    stats = run_distill(_cfg(tmp_path / "o", dataset_name=str(path), num_generations=3))
    assert stats["samples"]["kept"] == 2
    assert {k: v["count"] for k, v in stats["rejections"].items()} == {"tests_failed": 2, "no_code": 2}
    assert all(r["messages"][-1]["content"] == good for r in _rows(tmp_path / "o"))


def test_malformed_code_tests_named_by_line_before_the_teacher_samples(tmp_path, monkeypatch):
    """A row whose test cases are malformed is a bad row: named by its line (or skipped) when the
    prompts are read. A case missing its 'output' used to be filled with null by the table and then
    compared as the text "None" (every sample silently "tests_failed"); cases with other keys failed
    the run only after the teacher had sampled the shard, with no file or line."""
    import data_pipelines.teachers as T
    from engines import Completion

    good = "<think>\nsum\n</think>\n\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    calls = []

    class Stub:
        name = "stub"
        def generate(self, prompts, n, sampling):
            calls.append(len(prompts))
            return [[Completion(text=good, finish_reason="stop")] * n for _ in prompts]
        def close(self):
            pass

    monkeypatch.setattr(T, "make_teacher", lambda cfg: Stub())
    tests = [{"input": "2 3\n", "output": "5\n"}]
    rows = [{"prompt": f"Add two integers ({i}).", "tests": tests} for i in range(3)]
    rows[1]["tests"] = [{"input": "2 3\n"}]
    path = tmp_path / "code.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"code\.jsonl line 2: malformed tests: test case 0 has no 'output' "
                                        r"\(column 'tests'\)"):
        run_distill(_cfg(tmp_path / "o", dataset_name=str(path), num_generations=2))
    assert calls == []
    stats = run_distill(_cfg(tmp_path / "s", dataset_name=str(path), num_generations=2, on_bad_row="skip"))
    assert stats["prompts"]["skipped_bad_rows"] == 1 and stats["prompts"]["used"] == 2
    assert stats["samples"]["kept"] == 4 and stats["samples"]["rejected"] == 0

    calls.clear()
    other_keys = tmp_path / "stdin.jsonl"
    other_keys.write_text(json.dumps({"prompt": "Add.", "tests": [{"stdin": "2 3", "stdout": "5"}]}) + "\n")
    with pytest.raises(DataError, match=r"stdin\.jsonl line 1: malformed tests: .*needs 'input' and 'output'"):
        run_distill(_cfg(tmp_path / "k", dataset_name=str(other_keys), num_generations=2))
    assert calls == []


def test_rows_with_empty_tests_are_checked_by_their_answer(tmp_path, good_rows):
    """A mixed math/code set gives its math rows no test cases ([] or ""): those rows are checked by
    their answer. They went to the code verifier, which rejected every sample as "no_code"."""
    for name, empty in (("list", []), ("string", "")):
        rows = [{**r, "tests": empty} for r in good_rows[:4]]
        stats = run_distill(_cfg(tmp_path / name, dataset_name=_jsonl(tmp_path / f"{name}.jsonl", rows),
                                 wrong_fraction=0.0))
        assert stats["samples"]["verdicts"] == {"correct": 16}, empty
        assert stats["samples"]["kept"] == 16


def test_max_prompts_keeps_line_numbers(tmp_path):
    rows = [{"prompt": r["problem"], "answer": r["answer"]} for r in A.generate_split("train", 10)]
    rows[3]["prompt"] = ""
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run_distill(_cfg(tmp_path / "a", dataset_name=str(p), max_prompts=3))["prompts"]["used"] == 3
    with pytest.raises(DataError, match=r"d\.jsonl line 4: prompt is empty"):
        run_distill(_cfg(tmp_path / "b", dataset_name=str(p), max_prompts=5))


def test_max_prompts_ignores_bad_rows_past_the_used_ones(tmp_path, good_rows):
    from data_pipelines.distill import prepare_prompts

    p = _jsonl(tmp_path / "d.jsonl", good_rows[:6] + [{}] + good_rows[6:8], {6: "{broken"})
    _, stats = prepare_prompts(_cfg(tmp_path / "o", dataset_name=p, on_bad_row="skip", max_prompts=2))
    assert (stats["used"], stats["input_rows"], stats["skipped_bad_rows"], stats["bad_rows"]) == (2, 2, 0, [])
    # a bad line before the last used row still counts
    p = _jsonl(tmp_path / "e.jsonl", good_rows[:6] + [{}] + good_rows[6:8], {1: "{broken", 6: "{broken"})
    _, stats = prepare_prompts(_cfg(tmp_path / "o", dataset_name=p, on_bad_row="skip", max_prompts=2))
    assert (stats["used"], stats["input_rows"], stats["skipped_bad_rows"]) == (2, 3, 1)
    assert stats["bad_rows"][0]["location"].endswith("e.jsonl line 2")


def _ids(out):
    return [sid for line in (Path(out) / "ledger.jsonl").read_text().splitlines() for sid in json.loads(line)["ids"]]


def test_resume_refused_when_a_local_input_changed(tmp_path):
    """run_config.json records a local input's contents: the same path with other rows in it
    is another run, refused like any changed setting (naming the file, output untouched)."""
    rows = [{"prompt": r["problem"], "answer": r["answer"]} for r in A.generate_split("train", 60)]
    prompts = tmp_path / "prompts.jsonl"
    evalset = tmp_path / "eval.jsonl"
    _jsonl(prompts, rows[:40])
    _jsonl(evalset, [{"question": "what is the colour of the sky over the sea at noon on a clear day"}])
    out = tmp_path / "o"
    kw = dict(dataset_name=str(prompts), shard_size=10, num_generations=2, decontaminate_against=[str(evalset)])
    stats = run_distill(_cfg(out, **kw))
    assert stats["prompts"]["used"] == 40 and len(_ids(out)) == 40
    before = _tree_digest(out)
    again = run_distill(_cfg(out, **kw))  # unchanged input: resumes, nothing regenerated
    assert again["samples"] == stats["samples"] and len(_ids(out)) == 40
    assert {k: v for k, v in _tree_digest(out).items() if k != "stats.json"} == \
           {k: v for k, v in before.items() if k != "stats.json"}
    before = _tree_digest(out)

    _jsonl(prompts, rows[:20] + rows[40:60])  # the last 20 prompts replaced
    with pytest.raises(DataError, match=rf"different settings \(contents of {re.escape(str(prompts))}\)"):
        run_distill(_cfg(out, **kw))
    assert _tree_digest(out) == before
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"), "distill", "--dataset_name", str(prompts),
                          "--shard_size", "10", "--num_generations", "2", "--decontaminate_against", str(evalset),
                          "--output_dir", str(out), "--disable_tqdm", "true"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and f"contents of {prompts}" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert _tree_digest(out) == before and len(_ids(out)) == 40

    _jsonl(prompts, rows[:40])  # restored: resumes again; an edited evaluation set is refused too
    run_distill(_cfg(out, **kw))
    _jsonl(evalset, [{"question": "how many legs does a spider have when it is fully grown"}])
    with pytest.raises(DataError, match=rf"different settings \(contents of {re.escape(str(evalset))}\)"):
        run_distill(_cfg(out, **kw))


def test_resume_refused_when_a_file_in_a_local_dataset_directory_changed(tmp_path):
    rows = [{"prompt": r["problem"], "answer": r["answer"]} for r in A.generate_split("train", 30)]
    d = tmp_path / "d"
    d.mkdir()
    _jsonl(d / "train-00000.jsonl", rows[:10])
    _jsonl(d / "train-00001.jsonl", rows[10:20])
    out = tmp_path / "o"
    kw = dict(dataset_name=str(d), shard_size=10, num_generations=2)
    run_distill(_cfg(out, **kw))
    run_distill(_cfg(out, **kw))
    _jsonl(d / "train-00001.jsonl", rows[20:30])
    with pytest.raises(DataError, match=rf"different settings \(contents of {re.escape(str(d))}\)"):
        run_distill(_cfg(out, **kw))
    assert len(_ids(out)) == 20


def test_run_config_without_input_contents_resumes_and_records_them(tmp_path):
    """A run_config.json written before contents were recorded: the same settings resume
    (nothing to compare the input with) and record the contents; other settings are refused."""
    rows = [{"prompt": r["problem"], "answer": r["answer"]} for r in A.generate_split("train", 30)]
    prompts = tmp_path / "prompts.jsonl"
    _jsonl(prompts, rows[:20])
    out = tmp_path / "o"
    kw = dict(dataset_name=str(prompts), shard_size=10, num_generations=2)
    run_distill(_cfg(out, **kw))
    cfg_path = out / "run_config.json"
    key = f"contents of {prompts}"
    recorded = json.loads(cfg_path.read_text())
    assert recorded[key] == "sha256:" + hashlib.sha256(prompts.read_bytes()).hexdigest()
    older = {k: v for k, v in recorded.items() if not k.startswith("contents of ")}
    cfg_path.write_text(json.dumps(older))
    with pytest.raises(DataError, match=r"different settings \(seed\)"):
        run_distill(_cfg(out, seed=1, **kw))
    assert json.loads(cfg_path.read_text()) == older
    run_distill(_cfg(out, **kw))
    assert json.loads(cfg_path.read_text()) == recorded and len(_ids(out)) == 20
    _jsonl(prompts, rows[10:30])
    with pytest.raises(DataError, match=re.escape(key)):
        run_distill(_cfg(out, **kw))


def test_the_teacher_is_asked_for_no_log_probs(tmp_path, monkeypatch):
    """The samples are judged on their text: the teacher is not asked for log-probs, which the hf teacher would
    otherwise keep as every step's scores (vocab x tokens x rows floats) and vLLM would compute per token."""
    import data_pipelines.teachers as T
    from engines import Completion

    asked = []

    class Stub:
        name = "stub"

        def generate(self, prompts, n, sampling):
            asked.append(sampling)
            return [[Completion(text="<think>\nok\n</think>\n\n\\boxed{1}", finish_reason="stop")] * n for _ in prompts]

        def close(self):
            pass

    monkeypatch.setattr(T, "make_teacher", lambda cfg: Stub())
    run_distill(_cfg(tmp_path / "o", dataset_name="builtin:arith?n_train=8", num_generations=2))
    assert asked and all(s.logprobs is False for s in asked)


def test_a_float_gold_in_scientific_notation_is_read_as_the_verifier_reads_it(tmp_path, monkeypatch):
    """A JSON answer 1e-05 was kept as the text "1e-05", which math-verify reads as e - 5: a correct
    \\boxed{0.00001} was rejected as wrong_answer. A NaN answer (a missing value) is a bad row, not the gold "nan"."""
    import data_pipelines.teachers as T
    from engines import Completion

    class Stub:
        name = "stub"

        def generate(self, prompts, n, sampling):
            return [[Completion(text="<think>\nsmall\n</think>\n\n\\boxed{0.00001}", finish_reason="stop")] * n
                    for _ in prompts]

        def close(self):
            pass

    monkeypatch.setattr(T, "make_teacher", lambda cfg: Stub())
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "What is 10^-5?", "answer": 1e-05}) + "\n"
                    + '{"prompt": "What is missing?", "answer": NaN}\n')
    stats = run_distill(_cfg(tmp_path / "o", dataset_name=str(path), num_generations=1, on_bad_row="skip"))
    assert stats["samples"]["kept"] == 1 and stats["samples"]["total"] == 1, stats["samples"]
    assert [r["answer"] for r in _rows(tmp_path / "o")] == ["0.00001"]


def test_a_resume_with_another_teacher_dtype_or_engine_split_is_another_run():
    """A killed hf distill resumed with --dtype bfloat16 mixed float32 and bfloat16 shards into one dataset, its
    stats.json saying bfloat16 for all of it: the teacher's dtype, engine options and tensor-parallel split
    change what it samples, so they are settings a resume must match."""
    from data_pipelines.distill import DistillConfig

    def fingerprint(backend: str, **kw) -> dict:
        return DistillConfig(output_dir="o", backend=backend, model_name_or_path="m", **kw).run_fingerprint()

    assert fingerprint("hf") != fingerprint("hf", dtype="bfloat16")
    assert fingerprint("vllm") != fingerprint("vllm", dtype="bfloat16")
    assert fingerprint("vllm") != fingerprint("vllm", tensor_parallel_size=2)
    assert fingerprint("vllm") != fingerprint("vllm", vllm_kwargs={"quantization": "fp8"})
    assert fingerprint("vllm") == fingerprint("vllm", max_model_len=4096)  # a bound, not how it samples


def test_greedy_decoding_with_several_answers_per_prompt_is_warned_about():
    from data_pipelines.distill import DistillConfig, greedy_copies_warning

    def cfg(**kw):
        return DistillConfig(output_dir="o", backend="hf", model_name_or_path="m", **kw)

    assert "the same answer 4 times" in greedy_copies_warning(cfg(temperature=0.0, num_generations=4))
    assert greedy_copies_warning(cfg(temperature=0.6, num_generations=4)) is None
    assert greedy_copies_warning(cfg(temperature=0.0, num_generations=1)) is None
