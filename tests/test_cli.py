"""The command line's bad inputs (issue 14, item 7): each ends in one line on stderr,
`dsv3-posttrain CMD: error: ...`, exit status 2 and no traceback; `--report_to none` is TRL's
spelling of "no reporting"; the process-group teardown never adds a second error; distill's
summary and `eval --help` say what they should."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import cli
from posttrain.errors import ConfigError
from posttrain.recipe import load_config, require_model_dir
from posttrain.trainer_args import normalize_report_to
from subprocess_env import repo_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"dsv3-posttrain {command}: error: "), lines[0]
    return lines[0]


# --- --report_to none ----------------------------------------------------------------------------
def _config_classes():
    from posttrain.grpo.config import GRPORecipeConfig
    from posttrain.rm.config import RMRecipeConfig
    from posttrain.sft.config import SFTRecipeConfig

    return {"sft": SFTRecipeConfig, "grpo": GRPORecipeConfig, "rm": RMRecipeConfig}


@pytest.mark.parametrize("command", ["sft", "grpo", "rm"])
def test_report_to_none_means_no_reporting_for_every_trainer(command, tmp_path):
    cls = _config_classes()[command]
    out = ["--output_dir", str(tmp_path)]
    for spelling in ("none", "None", "null", "[]", "[none]"):
        cfg = load_config(cls, None, ["--report_to", spelling, *out])
        assert cfg.report_to == [], spelling  # transformers' own reading of "none"
    for yaml_value in ("none", "null", "[]", "[none]"):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"report_to: {yaml_value}\n")
        assert load_config(cls, recipe, out).report_to == [], yaml_value
    cfg = load_config(cls, None, ["--report_to", "tensorboard,none", *out])
    assert cfg.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="unknown integration 'wandbb'; did you mean wandb"):
        load_config(cls, None, ["--report_to", "wandbb", *out])


def test_report_to_spellings():
    for none in (None, "none", " NONE ", "", [], ["none"], [None]):
        assert normalize_report_to(none) == "none", none
    assert normalize_report_to("all") == "all"
    assert normalize_report_to("wandb") == ["wandb"]
    assert normalize_report_to('["wandb", "tensorboard"]') == ["wandb", "tensorboard"]
    with pytest.raises(ConfigError, match="report_to"):
        normalize_report_to(3)


def test_grpo_report_to_none_gets_past_the_config(tmp_path):
    """The whole process, exit path included: the config is accepted and the run stops at the
    (missing) model with one line."""
    missing = tmp_path / "no-model"
    env = repo_env(PYTHONWARNINGS="ignore", DSV3_LOG_LEVEL="ERROR")
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "grpo", "--report_to", "none",
                        "--model_name_or_path", str(missing), "--output_dir", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    line = _one_error_line(r.stderr, "grpo")
    assert line == f"dsv3-posttrain grpo: error: model_name_or_path: no checkpoint directory at {missing}"


# --- a missing model directory -------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["sft", "--model_name_or_path", "{missing}"],
    ["rm", "train", "--model_name_or_path", "{missing}", "--output_dir", "{tmp}/rm"],
    ["eval", "--model_name_or_path", "{missing}"],
])  # grpo: test_grpo_report_to_none_gets_past_the_config
def test_missing_model_directory_is_named(argv, tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    argv = [a.format(missing=missing, tmp=tmp_path) for a in argv]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    line = _one_error_line(capsys.readouterr().err, argv[0])
    assert f"model_name_or_path: no checkpoint directory at {missing}" in line


def test_require_model_dir(tmp_path, monkeypatch):
    require_model_dir(tmp_path)  # a directory
    with pytest.raises(ConfigError, match="model_name_or_path is required \\(e.g. x\\)"):
        require_model_dir(None, required_hint="e.g. x")
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a checkpoint directory"):
        require_model_dir(tmp_path / "weights.bin")
    with pytest.raises(ConfigError, match="no checkpoint directory at /nonexistent"):
        require_model_dir("/nonexistent", allow_hub=True)  # transformers: "Repo id must use alphanumeric chars"
    monkeypatch.chdir(tmp_path)
    require_model_dir("deepseek-ai/DeepSeek-V3", allow_hub=True)  # left to the Hub
    with pytest.raises(ConfigError, match="no checkpoint directory at deepseek-ai/DeepSeek-V3"):
        require_model_dir("deepseek-ai/DeepSeek-V3")  # grpo, eval: local checkpoints only
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint directory at runs/sft-tiny"):
        require_model_dir("runs/sft-tiny", allow_hub=True)  # ./runs exists: a local path that is missing


# --- process-group teardown ----------------------------------------------------------------------
@pytest.fixture
def gloo_group(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group of another test is still alive in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist
    if dist.is_initialized():
        dist.destroy_process_group()


def test_teardown_leaves_no_group_for_vllm_to_trip_over(gloo_group, tmp_path, capsys, monkeypatch):
    """A colocated vLLM engine holds its own groups and destroys them at shutdown (interpreter exit
    at the latest). The CLI's teardown goes through vLLM's, so that shutdown finds nothing left;
    destroying the default group first made it fail with "Invalid process group specified"."""
    dist = gloo_group
    state = types.ModuleType("vllm.distributed.parallel_state")  # vLLM's, as far as teardown goes
    state.tp = dist.new_group([0])

    def destroy_model_parallel():
        if state.tp is not None:
            dist.destroy_process_group(state.tp)
        state.tp = None

    def destroy_distributed_environment():
        if dist.is_initialized():
            dist.destroy_process_group()

    state.destroy_model_parallel = destroy_model_parallel
    state.destroy_distributed_environment = destroy_distributed_environment
    monkeypatch.setitem(sys.modules, "vllm.distributed.parallel_state", state)

    assert cli.main(["eval", "--model_name_or_path", str(tmp_path / "nonexistent")]) == cli.EXIT_USER_ERROR
    _one_error_line(capsys.readouterr().err, "eval")
    assert not dist.is_initialized()
    destroy_model_parallel()  # the engine's shutdown at exit: nothing left to destroy, no error
    destroy_distributed_environment()


def test_teardown_errors_never_add_a_traceback(gloo_group, tmp_path, capsys, monkeypatch):
    dist = gloo_group
    real_destroy = dist.destroy_process_group

    def invalid(*args, **kwargs):
        raise ValueError("Invalid process group specified")

    monkeypatch.setattr(dist, "destroy_process_group", invalid)
    assert cli.main(["eval", "--model_name_or_path", str(tmp_path / "nonexistent")]) == cli.EXIT_USER_ERROR
    _one_error_line(capsys.readouterr().err, "eval")  # after a failure: the run's error only

    assert cli.main(["rewards", "list"]) == 0  # after a success: the status stays, one warning line
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        "dsv3-posttrain: warning: process group teardown failed: Invalid process group specified"]
    monkeypatch.setattr(dist, "destroy_process_group", real_destroy)


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_a_launched_rank_ends_with_its_status_after_the_exit_handlers(world_size, tmp_path):
    """A rank of a launched run leaves through os._exit (no C++ static destruction, which aborted
    ranks at exit), but only after Python's exit handlers: trackers and loggers registered with
    atexit still flush. A single process exits the ordinary way."""
    marker = tmp_path / "atexit-ran"
    script = (
        "import atexit, sys, cli\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('flushed'))\n"
        "sys.argv = ['dsv3-posttrain', 'rewards', 'list']\n"
        "cli.entry()\n"
        "print('unreachable')\n"
    )
    env = repo_env(WORLD_SIZE=world_size)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "unreachable" not in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert marker.read_text() == "flushed"


# --- distill's summary, eval --help --------------------------------------------------------------
def test_distill_summary_prints_kept_and_total(tmp_path, capsys):
    out = tmp_path / "distill"
    argv = ["distill", "--max_prompts", "6", "--num_generations", "2", "--output_dir", str(out), "--disable_tqdm"]
    assert cli.main(argv) == 0
    samples = json.loads((out / "stats.json").read_text())["samples"]
    assert 0 < samples["kept"] <= samples["total"] == 12
    rate = f"{samples['kept'] / samples['total']:.1%}"
    assert f"distill: kept {samples['kept']} of {samples['total']} samples ({rate}) -> {out}" in capsys.readouterr().out
    assert cli.distill_summary({"samples": {"total": 400, "kept": 317}}) == "kept 317 of 400 samples (79.2%)"


def test_eval_help_documents_its_fields(capsys):
    import dataclasses

    from eval_hooks.chain import EvalStage

    assert cli.main(["eval", "--help"]) == 0
    text = capsys.readouterr().out
    for name in ("model_name_or_path", "output_dir"):
        assert f"--{name} " in text
    for f in dataclasses.fields(EvalStage):
        documented = f"--{f.name} " in text
        assert documented == (f.name not in cli.EVAL_CHAIN_ONLY_FIELDS), f.name
        if documented:
            assert f.metadata["help"] in text
