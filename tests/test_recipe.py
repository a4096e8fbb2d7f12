"""Recipes and config errors: unknown key, wrong type, missing file -> clear message, non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from posttrain.errors import ConfigError
from posttrain.recipe import load_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, str(ROOT / "cli.py")]


@dataclass
class ToyConfig:
    model_name_or_path: str = field(default="tiny", metadata={"help": "model"})
    learning_rate: float = field(default=1e-5, metadata={"help": "lr"})
    max_steps: int = field(default=-1, metadata={"help": "steps"})
    bf16: bool = field(default=False, metadata={"help": "bf16"})
    reward_funcs: list[str] = field(default_factory=lambda: ["math_accuracy"], metadata={"help": "rewards"})
    beta: float | None = field(default=None, metadata={"help": "kl"})


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 3.0e-5\nmax_steps: 10\nreward_funcs: [a, b]\n")
    cfg = load_config(ToyConfig, recipe, ["--max_steps", "20", "--bf16", "--beta=0.04", "--learning_rate", "1e-6"])
    assert cfg.max_steps == 20 and cfg.bf16 is True and cfg.beta == 0.04
    assert cfg.learning_rate == 1e-6 and cfg.reward_funcs == ["a", "b"]
    assert load_config(ToyConfig, None, ["--reward_funcs", "x,y", "--beta", "none"]).reward_funcs == ["x", "y"]


def test_a_list_field_takes_space_separated_values_as_trl_parser_does(tmp_path):
    """`--reward_funcs a b` was refused ("unexpected argument 'b'"); TRL's HfArgumentParser reads it as a list."""
    cfg = load_config(ToyConfig, None, ["--reward_funcs", "a", "b", "--max_steps", "3"])
    assert cfg.reward_funcs == ["a", "b"] and cfg.max_steps == 3
    with pytest.raises(ConfigError, match=r"'max_steps' expects int, got \['3', '4'\]"):
        load_config(ToyConfig, None, ["--max_steps", "3", "4"])


def test_unknown_key_names_closest(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rat: 1e-5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat'.*did you mean learning_rate"):
        load_config(ToyConfig, recipe)
    with pytest.raises(ConfigError, match="max_step.*did you mean max_steps"):
        load_config(ToyConfig, None, ["--max_step", "3"])


def test_wrong_type_names_field_and_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'max_steps' expects int, got 'ten'"):
        load_config(ToyConfig, None, ["--max_steps", "ten"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"'learning_rate' expects float"):
        load_config(ToyConfig, recipe)
    with pytest.raises(ConfigError, match=r"'bf16' expects bool"):
        load_config(ToyConfig, None, ["--bf16", "maybe"])


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found: .*nope.yaml"):
        load_config(ToyConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*line \d+.*invalid YAML"):
        load_config(ToyConfig, bad)


def _cli(*args, cwd=None):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_a_key_given_twice_is_refused_and_a_directory_is_not_missing(tmp_path):
    """PyYAML keeps the last of two equal keys without a word: a recipe with `max_steps: 3` and, appended
    later, `max_steps: 1` ran 1 step. YAML merge keys may still override what they merge in."""
    from posttrain.recipe import read_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_steps: 3\nlearning_rate: 1.0\nmax_steps: 1\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: line 3: key 'max_steps' is given twice \(first at line 1\)"):
        load_config(ToyConfig, recipe)
    recipe.write_text("stages:\n  sft: {max_steps: 3, max_steps: 4}\n")
    with pytest.raises(ConfigError, match=r"line 2: key 'max_steps' is given twice"):
        read_recipe(recipe)
    recipe.write_text("base: &b {max_steps: 3, seed: 1}\nrun:\n  <<: *b\n  max_steps: 4\n'1': a\n1: b\n")
    assert read_recipe(recipe)["run"] == {"max_steps": 4, "seed": 1}
    with pytest.raises(ConfigError, match=r"recipe \S+ is a directory, not a YAML file"):
        read_recipe(tmp_path)


def test_cli_help_lists_every_subcommand():
    r = _cli("--help")
    assert r.returncode == 0
    for name in ("init-model", "sft", "grpo", "distill", "rm", "eval", "run", "rewards", "convert", "plan"):
        assert f"\n  {name} " in r.stdout, name


def test_cli_config_errors_exit_nonzero_without_traceback(tmp_path):
    r = _cli("distill", "--recipe", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "recipe file not found" in r.stderr and "Traceback" not in r.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_generationz: 4\n")
    r = _cli("distill", "--recipe", str(recipe))
    assert r.returncode == 2 and "unknown key 'num_generationz'" in r.stderr and "num_generations" in r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("distill", "--num_generations", "four")
    assert r.returncode == 2 and "'num_generations' expects int" in r.stderr and "Traceback" not in r.stderr


def test_unknown_subcommand_fails_loudly():
    r = _cli("frobnicate")
    assert r.returncode == 2 and "unknown command" in r.stderr


def test_v3_fields_are_declared_once_and_mtp_weight_is_checked_the_same_way():
    import dataclasses

    from posttrain.errors import ConfigError
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.sft.config import SFTRecipeConfig
    from posttrain.trainer_args import V3TrainingFields

    shared = {f.name for f in dataclasses.fields(V3TrainingFields)}
    assert {"fp8", "fp8_backward", "fp8_bf16_moments", "bias_update_speed", "mtp_detach_input"} <= shared
    for cls in (SFTRecipeConfig, GRPORecipeConfig):
        assert issubclass(cls, V3TrainingFields)
        assert not shared & set(vars(cls).get("__annotations__", {})), f"{cls.__name__} redeclares a shared field"
    for cls, section in ((SFTRecipeConfig, "sft"), (GRPORecipeConfig, "grpo")):
        with pytest.raises(ConfigError, match=r"^mtp_loss_weight must be a number >= 0"):
            load_config(cls, None, ["--output_dir", "/tmp/x", "--mtp_loss_weight", "-1"], section=section)
    assert load_config(GRPORecipeConfig, None, ["--output_dir", "/tmp/x", "--mtp_loss_weight", "auto"],
                       section="grpo").mtp_loss_weight == "auto"


@dataclass
class KwargsConfig:
    lr_scheduler_kwargs: dict | str | None = field(default=None, metadata={"help": "scheduler kwargs"})
    fsdp_config: dict | str | None = field(default=None, metadata={"help": "a mapping or a JSON file"})


def test_kwargs_fields_take_a_mapping_not_any_string(tmp_path):
    """`dict | str` fields: a `*_kwargs` string that is no mapping used to be kept as a str and fail as
    `**kwargs` in the run; a malformed `{...}` was kept as a str too (transformers then json.loads it)."""
    with pytest.raises(ConfigError, match=r"'lr_scheduler_kwargs' expects a mapping.*got 'min_lr=1'"):
        load_config(KwargsConfig, None, ["--lr_scheduler_kwargs", "min_lr=1"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr_scheduler_kwargs: min_lr=1\n")
    with pytest.raises(ConfigError, match=r"'lr_scheduler_kwargs' expects a mapping"):
        load_config(KwargsConfig, recipe)
    with pytest.raises(ConfigError, match=r"'lr_scheduler_kwargs' expects dict"):
        load_config(KwargsConfig, None, ["--lr_scheduler_kwargs", "{min_lr: "])
    assert load_config(KwargsConfig, None, ["--lr_scheduler_kwargs", '{"min_lr": 1e-6}']).lr_scheduler_kwargs == {
        "min_lr": 1e-6}
    assert load_config(KwargsConfig, None, ["--lr_scheduler_kwargs", "{min_lr: 1.0e-6}"]).lr_scheduler_kwargs == {
        "min_lr": 1e-6}
    assert load_config(KwargsConfig, None, ["--lr_scheduler_kwargs", "none"]).lr_scheduler_kwargs is None
    # a config field whose string form is a file path keeps it
    assert load_config(KwargsConfig, None, ["--fsdp_config", "fsdp.json"]).fsdp_config == "fsdp.json"
    with pytest.raises(ConfigError, match=r"'fsdp_config' expects dict"):
        load_config(KwargsConfig, None, ["--fsdp_config", "{bad: [1"])


@dataclass
class DividingConfig:
    batch: int = field(default=8, metadata={"help": "batch"})
    groups: int = field(default=4, metadata={"help": "divides batch"})

    def __post_init__(self):
        self.steps = self.batch % self.groups  # as TRL's GRPOConfig does with num_generations


def test_arithmetic_errors_of_a_config_are_config_errors():
    with pytest.raises(ConfigError, match=r"command line: invalid DividingConfig: .*modulo by zero"):
        load_config(DividingConfig, None, ["--groups", "0"])


@pytest.mark.parametrize("command", ["sft", "grpo", "rm"])
def test_resume_from_checkpoint_takes_true_last_false_or_a_path(command, tmp_path):
    """A YAML `true` or a bare `--resume_from_checkpoint` flag used to be rejected ("expects str or
    null, got True"), though posttrain.checkpoints.resolve_resume reads true as the newest checkpoint."""
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.recipe import describe_fields
    from posttrain.rm.config import RMRecipeConfig
    from posttrain.sft.config import SFTRecipeConfig

    cls = {"sft": SFTRecipeConfig, "grpo": GRPORecipeConfig, "rm": RMRecipeConfig}[command]
    out = ["--output_dir", str(tmp_path / "out")]
    recipe = tmp_path / "r.yaml"
    for yaml_value, expected in (("true", "last"), ("false", None), ("null", None), ("last", "last"),
                                 ("runs/x/checkpoint-5", "runs/x/checkpoint-5")):
        recipe.write_text(f"resume_from_checkpoint: {yaml_value}\n")
        assert load_config(cls, recipe, out).resume_from_checkpoint == expected, yaml_value
    assert load_config(cls, None, [*out, "--resume_from_checkpoint"]).resume_from_checkpoint == "last"
    assert load_config(cls, None, ["--resume_from_checkpoint", *out]).resume_from_checkpoint == "last"
    assert load_config(cls, None, [*out, "--resume_from_checkpoint", "false"]).resume_from_checkpoint is None
    recipe.write_text("resume_from_checkpoint: 3\n")
    with pytest.raises(ConfigError, match="'resume_from_checkpoint' expects true, false, last or a checkpoint"):
        load_config(cls, recipe, out)
    if command != "rm":  # posttrain/rm/config.py keeps transformers' help
        entry = describe_fields(cls).split("--resume_from_checkpoint ")[1].split("\n  --")[0]
        assert "true / last resumes from the newest complete checkpoint-N in output_dir" in entry
        assert "Not directly used by Trainer" not in entry
