"""The reward API (resolve / score / failure policy) and the built-in rewards."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import random
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repo may be used without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import rewards  # noqa: E402
from rewards import RewardError, RewardSuite, score_rewards  # noqa: E402
from rewards.math_verifier import extract_final_answer, verify_math, verify_math_batch  # noqa: E402


# -- resolving ---------------------------------------------------------------------------------
def reward_len(completions, **kwargs):
    """The example custom reward from TRL's GRPOTrainer documentation."""
    return [-abs(20 - len(completion)) for completion in completions]


def test_trl_style_reward_scores_with_weights():
    prompts = ["p1", "p2"]
    completions = ["x" * 20, "x" * 25]
    res = score_rewards([(reward_len, 2.0), ("soft_overlong(max_len=3, cache=1)", 1.0)], prompts, completions)
    assert res.names == ["reward_len", "soft_overlong"]
    assert res.values["reward_len"] == [0.0, -5.0]
    assert res.values["soft_overlong"] == [0.0, 0.0]  # one word each
    assert res.total == [0.0, -10.0]
    assert res.metrics["rewards/reward_len/mean"] == -2.5
    assert res.metrics["rewards/reward_len/std"] == pytest.approx(math.sqrt(12.5))
    assert res.metrics["rewards/reward_len/failures"] == 0.0


def test_file_plugin_resolves_and_scores(tmp_path):
    plugin = tmp_path / "my_rewards.py"
    plugin.write_text(textwrap.dedent('''
        def short_answer(prompts, completions, **kwargs):
            """Prefer short answers."""
            return [1.0 if len(c) < 5 else 0.0 for c in completions]
    '''))
    fn = rewards.resolve(f"{plugin}:short_answer")
    assert fn([""] * 2, ["ok", "too long"]) == [1.0, 0.0]
    res = score_rewards([f"{plugin}:short_answer"], ["a", "b"], ["ok", "too long"])
    assert res.names == ["short_answer"] and res.total == [1.0, 0.0]
    with pytest.raises(RewardError, match="has no 'missing'"):
        rewards.resolve(f"{plugin}:missing")
    with pytest.raises(RewardError, match="not found"):
        rewards.resolve(f"{tmp_path}/nope.py:f")


def test_module_function_spec(tmp_path, monkeypatch):
    (tmp_path / "mod_rewards_pkg").mkdir()
    (tmp_path / "mod_rewards_pkg" / "__init__.py").write_text("")
    (tmp_path / "mod_rewards_pkg" / "scoring.py").write_text(textwrap.dedent('''
        def has_yes(prompts, completions, **kw):
            return [float("yes" in c) for c in completions]

        def make_contains(word):
            def contains(prompts, completions, **kw):
                return [float(word in c) for c in completions]
            return contains
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rewards.resolve("mod_rewards_pkg.scoring:has_yes")(["p"], ["yes!"]) == [1.0]
    assert rewards.resolve("mod_rewards_pkg.scoring:make_contains(word='no')")(["p", "p"], ["no", "yes"]) == [1.0, 0.0]
    with pytest.raises(RewardError, match="cannot import reward module"):
        rewards.resolve("no_such_module_xyz:f")


def test_empty_call_and_dotted_attributes_in_specs(tmp_path, monkeypatch):
    # "file.py:factory()" returned the factory itself, and "file.py:Class.method" did not resolve,
    # while "module:factory()" / "module:Class.method" behave; both forms now agree.
    code = textwrap.dedent('''
        def make_const(value=0.5):
            def const(prompts, completions, **kw):
                return [value] * len(completions)
            return const

        class Holder:
            @staticmethod
            def rew(prompts, completions, **kw):
                return [2.0] * len(completions)
    ''')
    (tmp_path / "spec_file_rewards.py").write_text(code)
    (tmp_path / "spec_mod_rewards.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    for where in (str(tmp_path / "spec_file_rewards.py"), "spec_mod_rewards"):
        assert rewards.resolve(f"{where}:make_const()")(["p"], ["c"]) == [0.5]
        assert rewards.resolve(f"{where}:make_const(value=1.0)")(["p"], ["c"]) == [1.0]
        name, fn = rewards.resolve_named(f"{where}:Holder.rew")
        assert name == "rew" and fn(["p"], ["c"]) == [2.0]
        assert score_rewards([f"{where}:make_const()"], ["p"], ["c"]).total == [0.5]
        with pytest.raises(RewardError, match="has no 'Holder.nope'"):
            rewards.resolve(f"{where}:Holder.nope")
    assert rewards.resolve("soft_overlong()") is rewards.resolve("soft_overlong")


@pytest.mark.parametrize("spec, pattern", [
    ("soft_overlong(max_len={[1]: 2})", "keyword=literal"),  # TypeError: unhashable list
    ("language_consistency(target=['en', 5])", "building reward"),  # AttributeError in the factory
])
def test_bad_spec_arguments_are_a_one_line_reward_error(spec, pattern):
    with pytest.raises(RewardError, match=pattern):
        rewards.resolve(spec)


def test_entry_point_plugin(tmp_path, monkeypatch):
    # A fake installed distribution: a module plus a .dist-info declaring the entry point.
    (tmp_path / "fake_plugin_mod.py").write_text(textwrap.dedent('''
        def exclaim(prompts, completions, **kwargs):
            """Reward exclamation marks."""
            return [float(c.count("!")) for c in completions]
    '''))
    info = tmp_path / "fake_reward_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-reward-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{rewards.ENTRY_POINT_GROUP}]\nexclaim = fake_plugin_mod:exclaim\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rewards.resolve("exclaim")(["p"], ["hi!!"]) == [2.0]
    listed = {r.name: r for r in rewards.list_rewards()}
    assert "plugin" in listed["exclaim"].source and listed["exclaim"].doc == "Reward exclamation marks."
    assert score_rewards(["exclaim", "format"], ["p"], ["<think>a</think>b!"]).total == [2.0]


def test_unknown_name_lists_builtins_and_close_matches():
    with pytest.raises(RewardError) as err:
        rewards.resolve("math_acuracy")
    msg = str(err.value)
    assert "Did you mean: math_accuracy" in msg
    for name in ("code_tests", "format", "soft_overlong", "language_consistency"):
        assert name in msg
    with pytest.raises(RewardError, match="keyword=literal"):
        rewards.resolve("soft_overlong(max_len=len)")
    with pytest.raises(RewardError, match="building reward 'format\\(bogus=1\\)' failed"):
        rewards.resolve("format(bogus=1)")


def test_list_rewards_covers_builtins():
    listed = {r.name: r for r in rewards.list_rewards()}
    for name in ("math_accuracy", "code_tests", "code_tests_all", "format", "language_consistency",
                 "soft_overlong", "length"):
        assert name in listed and listed[name].doc, name
    assert listed["length"].source == "alias of soft_overlong"


def test_async_reward_and_conversational_completions():
    async def async_len(prompts, completions, **kwargs):
        return [float(len(rewards.completion_text(c))) for c in completions]

    conv = [[{"role": "assistant", "content": "abc"}], [{"role": "assistant", "content": "de"}]]
    res = score_rewards([async_len], [[{"role": "user", "content": "q"}]] * 2, conv)
    assert res.values["async_len"] == [3.0, 2.0]


def test_async_rewards_share_one_event_loop_across_calls_and_rewards():
    """An async reward that keeps asyncio state between calls (here a rate-limiting semaphore, which
    asyncio binds to the loop of its first contended use) must see the same loop at every call, as under
    TRL: with a fresh loop per call the second call raised "bound to a different event loop". Two async
    rewards scored concurrently, and the GuardedReward TRL calls, share it too."""
    import asyncio

    from rewards.scoring import GuardedReward

    semaphore = asyncio.Semaphore(1)
    loops: list[asyncio.AbstractEventLoop] = []  # kept alive: distinct loops have distinct ids

    async def rate_limited(prompts, completions, **kwargs):
        loops.append(asyncio.get_running_loop())

        async def one(c):
            async with semaphore:  # contended: the semaphore binds to the running loop
                await asyncio.sleep(0)
                return 1.0

        return list(await asyncio.gather(*(one(c) for c in completions)))

    async def other(prompts, completions, **kwargs):
        loops.append(asyncio.get_running_loop())
        return [0.5] * len(completions)

    suite = RewardSuite([rate_limited, other])
    for step in range(3):
        res = suite.score(P, C)
        assert res.values["rate_limited"] == [1.0] * len(C) and res.values["other"] == [0.5] * len(C), step
    for guarded in suite.trl_reward_funcs():  # the way TRL calls them, with a timeout too
        assert len(GuardedReward(guarded.__name__, guarded.fn, timeout_s=5.0)(P, C)) == len(C)
    assert len(loops) == 8 and len({id(loop) for loop in loops}) == 1


def test_an_async_reward_past_its_timeout_is_cancelled():
    import asyncio

    seen: dict[str, bool] = {}

    async def slow(prompts, completions, **kwargs):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen["cancelled"] = True
            raise
        return [1.0] * len(completions)

    t0 = time.monotonic()
    res = score_rewards([slow], P, C, policy="skip", timeout_s=0.3)
    assert time.monotonic() - t0 < 5 and res.values["slow"] == [None] * len(C)
    assert "timed out after 0.3 s (the call was cancelled)" in res.failures[0].cause
    for _ in range(50):
        if seen.get("cancelled"):
            break
        time.sleep(0.02)
    assert seen.get("cancelled")


@pytest.mark.parametrize("spec", ["math_accuracy(timeout_s=0)", "math_accuracy(timeout_s=-1)",
                                  "code_tests(timeout_s=0)", "code_tests_all(timeout_s=-2.5)"])
def test_a_verifier_timeout_of_zero_or_less_is_refused(spec):
    """It timed out every check, so every answer scored 0.0 with no failure counted."""
    with pytest.raises(RewardError, match=r"timeout_s must be > 0 seconds"):
        rewards.resolve(spec)


def test_gold_column_is_read_from_the_spec_alone():
    assert rewards.gold_column("math_accuracy") == rewards.gold_column("math_accuracy(timeout_s=3)") == "answer"
    assert rewards.gold_column("math_accuracy(gold_column='solution')") == "solution"
    assert rewards.gold_column("format") is None and rewards.gold_column("code_tests") is None
    assert rewards.gold_column("no/such/file.py:f") is None  # nothing imported


def test_rewards_imports_no_other_toolkit_package():
    code = ("import sys; sys.path.insert(0, %r); import rewards; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('posttrain', 'data_pipelines', 'eval_hooks')]; "
            "print(bad)" % str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr


# -- failure policy ----------------------------------------------------------------------------
def boom(prompts, completions, **kw):
    raise ValueError("verifier exploded")


def sleepy(prompts, completions, **kw):
    time.sleep(30)
    return [1.0] * len(completions)


def short(prompts, completions, **kw):
    return [1.0]


def nan_at_2(prompts, completions, **kw):
    return [1.0, 0.0, float("nan"), 1.0]


def text_value(prompts, completions, **kw):
    return [1.0, "high", 0.0, 1.0]


def ones(prompts, completions, **kw):
    return [1.0] * len(completions)


P, C = ["p"] * 4, ["a", "b", "c", "d"]


@pytest.mark.parametrize("fn, pattern", [
    (boom, r"'boom' failed on all rows: raised ValueError: verifier exploded"),
    (short, r"'short' failed on all rows: returned 1 values for 4 completions"),
    (nan_at_2, r"'nan_at_2' failed on row 2: returned nan"),
    (text_value, r"'text_value' failed on row 1: returned 'high' \(str\), not a number"),
])
def test_policy_error_names_reward_row_and_cause(fn, pattern):
    with pytest.raises(RewardError, match=pattern):
        score_rewards([fn, ones], P, C, policy="error")


@pytest.mark.parametrize("fn, failed_rows", [(boom, 4), (short, 4), (nan_at_2, 1), (text_value, 1)])
def test_policy_skip_counts_failures(fn, failed_rows):
    res = score_rewards([fn, (ones, 0.5)], P, C, policy="skip")
    name = fn.__name__
    assert res.metrics[f"rewards/{name}/failures"] == failed_rows
    assert sum(v is None for v in res.values[name]) == failed_rows
    assert res.metrics["rewards/ones/failures"] == 0
    # None counts as 0 in the weighted total; the other reward still scores every row.
    for i in range(4):
        own = res.values[name][i] or 0.0
        assert res.total[i] == pytest.approx(own + 0.5)


def test_hanging_reward_times_out():
    t0 = time.monotonic()
    with pytest.raises(RewardError, match="'sleepy' failed on all rows: timed out after 0.5 s"):
        score_rewards([sleepy, ones], P, C, policy="error", timeout_s=0.5)
    res = score_rewards([sleepy, ones], P, C, policy="skip", timeout_s=0.5)
    assert time.monotonic() - t0 < 3.0
    assert res.values["sleepy"] == [None] * 4 and res.metrics["rewards/sleepy/failures"] == 4
    assert res.values["ones"] == [1.0] * 4


def test_none_is_excluded_from_mean_and_all_none_row_is_unscorable():
    def partial(prompts, completions, **kw):
        return [1.0, None, 0.0, None]

    def sparse(prompts, completions, **kw):
        return [None, None, 2.0, 4.0]

    res = score_rewards([partial, (sparse, 0.5)], P, C)
    assert res.total == [1.0, None, 1.0, 2.0]
    assert res.metrics["rewards/partial/mean"] == 0.5
    assert res.metrics["rewards/sparse/mean"] == 3.0
    assert res.metrics["rewards/partial/failures"] == 0
    assert math.isnan(res.matrix()[1][0])


def test_guarded_trl_reward_funcs_apply_policy():
    suite = RewardSuite([nan_at_2, "format"], policy="skip")
    logged = {}
    guarded = suite.trl_reward_funcs()
    assert [g.__name__ for g in guarded] == ["nan_at_2", "format"]
    out = guarded[0](prompts=P, completions=C, log_metric=lambda k, v: logged.update({k: v}))
    assert out == [1.0, 0.0, None, 1.0] and logged == {"rewards/nan_at_2/failures": 1.0}
    with pytest.raises(RewardError, match="row 2"):
        RewardSuite([nan_at_2], policy="error").trl_reward_funcs()[0](prompts=P, completions=C)


def test_column_length_mismatch_is_a_usage_error():
    with pytest.raises(ValueError, match="column 'answer' has 1 values for 4 completions"):
        score_rewards(["math_accuracy"], P, C, columns={"answer": ["1"]})


# -- math --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{3} then \boxed{ \{1,2\} }", r"\{1,2\}"),
    (r"<think>\boxed{1}</think> final \boxed{2}", "2"),
    (r"<think>\boxed{1}</think> no box", None),
    (r"<think>still thinking \boxed{1}", None),
    (r"reasoning</think>\fbox{7}", "7"),
    (r"\boxed{\frac{1}{2}", None),  # cut off mid-answer
    (r"\boxed{}", None),
    ("nothing here", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_extract_final_answer_alternative_formats():
    assert extract_final_answer("<answer>42</answer>", ("answer_tag",)) == "42"
    assert extract_final_answer("The final answer is 42.", ("boxed", "answer_line")) == "42"
    with pytest.raises(ValueError, match="unknown answer format"):
        extract_final_answer("x", ("latex",))


def test_answer_line_in_markdown_bold_is_scored():
    # LLMs bold their answer; "\\boxed{**5**}" does not parse, so a right answer scored 0.0.
    fmt = rewards.make_math_accuracy(formats=("boxed", "answer_line"))
    comps = ["The answer is **5**.", "**The answer is 5.**", "**Final Answer:** $-3$", "The answer is **6**."]
    assert fmt(["q"] * 4, comps, answer=["5", "5", "-3", "5"]) == [1.0, 1.0, 1.0, 0.0]


_OLD_ANSWER_LINE = re.compile(r"(?im)^.*?\b(?:final answer|answer)\s*(?:is|:)\s*(.+?)\s*$")  # quadratic


def test_answer_line_is_linear_and_extracts_as_before():
    from rewards.math_verifier import _answer_line

    def old(text):
        found = _OLD_ANSWER_LINE.findall(text)
        return found[-1].strip().rstrip(".").strip("$ ") if found else None

    toks = ["answer", "Final Answer", " is", "is", ":", " ", "\n", "\t", "\r", "\xa0", "\u2003", "5", ".", "$", "x",
            "\x85"]
    rng = random.Random(0)
    for _ in range(20000):
        text = "".join(rng.choice(toks) for _ in range(rng.randint(0, 12)))
        assert _answer_line(text) == old(text), repr(text)
    # The old pattern took ~10 s on 64k spaces and grows with the square; these take milliseconds.
    n = 200_000
    for text in ["<think>r</think>The final answer is 5" + " " * n + ".", "Answer: 5" + " " * n + "x",
                 "answer:" + "\n" * n, "answer " * (n // 7), ("answer is 5   \n") * (n // 14)]:
        t0 = time.perf_counter()
        extract_final_answer(text, ("boxed", "answer_line"))
        assert time.perf_counter() - t0 < 2.0, repr(text[:40])
    assert extract_final_answer("<think>r</think>The final answer is 5" + " " * n + ".",
                                ("boxed", "answer_line")) == "5"


MATH_CASES = [
    # equivalent forms -> 1.0
    (r"<think>2+2</think> The answer is \boxed{4}.", "4", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "0.75", 1.0),
    (r"\boxed{1/2}", r"\frac12", 1.0),
    (r"\boxed{\{2, 1\}}", r"\{1,2\}", 1.0),
    (r"\boxed{(0,1]}", "(0,1]", 1.0),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    (r"\boxed{\sqrt{2}}", "2^{1/2}", 1.0),
    (r"\boxed{\frac{\sqrt3}{2}}", r"\frac{\sqrt{3}}{2}", 1.0),
    (r"\boxed{50\%}", r"50\%", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{x = 3}", "3", 1.0),
    (r"\boxed{2\pi}", r"2\pi", 1.0),
    (r"\boxed{\frac{14}{2}}", "7", 1.0),
    (r"\boxed{\infty}", r"\infty", 1.0),
    (r"\boxed{y = 1 + 2x}", "y=2x+1", 1.0),
    (r"\boxed{10^{-3}}", "0.001", 1.0),
    (r"First \boxed{3}, corrected: \boxed{4}", "4", 1.0),
    (r"<think>maybe \boxed{3}</think> so \boxed{4}", "4", 1.0),
    (r"reasoning without the opening tag</think>\n\boxed{7}", "7", 1.0),
    (r"\fbox{5}", "5", 1.0),
    (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1.0),
    ([{"role": "assistant", "content": r"<think>6*2</think>\boxed{12}"}], "12", 1.0),
    # wrong answers -> 0.0
    (r"\boxed{5}", "4", 0.0),
    (r"\boxed{\frac{1}{3}}", "0.5", 0.0),
    (r"\boxed{[0,1]}", "(0,1]", 0.0),
    (r"\boxed{\{1,2\}}", r"\{1,2,3\}", 0.0),
    (r"\boxed{-\infty}", r"\infty", 0.0),
    (r"\boxed{7.0001}", "7", 0.0),
    (r"\boxed{3}, corrected: \boxed{4}", "3", 0.0),
    # no usable final answer -> 0.0
    ("The answer is 4.", "4", 0.0),
    (r"<think>the answer is \boxed{4}", "4", 0.0),  # think never closed
    (r"<think>\boxed{4}</think> I am not sure.", "4", 0.0),  # box only inside the reasoning
    (r"asdf \boxed{\frac{{}", "4", 0.0),  # unbalanced
    (r"\boxed{}", "4", 0.0),
    ("\x00\x01 ☃ \\boxed{☃☃}", "4", 0.0),
    ("", "1", 0.0),
    # gold that does not parse -> None (row skipped)
    (r"\boxed{4}", "", None),
    ("no answer at all", "", None),
]


def test_math_accuracy_table():
    assert len(MATH_CASES) >= 30
    completions = [c for c, _, _ in MATH_CASES]
    golds = [g for _, g, _ in MATH_CASES]
    got = rewards.math_accuracy(["q"] * len(MATH_CASES), completions, answer=golds)
    wrong = [(c, g, e, r) for (c, g, e), r in zip(MATH_CASES, got) if r != e]
    assert not wrong, wrong


def test_math_accuracy_accepts_solution_column_and_formats():
    assert rewards.math_accuracy(["q"], [r"\boxed{2}"], solution=["2"]) == [1.0]
    tagged = rewards.make_math_accuracy(formats=("answer_tag", "boxed"))
    assert tagged(["q", "q"], ["<answer>1/2</answer>", r"\boxed{0.5}"], answer=["0.5", "0.5"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="gold-answer column"):
        rewards.math_accuracy(["q"], [r"\boxed{2}"])


@pytest.mark.parametrize("gold, pred, expected", [
    ("12.", "12", True), ("-3.", "-3", True), ("0.5.", "0.5", True), ("0.5.", r"\frac{1}{2}", True),
    ("2\\pi.", "2\\pi", True), ("(1, 2).", "(1,2)", True), ("12 .", "12", True), ("12.", "13", False),
    ("-3.", "3", False), ("2\\pi.", "2", False), ("(1, 2).", "2", False),
    ("$12.$", "12", True), ("1.2.", "1.2", True),
    ("0.\\overline{3}", "0", False),  # a plain parse reads only "0": not used as the gold
])
def test_gold_with_a_sentence_final_period(gold, pred, expected):
    # "\boxed{12.}" parses to the bare string '12.', so a correct "12" scored 0.
    from math_verify import parse, verify

    assert verify_math_batch([pred], [gold], timeout_s=None) == [expected]
    if "\\" not in gold and "(" not in gold:  # plain numbers: math-verify on its own agrees
        assert verify(parse(gold), parse("\\boxed{" + pred + "}")) is expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("12.", "12", 1.0), ("-3.", "-3", 1.0), ("0.5.", r"\frac{1}{2}", 1.0), ("(1, 2).", "(1,2)", 1.0),
    (r"2\pi.", r"2\pi", 1.0), ("13.", "12", 0.0), ("-3.", "3", 0.0),
])
def test_boxed_answer_with_a_sentence_final_period(pred, gold, expected):
    # "\boxed{12.}" parses to the bare string '12.', so a right answer ending a sentence scored 0.0
    # (the gold side already reads "12." as 12).
    assert rewards.math_accuracy(["q"], [rf"<think>r</think> So \boxed{{{pred}}}"], answer=[gold]) == [expected]


def test_gold_with_a_trailing_period_through_the_pool():
    c = r"<think>6*2</think> The answer is \boxed{12}."
    comps = [c, c.replace("12", "-3"), c.replace("12", "0.5")]
    assert rewards.math_accuracy(["q"] * 3, comps, answer=["12.", "-3.", "0.5."]) == [1.0, 1.0, 1.0]


def test_numeric_gold_column_in_scientific_notation_and_nan():
    # A float column: str(1e-05) == "1e-05", which math-verify reads as e - 5 (Euler's e), so the
    # right answer scored 0.0; a NaN (a missing value) parsed as n*a*n and scored 0.0, not None.
    comps = [r"\boxed{0.00001}", r"\boxed{100000000000000000000}", r"\boxed{2.5}", r"\boxed{5}", r"\boxed{nan}"]
    got = rewards.math_accuracy(["q"] * 5, comps, answer=[1e-05, 1e20, 2.5, float("nan"), float("nan")])
    assert got == [1.0, 1.0, 1.0, None, None]
    assert verify_math_batch(["0.00001", "1"], [1e-05, 1e-05], timeout_s=None) == [True, False]


def test_verify_helpers():
    assert verify_math(r"\frac{2}{4}", "0.5") is True
    assert verify_math("3", "0.5") is False
    assert verify_math(None, "0.5") is False
    assert verify_math_batch(["1/2", None, "2", "1"], ["0.5", "1", "3", ""]) == [True, False, False, None]
    assert verify_math_batch(["1/2"], ["0.5"], timeout_s=None) == [True]  # in-process path


PATHOLOGICAL = r"9^{9^{9}}"  # sympy evaluates a ~370-million-digit integer: minutes of C code


def _hangs_forever(pred: str, gold: str, started) -> None:
    from rewards._math_worker import verify_pair

    started.set()
    verify_pair((pred, gold))


def test_pathological_input_is_killed_within_timeout():
    verify_math_batch(["1"], ["1"])  # warm the pool: worker start-up is not part of the bound
    ctx = mp.get_context("spawn")
    started = ctx.Event()
    # The same check with no timeout, to show that the input really hangs.
    control = ctx.Process(target=_hangs_forever, args=(PATHOLOGICAL, "5", started), daemon=True)
    control.start()
    try:
        t0 = time.monotonic()
        got = rewards.make_math_accuracy(timeout_s=1.0)(["q"] * 2, [rf"\boxed{{{PATHOLOGICAL}}}", r"\boxed{5}"],
                                                         answer=["5", "5"])
        elapsed = time.monotonic() - t0
        assert got == [0.0, 1.0]
        assert elapsed < 2.5, elapsed
        assert verify_math_batch([PATHOLOGICAL, "5"], ["5", "5"], timeout_s=1.0) == [None, True]
        assert verify_math_batch(["1/2"] * 4, ["0.5"] * 4) == [True] * 4  # replaced workers serve
        assert started.wait(60)
        time.sleep(3.0)
        assert control.is_alive(), "the pathological input finished by itself; pick a harder one"
    finally:
        control.kill()
        control.join()


def test_killable_pool_reports_errors_and_crashes():
    from rewards.procpool import KillablePool

    pool = KillablePool("math:sqrt", workers=2)
    try:
        out = pool.map([4.0, -1.0, 9.0], timeout_s=10)
        assert [o.status for o in out] == ["ok", "error", "ok"]
        assert out[0].value == 2.0 and "math domain error" in out[1].error
    finally:
        pool.close()
    crasher = KillablePool("ctypes:string_at", workers=1)  # reading address 0 segfaults the worker
    try:
        out = crasher.map([0, 0], timeout_s=10)
        assert [o.status for o in out] == ["crashed", "crashed"]  # each on a fresh worker
    finally:
        crasher.close()


def test_killable_pool_startup_timeout_counts_from_when_no_worker_is_ready():
    # The start-up deadline was set once per map: a map longer than startup_timeout_s that then
    # had to replace a killed worker raised "no worker ... became ready" though it started fine.
    from rewards.procpool import KillablePool

    # A worker restarts in ~0.3 s on an idle machine; 3 s failed once with the 2 cores loaded 4x over, hence 6
    pool = KillablePool("time:sleep", workers=1, startup_timeout_s=6.0)
    try:
        pool.map([0], timeout_s=30)  # warm: the worker is up
        t0 = time.monotonic()
        out = pool.map([0.25] * 28 + [60, 0.0], timeout_s=1.0)  # 7 s of work, then a kill
        assert time.monotonic() - t0 > 6.0
        assert [o.status for o in out] == ["ok"] * 28 + ["timeout", "ok"]
    finally:
        pool.close()
    broken = KillablePool("no_such_module_xyz:f", workers=1, startup_timeout_s=3.0)
    try:  # workers that cannot start still fail the map
        with pytest.raises(RuntimeError, match="cannot start"):
            broken.map([1], timeout_s=5)
    finally:
        broken.close()


def test_math_pool_works_with_torch_threads_running():
    # Workers are spawned, not forked: a fork of a process with torch's thread pool live can deadlock.
    code = textwrap.dedent(f'''
        import sys; sys.path.insert(0, {str(ROOT)!r})
        import torch
        torch.set_num_threads(2)
        x = torch.randn(256, 256); (x @ x).sum()
        import rewards
        if __name__ == "__main__":
            print(rewards.math_accuracy(["q"] * 3, [r"\\boxed{{1/2}}", r"\\boxed{{3}}", "none"], answer=["0.5"] * 3))
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[1.0, 0.0, 0.0]"


# -- code --------------------------------------------------------------------------------------
ADD_TESTS = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 7\n", "output": "12"}]


def fenced(code: str) -> str:
    return f"<think>plan</think>\nHere:\n```python\n{code}\n```\n"


def test_code_tests_pass_fail_and_fraction():
    completions = [
        fenced("a, b = map(int, input().split())\nprint(a + b)"),  # correct
        fenced("a, b = map(int, input().split())\nprint(a - b)"),  # wrong
        fenced("print(3)"),  # passes one of two
        fenced("a, b = map(int, input().split())\nprint(str(a + b) + '   ')\nprint()"),  # trailing whitespace
        "<think>no code</think> sorry",
        fenced("raise SystemExit(1)"),
        "```python\nprint(1)\n```<think>unfinished",  # code before an unclosed think: no answer
    ]
    n = len(completions)
    tests = [ADD_TESTS] * n
    assert rewards.code_tests(["q"] * n, completions, tests=tests) == [1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0]
    assert rewards.code_tests_all(["q"] * n, completions, tests=tests) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]


def test_code_tests_json_tests_last_block_and_empty_tests():
    two_blocks = "```python\nprint('draft')\n```\nfinal:\n```python\nprint(input()[::-1])\n```"
    tests_json = json.dumps([{"input": "abc", "output": "cba"}])
    assert rewards.code_tests(["q"], [two_blocks], tests=[tests_json]) == [1.0]
    apps = json.dumps({"inputs": ["abc\n", "xy\n"], "outputs": ["cba\n", "yx\n"]})
    assert rewards.resolve("code_tests_all")(["q"], [two_blocks], tests=[apps]) == [1.0]
    assert rewards.code_tests(["q"], [two_blocks], tests=[[]]) == [None]
    bad = rewards.code_tests(["q"], [two_blocks], tests=[[{"in": "x"}]])  # malformed: a failed row, not a raise
    assert isinstance(bad[0], rewards.RowFailure) and math.isnan(bad[0]) and "'input' and 'output'" in bad[0].cause


def test_apps_tests_given_as_lists_of_lines_are_joined_with_newlines():
    # APPS/TACO stdin rows may hold a case's input or output as a list of lines (their harness joins
    # them); str() of the list expected the text "['3', '7']", so a correct program scored 0.0.
    prog = fenced("n = int(input())\nfor _ in range(n):\n    a, b = map(int, input().split())\n    print(a + b)")
    apps = {"inputs": [["2", "1 2", "3 4"], "1\n5 5\n"], "outputs": [["3", "7"], "10\n"]}
    assert rewards.parse_tests(apps)[0] == {"input": "2\n1 2\n3 4", "output": "3\n7"}
    assert rewards.code_tests(["q"] * 2, [prog] * 2, tests=[apps, json.dumps(apps)]) == [1.0, 1.0]


GOOD_ADD = fenced("a, b = map(int, input().split())\nprint(a + b)")
ONE_TEST = [{"input": "1 2\n", "output": "3\n"}]


@pytest.mark.parametrize("missing", [None, "", "  ", "null"], ids=["None", "empty", "blank", "json_null"])
def test_code_tests_row_without_tests_is_not_applicable(missing):
    # One row with no tests used to fail the whole batch (JSONDecodeError / TypeError).
    assert rewards.code_tests(["q"] * 2, [GOOD_ADD, GOOD_ADD], tests=[ONE_TEST, missing]) == [1.0, None]


def test_mixed_math_and_code_batch_scores_every_row():
    res = score_rewards(["math_accuracy", "code_tests"], ["q", "q"], [GOOD_ADD, r"<think>x</think>\boxed{4}"],
                        columns={"answer": [None, "4"], "tests": [ONE_TEST, None]}, policy="skip")
    assert res.values == {"math_accuracy": [None, 1.0], "code_tests": [1.0, None]}
    assert not res.failures and res.total == [1.0, 1.0]


@pytest.mark.parametrize("malformed", ["{not json", 42, {"inputs": ["1 2"]}, [{"in": "x"}], {"x": 1}],
                         ids=["bad_json", "number", "no_outputs", "bad_case", "bad_dict"])
def test_malformed_tests_fail_only_their_row(malformed):
    comps, cols = [GOOD_ADD] * 3, {"tests": [ONE_TEST, malformed, ONE_TEST]}
    res = score_rewards(["code_tests"], ["q"] * 3, comps, columns=cols, policy="skip")
    assert res.values["code_tests"] == [1.0, None, 1.0]
    assert [(f.reward, f.row) for f in res.failures] == [("code_tests", 1)]
    assert "malformed 'tests'" in res.failures[0].cause
    assert res.metrics["rewards/code_tests/failures"] == 1.0
    with pytest.raises(RewardError, match=r"'code_tests' failed on row 1: malformed 'tests' value"):
        score_rewards(["code_tests"], ["q"] * 3, comps, columns=cols, policy="error")
    guarded = RewardSuite(["code_tests"], policy="skip").trl_reward_funcs()[0]  # what GRPO calls
    assert guarded(["q"] * 3, comps, **cols) == [1.0, None, 1.0]


def test_apps_call_based_tests_are_a_failed_row_not_a_zero():
    # A call-based APPS/TACO row (fn_name; inputs are function arguments) was run as stdin, so even
    # a correct solution scored 0.0; it cannot be checked here, so the row is reported instead.
    prog = fenced("def add(a, b):\n    return a + b")
    row = {"fn_name": "add", "inputs": [[1, 2]], "outputs": [[3]]}
    res = score_rewards(["code_tests"], ["q"] * 2, [prog, GOOD_ADD], columns={"tests": [row, ONE_TEST]},
                        policy="skip")
    assert res.values["code_tests"] == [None, 1.0]
    assert "fn_name='add'" in res.failures[0].cause


def test_row_failure_is_a_nan_float_that_pickles():
    import pickle

    f = rewards.RowFailure("why")
    assert isinstance(f, float) and math.isnan(f)
    g = pickle.loads(pickle.dumps(f))
    assert isinstance(g, rewards.RowFailure) and g.cause == "why"


def test_code_tests_with_lone_surrogates_do_not_raise():
    # str.encode("utf-8") raised UnicodeEncodeError for the whole batch.
    comps = [fenced("\ud800"), fenced("x = '\ud83d'\nprint(1)"), GOOD_ADD]
    assert rewards.code_tests(["q"] * 3, comps, tests=[ONE_TEST] * 3) == [0.0, 0.0, 1.0]
    assert rewards.code_tests(["q"], [fenced("print(len(input()))")],
                              tests=[[{"input": "a\udc80b", "output": "3"}]]) == [0.0]  # input is not UTF-8


def test_code_tests_timeout_gives_zero_and_scoring_continues():
    slow = rewards.make_code_tests(timeout_s=1.0)
    completions = [fenced("while True: pass"), fenced("print(input())")]
    t0 = time.monotonic()
    assert slow(["q"] * 2, completions, tests=[[{"input": "x", "output": "x"}]] * 2) == [0.0, 1.0]
    assert time.monotonic() - t0 < 5


# -- format / language / length ----------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("<think>reasoning</think>answer", 1.0),
    ("  <think>\nr\n</think>\n\\boxed{3}", 1.0),
    ("<think>reasoning</think>   ", 0.0),  # empty answer
    ("<think>reasoning, never closed", 0.0),
    ("no think at all", 0.0),
    ("preamble <think>r</think>a", 0.0),
    ("<think>a</think>b<think>c</think>d", 0.0),
    ("reasoning</think>answer", 0.0),  # opening tag required by default
])
def test_format_reward(text, expected):
    assert rewards.format_reward(["q"], [text]) == [expected]


def test_format_reward_options():
    lenient = rewards.make_format_reward(require_open_tag=False)
    assert lenient(["q"], ["reasoning</think>answer"]) == [1.0]
    boxed = rewards.make_format_reward(require_boxed=True)
    assert boxed(["q", "q"], ["<think>r</think>\\boxed{1}", "<think>r</think>1"]) == [1.0, 0.0]


def test_language_consistency():
    fn = rewards.language_consistency
    assert fn(["q"], ["<think>all english words here</think>答案"]) == [1.0]
    assert fn(["q"], ["<think>two words 中文</think>x"]) == [pytest.approx(2 / 4)]  # 2 Latin + 2 ideographs
    assert fn(["q"], ["<think>\\frac{1}{2} = 0.5 so half</think>"]) == [1.0]  # LaTeX and digits ignored
    assert fn(["q", "q"], ["no think block", "<think>123 + 456</think>"]) == [None, None]
    zh = rewards.make_language_consistency("zh")
    assert zh(["q"], ["<think>我们计算 the sum</think>"]) == [pytest.approx(4 / 6)]
    assert rewards.resolve("language_consistency(target='ru')")(["q"], ["<think>привет мир hello</think>"]) == [
        pytest.approx(2 / 3)]


def test_soft_overlong_matches_dapo():
    fn = rewards.make_soft_overlong(max_len=100, cache=20)
    ids = [[0] * n for n in (50, 80, 90, 100, 101, 500)]
    assert fn(["q"] * 6, ["x"] * 6, completion_ids=ids) == [0.0, 0.0, -0.5, -1.0, -1.0, -1.0]
    assert fn(["q"], ["word " * 90]) == [-0.5]  # whitespace-token fallback
    chars = rewards.make_soft_overlong(max_len=10, cache=4, fallback="chars")
    assert chars(["q"], ["x" * 8]) == [-0.5]
    assert rewards.resolve("length")(["q"], ["short"]) == [0.0]


# -- TRL's own call path -----------------------------------------------------------------------
def test_builtins_through_trl_grpo_calculate_rewards():
    """Run our rewards through TRL's GRPOTrainer._calculate_rewards (the exact kwargs TRL passes)."""
    import torch
    from trl import GRPOTrainer

    funcs = [rewards.math_accuracy, rewards.format_reward, rewards.code_tests, rewards.soft_overlong,
             rewards.language_consistency, *RewardSuite(["math_accuracy"], policy="skip").trl_reward_funcs()]
    metrics, extra = {}, {}
    fake = SimpleNamespace(
        accelerator=SimpleNamespace(device="cpu", is_main_process=True),
        args=SimpleNamespace(report_to=[]),
        state=SimpleNamespace(global_step=0),
        reward_funcs=funcs,
        reward_processing_classes=[None] * len(funcs),
        reward_func_names=[getattr(f, "__name__", "f") for f in funcs],
        environments=None,
        _log_completion_extra=lambda column, values: extra.update({column: values}),
        _log_metric=lambda name, value: metrics.update({name: value}),
    )
    prompt = [{"role": "user", "content": "What is 1/2 + 0?"}]
    completions = [
        [{"role": "assistant", "content": "<think>half</think>\\boxed{\\frac{1}{2}}"}],
        [{"role": "assistant", "content": "<think>hmm</think>```python\nprint(input())\n```"}],
    ]
    inputs = [{"prompt": prompt, "answer": "0.5", "tests": [{"input": "hi", "output": "hi"}]}] * 2
    out = GRPOTrainer._calculate_rewards(fake, inputs, [prompt] * 2, completions, [[1, 2, 3], [4, 5]])
    assert out.shape == (2, len(funcs))
    expected = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]])
    assert torch.equal(out, expected), out
    assert extra["extracted_answer"] == ["\\frac{1}{2}", "[none]"]
    assert metrics == {"rewards/math_accuracy/failures": 0.0}
