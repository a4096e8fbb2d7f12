"""Evaluation: schema adapters, pass@1 / pass@k / maj@k arithmetic, recipes that validate."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from eval_hooks.accuracy import evaluate_accuracy
from eval_hooks.benchmarks import adapt_row, load_benchmark
from eval_hooks.chain import load_chain_recipe, validate_chain_recipe
from posttrain.errors import ConfigError, UserError
from engines import Completion

ROOT = Path(__file__).resolve().parents[1]


class ScriptedEngine:
    """Returns fixed texts per prompt, in order (a stand-in for vLLM when only the bookkeeping is tested)."""

    name = "scripted"

    def __init__(self, tokenizer, texts_per_prompt: list[list[str]]):
        self.tok, self.texts = tokenizer, texts_per_prompt

    def generate(self, prompt_ids, n, sampling):
        assert len(prompt_ids) == len(self.texts)
        return [[Completion(self.tok(t, add_special_tokens=False)["input_ids"], None) for t in group[:n]]
                for group in self.texts]

    def sync_weights(self, weights):  # the eval hands each next checkpoint over this way
        for _ in weights:
            pass


def two_problems(tmp_path: Path) -> Path:
    """An evaluation set of two problems, both answered 5."""
    f = tmp_path / "two.jsonl"
    f.write_text("".join(json.dumps({"problem": f"p{i}", "answer": "5"}) + "\n" for i in range(2)))
    return f


def test_schema_adapters():
    assert adapt_row({"question": "2+2?", "answer": "Because... #### 4"}, 0, "gsm8k") == (
        [{"role": "user", "content": "2+2?"}], "4")
    assert adapt_row({"problem": "Find x.", "answer": "\\frac{1}{2}"}, 0, "math500")[1] == "\\frac{1}{2}"
    prompt = [{"role": "user", "content": "1+1"}]
    assert adapt_row({"prompt": prompt, "answer": "2"}, 0, "builtin") == (prompt, "2")
    with pytest.raises(UserError, match="row 3: no known schema"):
        adapt_row({"text": "x"}, 3, "weird.jsonl")



def test_null_or_missing_gold_answers_name_the_row(tmp_path):
    """str(None) used to make the gold answer the literal "None"."""
    for row in ({"prompt": "1+1", "answer": None}, {"problem": "Find x.", "answer": None},
                {"question": "2+2?", "answer": None}):
        with pytest.raises(UserError, match=r"set row 4: answer is null \(column 'answer'\)"):
            adapt_row(row, 4, "set")
    with pytest.raises(UserError, match=r"set row 0: problem is null \(column 'problem'\)"):
        adapt_row({"problem": None, "answer": "3"}, 0, "set")
    f = tmp_path / "aime.jsonl"  # a row without its answer key reads as null
    f.write_text(json.dumps({"problem": "p0", "answer": "1"}) + "\n" + json.dumps({"problem": "p1"}) + "\n")
    with pytest.raises(UserError, match=r"aime\.jsonl line 2: answer is null"):
        load_benchmark(str(f), "train")
    assert load_benchmark(str(f), "train", limit=1)[1] == ["1"]


@pytest.mark.parametrize("key, value, message", [
    ("num_problems", "-1", "num_problems must be >= 1, got -1"),  # was "nothing to evaluate", a traceback
    ("max_tokens", "0", "max_tokens must be >= 1, got 0"),  # was vLLM's validation error
    ("k", "0", "k must be >= 1, got 0"),
    ("sampled_pass1_k", "-2", "sampled_pass1_k must be >= 0"),
    ("sampled_top_p", "0", "sampled_top_p must be in (0, 1]"),
    ("max_tokens", "512", "max_tokens (512) must be below max_model_len (512)"),  # vLLM cut answers short there
])
def test_eval_config_bounds_are_checked_with_the_recipe(key, value, message, tmp_path):
    from eval_hooks.chain import EvalStage
    from posttrain.recipe import load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(EvalStage, None, [f"--{key}", value])
    recipe = tmp_path / "chain.yaml"  # `run --validate` builds the same config
    recipe.write_text(f"name: x\nstages:\n  eval: {{{key}: {value}}}\n")
    with pytest.raises(ConfigError, match=r"stages\.eval.*" + re.escape(message)):
        validate_chain_recipe(load_chain_recipe(recipe))


def test_load_benchmark_from_local_file(tmp_path):
    f = tmp_path / "aime.jsonl"
    f.write_text("\n".join(json.dumps({"problem": f"p{i}", "answer": str(i)}) for i in range(5)) + "\n")
    prompts, answers = load_benchmark(str(f), "train", limit=3)
    assert answers == ["0", "1", "2"] and prompts[0] == [{"role": "user", "content": "p0"}]


def test_accuracy_pass_and_majority(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    right, wrong = "<think>ok</think> \\boxed{5}", "<think>ok</think> \\boxed{7}"
    texts = [[right, wrong, wrong], [wrong, right, right], [wrong, wrong, wrong]]
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
    res = evaluate_accuracy(ScriptedEngine(tok, texts), tok, prompts, ["5", "5", "5"], k=3)
    assert res["accuracy"] == pytest.approx(1 / 3)  # first sample of each problem
    assert res["pass@3"] == pytest.approx(2 / 3)
    assert res["maj@3"] == pytest.approx(1 / 3)  # only problem 2's majority answer (5) is right
    assert res["fraction_correct"] == pytest.approx([1 / 3, 2 / 3, 0.0])  # per problem: R1's pass@1 terms
    assert res["mean_correct"] == pytest.approx(1 / 3)


def test_majority_votes_count_every_accepted_form_of_the_gold_answer_and_ties_do_not_depend_on_order(tiny_model_dir):
    """maj@k voted on the answer strings: 7, 7, 5, 5.0, 10/2 (three right) elected 7; and with two samples a tie
    went to whichever came first."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    box = "<think>ok</think> \\boxed{{{}}}".format
    texts = [[box(7), box(7), box(5), box("5.0"), box("\\frac{10}{2}")], [box(7), box(5), box(8), box(8), box(9)],
             [box(5), box(7), box(9), box(9), box(9)]]
    prompts = [[{"role": "user", "content": f"q{i}"}] for i in range(len(texts))]
    res = evaluate_accuracy(ScriptedEngine(tok, texts), tok, prompts, ["5"] * len(texts), k=5)
    assert res["fraction_correct"] == pytest.approx([0.6, 0.2, 0.2])
    assert res["maj@5"] == pytest.approx((1 + 0 + 0) / 3)
    pair = [[box(5), box(7)]]
    ties = [evaluate_accuracy(ScriptedEngine(tok, [order]), tok, prompts[:1], ["5"], k=2)["maj@2"]
            for order in (pair[0], pair[0][::-1])]
    assert ties == [0.5, 0.5]  # a tie of two: the chance a random pick is right, whatever the order


def test_eval_stage_writes_sampled_pass1_per_problem(tiny_model_dir, tmp_path):
    """`sampled_pass1_k` > 0: every checkpoint is also scored with k samples per problem at the R1 settings,
    and each problem's fraction correct is written for the report's paired intervals."""
    from eval_hooks.chain import EvalStage
    from eval_hooks.evaluate import evaluate_checkpoints

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    right, wrong = "\\boxed{5}", "\\boxed{7}"

    class Recording(ScriptedEngine):
        def __init__(self):
            super().__init__(tok, [[right, wrong, right, right], [wrong, wrong, right, wrong]])
            self.calls = []

        def generate(self, prompt_ids, n, sampling):
            self.calls.append((n, sampling.temperature, sampling.top_p))
            return super().generate(prompt_ids, n, sampling)

    f = two_problems(tmp_path)
    cfg = EvalStage(dataset_name=str(f), dataset_split="train", num_problems=2, max_tokens=8, sampled_pass1_k=4)
    engine = Recording()
    res = evaluate_checkpoints({"sft": str(tiny_model_dir)}, cfg, tmp_path / "eval", engine=engine)
    assert engine.calls == [(1, 0.0, 1.0), (4, 0.6, 0.95)]  # greedy, then R1's sampling settings
    sampled = json.loads((tmp_path / "eval" / "sft.json").read_text())["sampled_pass1"]
    assert sampled["fraction_correct"] == pytest.approx([0.75, 0.25]) and sampled["pass@1"] == pytest.approx(0.5)
    assert (sampled["k"], sampled["temperature"], sampled["top_p"]) == (4, 0.6, 0.95)
    assert res["sft"]["accuracy"] == pytest.approx(0.5)  # greedy: the first answer of each problem


def test_eval_prints_pass_at_k_and_maj_at_k_it_computed(tiny_model_dir, tmp_path, capsys):
    """`eval --k 4` wrote pass@4 / maj@4 to its JSON, and its line said only the greedy accuracy."""
    from eval_hooks.chain import EvalStage
    from eval_hooks.evaluate import evaluate_checkpoints

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    right, wrong = r"\boxed{5}", r"\boxed{6}"
    engine = ScriptedEngine(tok, [[right, wrong, right, right], [wrong, wrong, right, wrong]])
    cfg = EvalStage(dataset_name=str(two_problems(tmp_path)), dataset_split="train", num_problems=2, max_tokens=8, k=2)
    res = evaluate_checkpoints({"sft": str(tiny_model_dir)}, cfg, tmp_path / "eval", engine=engine)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[eval] sft: "))
    assert f"pass@2 {res['sft']['pass@2']:.3f}, maj@2 {res['sft']['maj@2']:.3f} (T=1.0)" in line, line


def test_eval_bar_ticks_once_per_part_of_each_checkpoint_and_names_it(tiny_model_dir, tmp_path, monkeypatch):
    """The eval stage runs for minutes (the demo's: about 2, silent before): on a terminal a bar advances once per
    part of each checkpoint (greedy, sampled pass@1, the MTP drafter) and says which one runs; off a terminal
    (`disable=None`) tqdm hides it."""
    import io

    import tqdm.auto

    from eval_hooks.chain import EvalStage
    from eval_hooks.evaluate import evaluate_checkpoints

    bars, postfixes, disable_args = [], [], []

    class Recorded(tqdm.auto.tqdm):  # the eval's bar; transformers' loading bars pass through
        def __init__(self, *args, **kwargs):
            self.ours = kwargs.get("desc") == "eval"
            if self.ours:
                disable_args.append(kwargs.get("disable"))
                kwargs = {**kwargs, "disable": False, "file": io.StringIO()}
                bars.append(self)
            super().__init__(*args, **kwargs)

        def set_postfix_str(self, s="", refresh=True):
            if self.ours:
                postfixes.append(s)
            super().set_postfix_str(s, refresh)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    f = two_problems(tmp_path)
    cfg = EvalStage(dataset_name=str(f), dataset_split="train", num_problems=2, max_tokens=8, sampled_pass1_k=2,
                    mtp_acceptance=True)
    answers = [["\\boxed{5}", "\\boxed{7}"], ["\\boxed{7}", "\\boxed{5}"]]
    evaluate_checkpoints({"a": str(tiny_model_dir), "b": str(tiny_model_dir)}, cfg, tmp_path / "eval",
                         engine=ScriptedEngine(tok, answers))
    assert disable_args == [None] and len(bars) == 1
    assert bars[0].total == bars[0].n == 6  # 2 checkpoints x 3 parts
    assert postfixes == [f"{name}: {part}" for name in "ab" for part in
                         ("greedy pass@1 on 2 problems", "sampled pass@1 (2 per problem)", "MTP drafter on the answers")]


def _record_engines(monkeypatch, tok) -> tuple[list[str], list[int]]:
    """Replaces the eval's vLLM engine with a scripted one that records the checkpoint each engine was built
    from (`built`) and, per weight sync, how many engines had been built by then (`synced`)."""
    import engines.vllm_engine

    built, synced = [], []

    class Recording(ScriptedEngine):
        def __init__(self, path, max_model_len):
            super().__init__(tok, [["\\boxed{5}"], ["\\boxed{5}"]])
            built.append(Path(path).name)

        def sync_weights(self, weights):
            synced.append(len(built))
            super().sync_weights(weights)

        def close(self):
            pass

    monkeypatch.setattr(engines.vllm_engine, "VLLMColocateEngine", Recording)
    return built, synced


def test_a_checkpoint_with_another_config_gets_an_engine_of_its_own(tiny_model_dir, tmp_path, monkeypatch):
    """The engine loads the first checkpoint and takes the next ones by weight sync, which carries weights only:
    a checkpoint with another routed_scaling_factor was evaluated under the first one's (its answers depended on
    the order of the checkpoints). Same config: one engine, synced."""
    import shutil

    from eval_hooks.chain import EvalStage
    from eval_hooks.evaluate import evaluate_checkpoints

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "routed_scaling_factor": 1.0}))
    same = tmp_path / "same"
    shutil.copytree(tiny_model_dir, same)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    built, synced = _record_engines(monkeypatch, tok)
    cfg = EvalStage(dataset_name=str(two_problems(tmp_path)), dataset_split="train", num_problems=2, max_tokens=8)
    evaluate_checkpoints({"a": str(tiny_model_dir), "b": str(same), "c": str(other)}, cfg, tmp_path / "eval")
    assert built == [Path(tiny_model_dir).name, "other"] and synced == [1]  # b synced into a's engine; c built


def test_a_trained_checkpoint_saved_without_use_cache_is_synced_into_the_engine(tiny_model_dir, tmp_path, monkeypatch):
    """SFT and GRPO save `use_cache: false` (transformers' generate setting, which vLLM does not read): before,
    that difference from the initial checkpoint's config gave each trained checkpoint an engine start of its
    own (20-25 s each on CPU) instead of a weight sync."""
    import shutil

    from eval_hooks.chain import EvalStage
    from eval_hooks.evaluate import evaluate_checkpoints

    trained = tmp_path / "sft"
    shutil.copytree(tiny_model_dir, trained)
    config = json.loads((trained / "config.json").read_text())
    (trained / "config.json").write_text(json.dumps({**config, "use_cache": False}))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    built, synced = _record_engines(monkeypatch, tok)
    cfg = EvalStage(dataset_name=str(two_problems(tmp_path)), dataset_split="train", num_problems=2, max_tokens=8)
    evaluate_checkpoints({"init": str(tiny_model_dir), "sft": str(trained)}, cfg, tmp_path / "eval")
    assert built == [Path(tiny_model_dir).name] and synced == [1]


def test_a_resumed_eval_reuses_each_finished_checkpoint_and_only_its_own(tiny_model_dir, tmp_path):
    """`reuse_finished` (the chain resuming a killed eval stage): a checkpoint whose results file is whole and
    names the same checkpoint directory is not evaluated again; a file cut short, or one written for another
    directory, is redone."""
    from eval_hooks.chain import EvalStage
    from eval_hooks.evaluate import evaluate_checkpoints

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    class Counting(ScriptedEngine):
        calls = 0

        def generate(self, prompt_ids, n, sampling):
            Counting.calls += 1
            return super().generate(prompt_ids, n, sampling)

    f = two_problems(tmp_path)
    cfg = EvalStage(dataset_name=str(f), dataset_split="train", num_problems=2, max_tokens=8)
    engine = Counting(tok, [["\\boxed{5}"], ["\\boxed{7}"]])
    ckpts = {"a": str(tiny_model_dir), "b": str(tiny_model_dir), "c": str(tiny_model_dir)}
    out = tmp_path / "eval"
    first = evaluate_checkpoints(ckpts, cfg, out, engine=engine)
    assert Counting.calls == 3 and sorted(p.name for p in out.iterdir()) == ["a.json", "b.json", "c.json"]
    (out / "b.json").write_text((out / "b.json").read_text()[:40])  # cut short
    other = json.loads((out / "c.json").read_text())
    (out / "c.json").write_text(json.dumps({**other, "checkpoint": str(tmp_path / "elsewhere")}))
    Counting.calls = 0
    again = evaluate_checkpoints(ckpts, cfg, out, engine=engine, reuse_finished=True)
    assert Counting.calls == 2  # b and c
    assert list(again) == ["a", "b", "c"] and again == first
    Counting.calls = 0
    evaluate_checkpoints(ckpts, cfg, out, engine=engine)  # not resuming: everything again
    assert Counting.calls == 3



def test_a_resumed_eval_redoes_results_an_earlier_run_wrote_with_other_settings(tiny_model_dir, tmp_path):
    """The eval stage's settings changed (here 2 problems -> 1), the restarted stage was killed after its
    first checkpoint, and the chain resumed it: before, the second checkpoint's file from the earlier run
    (same checkpoint directory, other settings) was reused, so the report put a 2-problem result beside
    a 1-problem one."""
    from eval_hooks.chain import EvalStage
    from eval_hooks.evaluate import evaluate_checkpoints

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    engine = ScriptedEngine(tok, [["\\boxed{5}"], ["\\boxed{7}"]])
    f = two_problems(tmp_path)
    ckpts = {"a": str(tiny_model_dir), "b": str(tiny_model_dir)}
    out = tmp_path / "eval"
    evaluate_checkpoints(ckpts, EvalStage(dataset_name=str(f), dataset_split="train", num_problems=2, max_tokens=8),
                         out, engine=engine)
    cfg = EvalStage(dataset_name=str(f), dataset_split="train", num_problems=1, max_tokens=8)
    engine.texts = engine.texts[:1]
    evaluate_checkpoints({"a": ckpts["a"]}, cfg, out, engine=engine)  # the restarted stage, killed after a
    again = evaluate_checkpoints(ckpts, cfg, out, engine=engine, reuse_finished=True)
    assert [again[name]["n"] for name in ckpts] == [1, 1]
    assert json.loads((out / "b.json").read_text())["n"] == 1


def test_every_recipe_validates():
    chains = [p for p in (ROOT / "recipes").glob("*.yaml") if "stages" in p.read_text()]
    assert chains, "no chain recipe found"
    for path in chains:
        configs = validate_chain_recipe(load_chain_recipe(path))
        assert configs, path


def test_chain_recipe_unknown_keys_fail_clearly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages:\n  sft:\n    learning_rat: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"stages.sft.*unknown key 'learning_rat'.*learning_rate"):
        validate_chain_recipe(load_chain_recipe(bad))
    bad.write_text("name: x\nstages:\n  finetune: {}\n")
    with pytest.raises(ConfigError, match="unknown stage"):
        load_chain_recipe(bad)
    for stages, message in (("{}", "no stages"), ("{sft: 5}", "stages.sft must be a mapping of settings, got 5"),
                            ("{sft: [a, b]}", "stages.sft must be a mapping")):
        bad.write_text(f"name: x\nstages: {stages}\n")
        with pytest.raises(ConfigError, match=message):
            load_chain_recipe(bad)
    bad.write_text("name: x\nstages:\n  init: {preset: tinyy}\n")  # caught before any stage runs
    with pytest.raises(ConfigError, match=r"stages.init.*unknown preset 'tinyy'"):
        validate_chain_recipe(load_chain_recipe(bad))


def test_a_broken_run_manifest_is_named_not_a_traceback(tmp_path):
    from eval_hooks.chain import Manifest
    from posttrain.errors import UserError

    path = tmp_path / "manifest.json"
    for text in ("{not json", "[]", '{"stages": 3}'):
        path.write_text(text)
        with pytest.raises(UserError, match=f"{path}: not a"):
            Manifest(path)


def test_chain_seed_seeds_every_stage_unless_the_stage_sets_one(tmp_path):
    path = tmp_path / "seeded.yaml"
    path.write_text("name: s\nseed: 7\nstages:\n  init: {}\n  distill: {}\n  sft: {seed: 1}\n  grpo: {}\n  eval: {}\n")
    configs = validate_chain_recipe(load_chain_recipe(path))
    assert [configs[s].seed for s in ("init", "distill", "sft", "grpo")] == [7, 7, 1, 7]
    path.write_text("name: s\nseed: one\nstages:\n  init: {}\n")
    with pytest.raises(ConfigError, match="'seed' must be an integer"):
        load_chain_recipe(path)


def test_eval_callback_logs_every_n_steps(tiny_model_dir):
    from types import SimpleNamespace

    from eval_hooks.callback import EvalCallback

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [["\\boxed{5}"], ["\\boxed{4}"]]
    prompts = [[{"role": "user", "content": "2+3"}], [{"role": "user", "content": "1+1"}]]
    callbacks = []
    trainer = SimpleNamespace(processing_class=tok, state=SimpleNamespace(global_step=0, log_history=[]),
                              add_callback=callbacks.append)
    cb = EvalCallback(prompts, ["5", "2"], every_n_steps=2, engine=ScriptedEngine(tok, texts)).attach(trainer)
    assert callbacks == [cb]
    for step in (1, 2, 3, 4):
        trainer.state.global_step = step
        cb.on_step_end(None, trainer.state, None)
    assert [h["step"] for h in trainer.state.log_history] == [2, 4]
    assert trainer.state.log_history[0]["eval/accuracy"] == pytest.approx(0.5)


def test_problem_groups_name_the_fact_each_builtin_problem_asks(tmp_path):
    """The built-in task's held-out problems are other wordings of a few facts: the eval writes each
    problem's fact so that the report's intervals count facts, not wordings. A set with no such
    column has no groups (each problem stands alone)."""
    from eval_hooks.benchmarks import load_benchmark_with_groups

    task = "builtin:arith?level=digits&max_operand=4&n_test=60"
    prompts, answers, groups = load_benchmark_with_groups(task, "test", 60)
    assert (prompts, answers) == load_benchmark(task, "test", 60)
    assert len(groups) == len(prompts) == 60 and len(set(groups)) <= 21
    assert all(any(op in g for op in "+-") for g in groups)  # the expression, e.g. "3 + 1"
    f = tmp_path / "plain.jsonl"
    f.write_text(json.dumps({"problem": "p", "answer": "1"}) + "\n")
    assert load_benchmark_with_groups(str(f), "train")[2] is None


def test_a_stage_run_with_only_on_an_outdated_upstream_is_rerun_once_the_upstream_is(tmp_path, monkeypatch):
    """`run --only eval` after SFT's settings changed evaluates the SFT checkpoint still on disk; the next
    full run retrains SFT and must then evaluate again. Before, eval's hash was built on SFT's new settings
    although it had evaluated the old checkpoint, so the full run skipped eval as done and the report
    showed the old SFT model's accuracy as the new one's."""
    import yaml

    from eval_hooks import chain

    ran: list[str] = []

    def runner(stage):
        def run(cfg, recipe, out, resuming):
            ran.append(stage)
            return out / stage, {}
        return run

    monkeypatch.setattr(chain, "STAGE_RUNNERS", {s: runner(s) for s in chain.STAGES})
    monkeypatch.setattr("eval_hooks.report.write_report", lambda out, manifest: {})
    recipe = {"name": "only", "stages": {"sft": {"learning_rate": 1e-3, "model_name_or_path": str(tmp_path)},
                                         "eval": {}}}
    path, out = tmp_path / "only.yaml", str(tmp_path / "run")
    path.write_text(yaml.safe_dump(recipe))
    chain.run_chain(path, out)
    assert ran == ["sft", "eval"]
    recipe["stages"]["sft"]["learning_rate"] = 1e-4
    path.write_text(yaml.safe_dump(recipe))
    ran.clear()
    chain.run_chain(path, out, only=["eval"])  # SFT's directory still holds the lr 1e-3 model
    ran.clear()
    chain.run_chain(path, out)
    assert ran == ["sft", "eval"]


@pytest.mark.parametrize("first", ["sft", "grpo"])
def test_a_chain_without_init_evaluates_the_model_its_first_training_stage_started_from(first, tmp_path, monkeypatch):
    """A recipe with no init stage whose SFT (or GRPO) starts from a given checkpoint: before, the eval stage
    evaluated `<run>/model-init` as the starting model, which no stage had written, and failed with a
    traceback (transformers took the path for a Hub id) after training had finished."""
    from eval_hooks import chain

    evaluated = {}

    def evaluate(checkpoints, cfg, out_dir, reuse_finished=False):
        evaluated.update(checkpoints)
        return {name: {"accuracy": 0.0, "n": 1} for name in checkpoints}

    monkeypatch.setattr("eval_hooks.evaluate.evaluate_checkpoints", evaluate)
    base = tmp_path / "base"
    path = tmp_path / "noinit.yaml"
    path.write_text(f"name: noinit\nstages:\n  {first}:\n    model_name_or_path: {base}\n  eval: {{}}\n")
    recipe = load_chain_recipe(path, str(tmp_path / "run"))
    configs = validate_chain_recipe(recipe)
    for checkpoint in (base, tmp_path / "run" / first):
        checkpoint.mkdir(parents=True)
        (checkpoint / "config.json").write_text("{}")
    chain._run_eval(configs["eval"], recipe, recipe.output_dir, False)
    assert evaluated == {"init": str(base), first: str(tmp_path / "run" / first)}


def test_the_report_leaves_out_a_stage_the_recipe_no_longer_has(tmp_path, monkeypatch):
    """The eval stage was taken out of the recipe and SFT retrained: before, the report still printed the
    eval the manifest kept from the earlier run as the measured accuracy of the (new) SFT checkpoint."""
    import yaml

    from eval_hooks import chain

    def runner(stage):
        def run(cfg, recipe, out, resuming):
            return out / stage, ({"init": {"accuracy": 0.25, "n": 4}, "sft": {"accuracy": 0.5, "n": 4}}
                                 if stage == "eval" else {})
        return run

    monkeypatch.setattr(chain, "STAGE_RUNNERS", {s: runner(s) for s in chain.STAGES})
    recipe = {"name": "gone", "stages": {"sft": {"learning_rate": 1e-3, "model_name_or_path": str(tmp_path)},
                                         "eval": {}}}
    path, out = tmp_path / "gone.yaml", tmp_path / "run"
    path.write_text(yaml.safe_dump(recipe))
    assert set(chain.run_chain(path, str(out))["results"]) == {"init", "sft"}
    del recipe["stages"]["eval"]
    recipe["stages"]["sft"]["learning_rate"] = 1e-4
    path.write_text(yaml.safe_dump(recipe))
    assert chain.run_chain(path, str(out))["results"] == {}
    assert "0.500" not in (out / "report.md").read_text()
    assert json.loads((out / "manifest.json").read_text())["stages"]["eval"]["status"] == "done"  # kept there


def test_prompts_that_are_no_chat_or_empty_are_refused_with_their_line(tmp_path):
    """A prompt of unknown-role messages without content, or an empty one, was scored (GRPO refuses both)."""
    for prompt, message in (([{"role": "bot", "text": "x"}], "prompt message 0 is not a"),
                            ([{"role": "bot", "content": "x"}], "prompt message 0 has unknown role 'bot'"),
                            ("  ", "prompt is empty"), ([], "prompt is an empty message list")):
        with pytest.raises(UserError, match=rf"set row 2: {re.escape(message)}.*\(column 'prompt'\)"):
            adapt_row({"prompt": prompt, "answer": "2"}, 2, "set")
    with pytest.raises(UserError, match=r"set row 0: prompt is empty \(column 'problem'\)"):
        adapt_row({"problem": "", "answer": "2"}, 0, "set")
    f = tmp_path / "e.jsonl"
    good = {"prompt": [{"role": "user", "content": "What is 1+1?"}], "answer": "2"}
    f.write_text("".join(json.dumps(r) + "\n" for r in [good, good, {"prompt": [{"role": "bot", "text": "x"}],
                                                                     "answer": "2"}]))
    with pytest.raises(UserError, match=r"e\.jsonl line 3: prompt message 0 is not a"):
        load_benchmark(str(f), "train")
    # Arrow's null keys of the other rows' messages are not passed on to the chat template
    assert load_benchmark(str(f), "train", limit=2)[0] == [good["prompt"]] * 2
