"""GRPO recipe checks that need no model or engine: bad values are a ConfigError naming the field,
raised when the recipe is read, and bad prompt rows name their file line."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from trl import GRPOConfig

from posttrain.errors import ConfigError, UserError
from posttrain.grpo.config import TRL_LOSS_TYPES, GRPORecipeConfig
from posttrain.recipe import load_config


def _load(tmp_path, *argv):
    return load_config(GRPORecipeConfig, None, ["--output_dir", str(tmp_path / "grpo"), *argv], section="grpo")


@pytest.mark.parametrize("argv, message", [
    # zipped with the functions, a short list silently dropped `format`; a long one failed in TRL after loading
    (["--reward_funcs", "math_accuracy,format", "--reward_weights", "1.0"],
     "reward_weights has 1 weight(s) [1.0] for 2 reward_funcs ['math_accuracy', 'format']"),
    (["--reward_funcs", "math_accuracy", "--reward_weights", "1.0,0.5"],
     "reward_weights has 2 weight(s) [1.0, 0.5] for 1 reward_funcs ['math_accuracy']"),
    (["--max_prompts", "0"], "max_prompts must be >= 1 (or unset: all prompts), got 0"),  # trained 0 steps, exit 0
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be an integer >= 1, got 0"),
    (["--learning_rate", "-1"], "learning_rate must be a number >= 0, got -1.0"),
    (["--loss_type", "grpoo"], "loss_type must be one of grpo, "),  # failed inside the first loss computation
    (["--num_generations", "0"], "num_generations must be >= 2"),  # ZeroDivisionError inside TRL's __post_init__
    (["--num_generations", "1"], "num_generations must be >= 2"),
    (["--temperature", "0"], "temperature must be > 0, got 0"),  # ZeroDivisionError in TRL's first log-probs
    (["--max_completion_length", "0"], "max_completion_length must be >= 1, got 0"),  # failed in generation
    (["--max_steps", "-1", "--num_train_epochs", "0"], "num_train_epochs must be > 0 when max_steps is -1"),
    (["--lr_scheduler_kwargs", "min_lr=1"], "'lr_scheduler_kwargs' expects a mapping"),
    # TRL's sampling options that the rollout engines do not take: they were dropped silently
    (["--repetition_penalty", "1.1"], "repetition_penalty=1.1 is not applied by the rollout engines"),
    (["--min_p", "0.05"], "min_p=0.05 is not applied by the rollout engines"),
    # TRL's engine set-up options: this GRPO builds its own engines (run.build_engine), so they were dropped too
    (["--vllm_enable_sleep_mode", "true"], "vllm_enable_sleep_mode=True is not applied by the rollout engines"),
    (["--vllm_model_impl", "transformers"], "vllm_model_impl='transformers' is not applied by the rollout engines"),
    (["--use_vllm", "false", "--cache_implementation", "static"],
     "cache_implementation='static' is not applied by the rollout engines"),
    (["--use_vllm", "false", "--use_transformers_continuous_batching", "true"],
     "use_transformers_continuous_batching=True is not applied by the rollout engines"),
])
def test_bad_values_are_config_errors_naming_the_field(argv, message, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _load(tmp_path, *argv)


def test_good_values_still_pass(tmp_path):
    cfg = _load(tmp_path, "--reward_funcs", "math_accuracy,format", "--reward_weights", "1.0,0.2",
                "--max_prompts", "1", "--loss_type", "dr_grpo", "--num_generations", "2",
                "--per_device_train_batch_size", "2")
    assert cfg.reward_weights == [1.0, 0.2] and cfg.max_prompts == 1 and cfg.loss_type == "dr_grpo"
    assert _load(tmp_path).reward_weights is None  # unset: 1.0 each, filled in by build_trainer


def test_loss_types_are_the_ones_trl_documents():
    help_text = next(f.metadata["help"] for f in dataclasses.fields(GRPOConfig) if f.name == "loss_type")
    documented = re.search(r"Supported values are (.*?)\.\s", help_text).group(1)
    assert sorted(re.findall(r"'([a-z_]+)'", documented)) == sorted(TRL_LOSS_TYPES)  # a TRL upgrade shows up here
    assert GRPOConfig.loss_type in TRL_LOSS_TYPES and GRPORecipeConfig.loss_type in TRL_LOSS_TYPES


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prompts_cfg(tmp_path, data, **kw):
    return GRPORecipeConfig(output_dir=str(tmp_path / "grpo"), dataset_name=data, **kw)


def test_null_or_missing_answers_name_the_file_line(tmp_path):
    """With math_accuracy a null (or, in JSONL, missing) answer used to train with reward None."""
    from posttrain.grpo.run import load_prompts

    ok = {"prompt": [{"role": "user", "content": "1 + 1?"}], "answer": "2"}
    data = _write(tmp_path / "p.jsonl", [ok, ok, {**ok, "answer": None}])
    with pytest.raises(UserError, match=r"p\.jsonl line 3: answer is null \(column 'answer'\); math_accuracy needs"):
        load_prompts(_prompts_cfg(tmp_path, data))
    data = _write(tmp_path / "q.jsonl", [ok, {"prompt": ok["prompt"]}])
    with pytest.raises(UserError, match=r"q\.jsonl line 2: answer is null"):
        load_prompts(_prompts_cfg(tmp_path, data))
    with pytest.raises(UserError, match=r"q\.jsonl line 2: answer is null"):  # with options, the same reward
        load_prompts(_prompts_cfg(tmp_path, data, reward_funcs=["math_accuracy(timeout_s=10)"]))
    # rows past max_prompts are not trained on, and a reward that needs no answer does not ask for one
    assert len(load_prompts(_prompts_cfg(tmp_path, data, max_prompts=1))) == 1
    assert len(load_prompts(_prompts_cfg(tmp_path, data, reward_funcs=["format"]))) == 2
    # math and code rows in one set: a row without an answer is another reward's (math_accuracy: None)
    assert len(load_prompts(_prompts_cfg(tmp_path, data, reward_funcs=["math_accuracy", "code_tests"]))) == 2


def test_prompt_errors_name_the_file_line_as_sft_does(tmp_path):
    from posttrain.grpo.run import load_prompts

    ok = {"prompt": [{"role": "user", "content": "1 + 1?"}], "answer": "2"}
    data = _write(tmp_path / "p.jsonl", [ok, ok, {**ok, "prompt": None}])  # used to say "row 2"
    with pytest.raises(UserError, match=r"p\.jsonl line 3: prompt is null \(column 'prompt'\)"):
        load_prompts(_prompts_cfg(tmp_path, data))


def test_named_columns_reach_the_rewards_under_their_own_names_and_as_prompt_and_answer(tmp_path):
    """TRL passes every column to the rewards under its own name. prompt_column / answer_column used to
    rename theirs away (a reward reading `solution` failed), TRL's `solution` column was refused for want of
    `answer`, math_accuracy(gold_column=...) could not be satisfied, and a dataset holding both names
    stopped in a datasets traceback."""
    from posttrain.grpo.run import load_prompts

    q = [{"role": "user", "content": "1 + 1?"}]
    data = _write(tmp_path / "sol.jsonl", [{"question": q, "solution": "2", "level": 1}] * 2)
    ds = load_prompts(_prompts_cfg(tmp_path, data, prompt_column="question", answer_column="solution"))
    assert {"question", "solution", "level", "prompt", "answer"} <= set(ds.column_names)
    assert ds[0]["prompt"] == ds[0]["question"] == q and ds[0]["answer"] == ds[0]["solution"] == "2"
    ds = load_prompts(_prompts_cfg(tmp_path, data, prompt_column="question"))  # TRL's name, answer_column left as is
    assert ds[0]["answer"] == ds[0]["solution"] == "2"

    data = _write(tmp_path / "gold.jsonl", [{"prompt": q, "gold": "2", "answer": "two, written out"},
                                             {"prompt": q, "gold": None, "answer": "?"}])
    gold_reward = ["math_accuracy(gold_column='gold')"]
    with pytest.raises(UserError, match=r"gold\.jsonl line 2: answer is null \(column 'gold'\)"):
        load_prompts(_prompts_cfg(tmp_path, data, reward_funcs=gold_reward))
    assert load_prompts(_prompts_cfg(tmp_path, data, reward_funcs=gold_reward, max_prompts=1))[0]["gold"] == "2"
    from data_pipelines.errors import DataError

    with pytest.raises(DataError, match=r"missing column 'gold'"):
        load_prompts(_prompts_cfg(tmp_path, _write(tmp_path / "p.jsonl", [{"prompt": q, "answer": "2"}]),
                                  reward_funcs=gold_reward))
    with pytest.raises(UserError, match=r"answer_column is 'gold', but the dataset also has a column 'answer'"):
        load_prompts(_prompts_cfg(tmp_path, data, answer_column="gold", max_prompts=1))
    both = _write(tmp_path / "both.jsonl", [{"prompt": q, "question": q, "answer": "2"}])
    with pytest.raises(UserError, match=r"prompt_column is 'question', but the dataset also has a column 'prompt'"):
        load_prompts(_prompts_cfg(tmp_path, both, prompt_column="question"))


@pytest.mark.parametrize("given, expected", [("group", "group"), ("batch", "batch"), ("none", "none"),
                                             ("true", "group"), ("False", "none"), (True, "group"), (False, "none")])
def test_scale_rewards_takes_what_trl_documents(tmp_path, given, expected):
    """TRL documents true / false for scale_rewards but maps only Python bools: "false" from the command
    line reached the first step and stopped there, and a recipe's `false` was refused as not a str."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'o'}\nscale_rewards: {json.dumps(given)}\n")
    assert load_config(GRPORecipeConfig, recipe).scale_rewards == expected
    assert load_config(GRPORecipeConfig, None, {"output_dir": str(tmp_path / "o"),
                                                 "scale_rewards": str(given)}).scale_rewards == expected


@pytest.mark.parametrize("field, value, message", [
    ("scale_rewards", "groups", "'scale_rewards' expects group, batch or none"),
    ("multi_objective_aggregation", "sum", "multi_objective_aggregation must be sum_then_normalize or"),
    ("reward_timeout_s", "0", "reward_timeout_s must be > 0 seconds"),
    ("reward_timeout_s", "-1", "reward_timeout_s must be > 0 seconds"),
])
def test_reward_settings_trl_checks_late_are_refused_before_anything_loads(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(GRPORecipeConfig, None, {"output_dir": str(tmp_path / "o"), field: value})


def _readme_blocks(path, section: str) -> dict[str, list[str]]:
    """The fenced code blocks of one `## section` of a README, by language."""
    text = path.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks: dict[str, list[str]] = {}
    for lang, code in re.findall(r"```(\w+)\n(.*?)```", body, flags=re.S):
        blocks.setdefault(lang, []).append(code)
    return blocks


def test_readme_custom_reward_example_runs(tmp_path, monkeypatch):
    """README's "Plug in your own reward", as a user copies it: the python block saved as my_rewards.py, the
    YAML block in a GRPO recipe, run from the directory that holds the file; and rewards/README.md's file
    reward with score_rewards."""
    import rewards

    root = Path(__file__).resolve().parents[1]
    blocks = _readme_blocks(root / "README.md", "Plug in your own reward")
    (tmp_path / "my_rewards.py").write_text(blocks["python"][0])
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "grpo.yaml"
    recipe.write_text(blocks["yaml"][0])
    cfg = load_config(GRPORecipeConfig, recipe, ["--output_dir", str(tmp_path / "grpo")], section="grpo")
    prompts = ["What is 2 + 3?", "What is 4 + 4?"]
    completions = [r"<think>2 + 3 = 5</think> \boxed{5}", r"<think>4 + 4 = 9</think> \boxed{9}"]
    res = rewards.score_rewards(list(zip(cfg.reward_funcs, cfg.reward_weights)), prompts, completions,
                                columns={"answer": ["5", "8"]})
    custom = res.names[1]
    assert res.values["math_accuracy"] == [1.0, 0.0]
    assert res.values[custom] == pytest.approx([1.0 - 0.001 * len(completions[0]), -0.001 * len(completions[1])])

    blocks = _readme_blocks(root / "rewards" / "README.md", "Plugging in a custom reward")
    (tmp_path / "path" / "to").mkdir(parents=True)
    (tmp_path / "path" / "to" / "my_rewards.py").write_text(blocks["python"][0])
    spec = re.search(r'"(path/to/my_rewards\.py:\w+)"', blocks["python"][1]).group(1)
    res = rewards.score_rewards([(spec, 0.1)], prompts, ["short", "x" * 300])
    assert res.total == pytest.approx([0.1, 0.0])


def test_a_misspelt_reward_is_named_before_the_policy_is_loaded(tmp_path, tiny_model_dir):
    """The reward names resolved only after the policy checkpoint was loaded: minutes at real scale before
    the typo was reported. Here the checkpoint has no weights at all, so loading it would fail first."""
    import shutil

    from rewards import RewardError

    from posttrain.grpo.run import build_trainer

    empty = tmp_path / "config-only"
    empty.mkdir()
    shutil.copy(tiny_model_dir / "config.json", empty / "config.json")
    cfg = _prompts_cfg(tmp_path, "builtin:arith", model_name_or_path=str(empty), reward_funcs=["math_acuracy"],
                       max_prompts=4)
    with pytest.raises(RewardError, match="unknown reward 'math_acuracy'"):
        build_trainer(cfg)


def test_every_used_prompt_is_checked_not_the_first_ten_thousand(tmp_path):
    from posttrain.grpo.run import load_prompts

    ok = {"prompt": [{"role": "user", "content": "1 + 1?"}], "answer": "2"}
    rows = [ok] * 10_001 + [{**ok, "prompt": [{"role": "user", "content": "  "}]}]
    data = _write(tmp_path / "p.jsonl", rows)
    with pytest.raises(UserError, match=r"p\.jsonl line 10002: prompt has no non-empty user message"):
        load_prompts(_prompts_cfg(tmp_path, data))
    assert len(load_prompts(_prompts_cfg(tmp_path, data, max_prompts=10_001))) == 10_001  # rows past it unused
