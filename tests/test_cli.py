"""The command line's bad inputs (issue 14, item 7): each ends in one line on stderr,
`dsv3-posttrain CMD: error: ...`, exit status 2 and no traceback; `--report_to none` is TRL's
spelling of "no reporting"; the process-group teardown never adds a second error; distill's
summary and `eval --help` say what they should."""

from __future__ import annotations

import json
import re
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


@pytest.mark.parametrize("command", ["sft", "grpo", "rm"])
def test_a_logger_that_is_not_installed_is_named_before_the_model_loads(command, tmp_path, monkeypatch, capsys):
    """transformers said so only when it built the callback, after the model was loaded. The config itself
    accepts it: a recipe for a cluster validates on a machine without its logger."""
    monkeypatch.setattr("posttrain.trainer_args._installed_integrations", lambda: ["tensorboard"])
    model = _checkpoint(tmp_path / "model")  # config.json only: loading it would fail, later
    options = ["--model_name_or_path", str(model), "--output_dir", str(tmp_path / "out"),
               "--report_to", "tensorboard,wandb", *(["--dataset_name", "rows.jsonl"] if command == "sft" else [])]
    load_config(_config_classes()[command], None, options)
    assert cli.main([command, *(["train"] if command == "rm" else []), *options]) == cli.EXIT_USER_ERROR
    line = _one_error_line(capsys.readouterr().err, command)
    assert "'report_to': wandb is not installed in this environment" in line, line


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
    (tmp_path / "config.json").write_text("{}")
    require_model_dir(tmp_path)  # a directory with a config.json
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty is not a checkpoint directory \\(no config.json in it\\)"):
        require_model_dir(tmp_path / "empty", allow_hub=True)  # was accepted: the tokenizer or vLLM failed later
    with pytest.raises(ConfigError, match="model_name_or_path is required \\(e.g. x\\)"):
        require_model_dir(None, required_hint="e.g. x")
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a checkpoint directory"):
        require_model_dir(tmp_path / "weights.bin")
    with pytest.raises(ConfigError, match="no checkpoint directory at /nonexistent"):
        require_model_dir("/nonexistent", allow_hub=True)  # transformers: "Repo id must use alphanumeric chars"
    monkeypatch.chdir(tmp_path)
    _offline_hub_with(tmp_path / "hub", "deepseek-ai/DeepSeek-V3", monkeypatch)
    require_model_dir("deepseek-ai/DeepSeek-V3", allow_hub=True)  # the Hub's (here: its cache's) model
    with pytest.raises(ConfigError, match="no checkpoint directory at deepseek-ai/DeepSeek-V3"):
        require_model_dir("deepseek-ai/DeepSeek-V3")  # grpo, eval: local checkpoints only
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match="no checkpoint directory at runs/sft-tiny"):
        require_model_dir("runs/sft-tiny", allow_hub=True)  # ./runs exists: a local path that is missing


def _offline_hub_with(cache: Path, repo_id: str, monkeypatch) -> None:
    """An offline Hub whose cache holds `repo_id`'s config.json, as huggingface_hub lays it out."""
    snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "deepseek_v3"}')
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("command", [["sft"], ["rm", "train"]])
def test_a_missing_path_that_reads_as_a_hub_id_is_one_line(command, tmp_path, monkeypatch, capsys):
    """`sft --recipe recipes/sft-tiny.yaml` in a fresh checkout (no ./runs yet): runs/tiny-model has the form of a
    Hub id, so the model check let it through and transformers ended in an OSError traceback after its Hub lookup
    failed. The check now asks the Hub (or its cache) for the id's config.json."""
    monkeypatch.chdir(tmp_path)
    _offline_hub_with(tmp_path / "hub", "org/cached", monkeypatch)
    argv = [*command, "--model_name_or_path", "runs/tiny-model", "--output_dir", str(tmp_path / "out")]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    line = _one_error_line(capsys.readouterr().err, command[0])
    assert re.search(r"error: model_name_or_path: no checkpoint directory at runs/tiny-model, nor a Hub model of "
                     r"that id \(LocalEntryNotFoundError: .+\)$", line), line
    require_model_dir("org/cached", allow_hub=True)  # a Hub id the cache has still passes


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


# --- values that used to pass the config and fail (or quietly do nothing) in the run -------------
@pytest.mark.parametrize("argv, message", [
    (["grpo", "--reward_funcs", "math_accuracy,format", "--reward_weights", "1.0"],
     "reward_weights has 1 weight(s) [1.0] for 2 reward_funcs"),
    (["grpo", "--max_prompts", "0"], "max_prompts must be >= 1"),
    (["grpo", "--num_generations", "0"], "num_generations must be >= 2"),
    (["sft", "--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be an integer >= 1"),
    (["sft", "--lr_scheduler_kwargs", "min_lr=1"], "'lr_scheduler_kwargs' expects a mapping"),
    (["eval", "--model_name_or_path", "{tmp}", "--num_problems", "-1"], "num_problems must be >= 1, got -1"),
])
def test_bad_values_stop_at_the_config_with_one_line(argv, message, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path) for a in argv]
    if argv[0] != "eval":
        argv += ["--output_dir", str(tmp_path / "out"), "--model_name_or_path", str(tmp_path / "no-model")]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    assert message in _one_error_line(capsys.readouterr().err, argv[0])


# --- review of the command line's bad inputs ------------------------------------------------------
def _checkpoint(path: Path) -> Path:
    """A directory require_model_dir accepts (config.json a JSON object); nothing is loaded from it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text('{"model_type": "deepseek_v3"}\n')
    return path


def test_eval_keeps_checkpoints_that_share_a_directory_name(tmp_path, monkeypatch, capsys):
    """`eval A/tiny B/tiny` evaluated only one of them: both were named "tiny" (and `<name>.json`)."""
    import eval_hooks.evaluate

    a, b, c = _checkpoint(tmp_path / "a" / "tiny"), _checkpoint(tmp_path / "b" / "tiny"), _checkpoint(tmp_path / "sft")
    seen = {}
    monkeypatch.setattr(eval_hooks.evaluate, "evaluate_checkpoints", lambda names, cfg, out: seen.update(names))
    argv = ["eval", "--model_name_or_path", str(a), str(b), str(c), "--output_dir", str(tmp_path / "e")]
    assert cli.main(argv) == 0
    assert seen == {"a--tiny": str(a), "b--tiny": str(b), "sft": str(c)}
    monkeypatch.chdir(tmp_path)
    assert cli.checkpoint_names(["a/tiny", "b/tiny/", "./sft"]) == {"a--tiny": "a/tiny", "b--tiny": "b/tiny/",
                                                                   "sft": "./sft"}
    assert cli.checkpoint_names(["a/tiny", "sft"]) == {"tiny": "a/tiny", "sft": "sft"}  # unique: the name alone
    assert cli.main(["eval", "--model_name_or_path", "a/tiny", str(a)]) == cli.EXIT_USER_ERROR
    assert _one_error_line(capsys.readouterr().err, "eval").endswith(f"{a} is given twice (as a/tiny)")


def test_eval_model_name_or_path_given_twice_evaluates_both(tmp_path, monkeypatch):
    """`eval --model_name_or_path A --model_name_or_path B` evaluated only B, silently."""
    import eval_hooks.evaluate

    a, b = _checkpoint(tmp_path / "init"), _checkpoint(tmp_path / "sft")
    seen = {}
    monkeypatch.setattr(eval_hooks.evaluate, "evaluate_checkpoints", lambda names, cfg, out: seen.update(names))
    argv = ["eval", "--model_name_or_path", str(a), "--output_dir", str(tmp_path / "e"), "--model_name_or_path", str(b)]
    assert cli.main(argv) == 0
    assert seen == {"init": str(a), "sft": str(b)}


@pytest.mark.parametrize("argv", [
    ["init-model", "--output", "{out}"],
    ["smoke", "--output_dir", "{out}", "--no_vllm"],
    ["distill", "--max_prompts", "2", "--output_dir", "{out}"],
    ["sft", "--model_name_or_path", "{model}", "--dataset_name", "builtin:arith", "--output_dir", "{out}"],
    ["grpo", "--model_name_or_path", "{model}", "--output_dir", "{out}"],
    ["rm", "train", "--model_name_or_path", "{model}", "--output_dir", "{out}"],
    ["eval", "--model_name_or_path", "{model}", "--output_dir", "{out}"],
    ["run", str(ROOT / "recipes" / "tiny-arith.yaml"), "--validate", "--output_dir", "{out}"],
])
@pytest.mark.parametrize("below", [False, True])
def test_output_dir_that_is_a_file_is_one_line(argv, below, tmp_path, capsys):
    """An output directory that is an existing file (or below one) was a FileExistsError /
    NotADirectoryError traceback from deep inside the run; now one line before any work, the file intact."""
    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    out = afile / "sub" if below else afile
    argv = [a.format(out=out, model=_checkpoint(tmp_path / "model")) for a in argv]
    command = " ".join(argv[:2]) if argv[0] == "rm" else argv[0]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    line = _one_error_line(capsys.readouterr().err, argv[0])
    field = "output" if argv[0] == "init-model" else "output_dir"
    want = f"{field}: {out}: {afile} exists and is not a directory" if below else \
        f"{field}: {out} exists and is not a directory"
    assert line.endswith(want), (command, line)
    assert afile.read_text() == "keep me\n"


def test_require_output_dir(tmp_path):
    cli.require_output_dir(None)
    cli.require_output_dir(tmp_path)  # an existing directory
    cli.require_output_dir(tmp_path / "new" / "deeper")  # to be created
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match=r"^run_dir: .*/f exists and is not a directory$"):
        cli.require_output_dir(tmp_path / "f", "run_dir")
    with pytest.raises(ConfigError, match=r"^output_dir: .*/f/a/b: .*/f exists and is not a directory$"):
        cli.require_output_dir(tmp_path / "f" / "a" / "b")


@pytest.mark.parametrize("error, line", [
    (PermissionError(13, "Permission denied", "/root/out"), "permission denied: /root/out"),
    (NotADirectoryError(20, "Not a directory", "afile/data"), "not a directory: afile/data"),
    (FileExistsError(17, "File exists", "afile"), "file exists: afile"),
    (IsADirectoryError(21, "Is a directory", "out.jsonl"), "is a directory: out.jsonl"),
])
def test_os_errors_about_a_path_are_one_line(error, line, monkeypatch, capsys):
    """Any other path the user gave that cannot be written: one line naming it, exit 2."""
    def fail(argv):
        raise error

    monkeypatch.setitem(cli.HANDLERS, "rewards", fail)
    assert cli.main(["rewards", "list"]) == cli.EXIT_USER_ERROR
    assert _one_error_line(capsys.readouterr().err, "rewards") == f"dsv3-posttrain rewards: error: {line}"


def test_os_errors_without_a_path_are_not_hidden(monkeypatch):
    def fail(argv):
        raise PermissionError("not about a file the user named")

    monkeypatch.setitem(cli.HANDLERS, "rewards", fail)
    with pytest.raises(PermissionError, match="not about a file"):
        cli.main(["rewards", "list"])


@pytest.mark.parametrize("content, message", [
    (None, "{d} is not a checkpoint directory (no config.json in it)"),
    ("{bad", "{d}/config.json: invalid JSON (Expecting property name enclosed in double quotes at line 1, column 2)"),
    ("[1, 2]", "{d}/config.json: expected a JSON object, got list"),
    (b'{"a": "caf\xe9"}', "{d}/config.json: not valid UTF-8 (invalid continuation byte)"),
], ids=["empty", "invalid-json", "not-an-object", "not-utf8"])
@pytest.mark.parametrize("command", ["sft", "eval", "grpo", "rm train", "serve", "rm score"])
def test_broken_model_directory_is_one_line(command, content, message, tmp_path, capsys):
    """An empty model directory, or one whose config.json is not a JSON object: one line naming the
    file (was: transformers' OSError / tokenizer ValueError / vLLM's pydantic error tracebacks)."""
    d = tmp_path / "model"
    d.mkdir()
    if isinstance(content, bytes):
        (d / "config.json").write_bytes(content)
    elif content is not None:
        (d / "config.json").write_text(content)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "q", "completion": "a"}\n')
    argv = {
        "sft": ["sft", "--model_name_or_path", str(d), "--dataset_name", "builtin:arith", "--output_dir", str(tmp_path / "o")],
        "eval": ["eval", "--model_name_or_path", str(d), "--output_dir", str(tmp_path / "o")],
        "grpo": ["grpo", "--model_name_or_path", str(d), "--output_dir", str(tmp_path / "o")],
        "rm train": ["rm", "train", "--model_name_or_path", str(d), "--output_dir", str(tmp_path / "o")],
        "serve": ["serve", str(d)],
        "rm score": ["rm", "score", "--model", str(d), "--input", str(rows), "--output", str(tmp_path / "o.jsonl")],
    }[command]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    line = _one_error_line(capsys.readouterr().err, argv[0])
    field = {"serve": "MODEL", "rm score": "model"}.get(command, "model_name_or_path")
    assert line.endswith(f"{field}: " + message.format(d=d)), line
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.jsonl").exists()


@pytest.mark.parametrize("port", ["70000", "0", "-1", "http"])
def test_serve_port_out_of_range_is_a_usage_error(port, tmp_path, capsys):
    """--port 70000 was an OverflowError traceback from socket.bind."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", str(_checkpoint(tmp_path / "model")), "--port", port])
    assert exc.value.code == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err and "dsv3-posttrain serve: error: argument --port: invalid port" in err


@pytest.mark.parametrize("argv", [
    ["sft", "--recipe"],
    ["grpo", "--max_steps", "3", "--recipe"],
    ["distill", "--recipe", "--max_prompts", "3"],
    ["distill", "--recipe="],
    ["rm", "train", "--recipe"],
])
def test_recipe_without_a_file_says_so(argv, capsys):
    """`--recipe` with no file was "unknown key 'recipe'"."""
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    assert _one_error_line(capsys.readouterr().err, argv[0]).endswith("error: --recipe needs a file: --recipe FILE")


@pytest.mark.parametrize("vocab_size", ["0", "10", "262"])
def test_init_model_rejects_a_vocabulary_the_tokenizer_cannot_have(vocab_size, tmp_path, capsys):
    """The byte-level BPE has 256 byte symbols + 7 special tokens; a smaller vocab_size silently gave 263."""
    from posttrain.model_init import MIN_VOCAB_SIZE, check_vocab_size

    out = tmp_path / "m"
    assert cli.main(["init-model", "--output", str(out), "--vocab_size", vocab_size]) == cli.EXIT_USER_ERROR
    assert _one_error_line(capsys.readouterr().err, "init-model").endswith(
        f"vocab_size: {vocab_size} is too small; the byte-level tokenizer needs at least 263 "
        "(256 byte symbols + 7 special tokens)")
    assert not out.exists()
    assert MIN_VOCAB_SIZE == 263
    check_vocab_size(263)


def test_convert_help_lists_only_values_it_accepts(tmp_path, capsys):
    """`convert --help` showed `--scale_fmt {None,ue8m0}`, and `--scale_fmt None` was then an invalid choice."""
    import re

    with pytest.raises(SystemExit):
        cli.main(["convert", "--help"])
    listed = re.search(r"--scale_fmt \{([^}]*)\}", capsys.readouterr().out).group(1).split(",")
    for value in listed:
        rc = cli.main(["convert", "bf16-to-fp8", str(tmp_path / "absent"), str(tmp_path / "out"), "--scale_fmt", value])
        err = capsys.readouterr().err
        assert rc == cli.EXIT_USER_ERROR and "invalid choice" not in err, (value, err)
        assert "no checkpoint directory" in err, err


def test_eval_refuses_the_chain_only_fields(tmp_path, monkeypatch, capsys):
    """`eval --every_n_steps 5` was accepted and did nothing (it applies during SFT and GRPO in a chain)."""
    import eval_hooks.evaluate

    monkeypatch.setattr(eval_hooks.evaluate, "evaluate_checkpoints", lambda names, cfg, out: None)
    argv = ["eval", "--model_name_or_path", str(_checkpoint(tmp_path / "model")), "--output_dir", str(tmp_path / "o")]
    assert cli.main([*argv, "--every_n_steps", "5"]) == cli.EXIT_USER_ERROR
    assert _one_error_line(capsys.readouterr().err, "eval").endswith(
        "error: every_n_steps: only in a chain recipe (stages.eval), where SFT and GRPO evaluate during training; "
        "`eval` evaluates finished checkpoints")
    assert not (tmp_path / "o").exists()
    assert cli.main([*argv, "--num_problems", "5"]) == 0  # a benchmark option still passes


def test_run_only_a_stage_the_recipe_does_not_have_is_one_line(tmp_path, capsys):
    """`run --only grpo` on a recipe without a grpo stage ran nothing, wrote an empty report and exited 0."""
    recipe = tmp_path / "sft-only.yaml"
    recipe.write_text(f"name: x\nstages:\n  sft:\n    model_name_or_path: {tmp_path}\n")
    argv = ["run", str(recipe), "--output_dir", str(tmp_path / "run"), "--only", "grpo"]
    assert cli.main(argv) == cli.EXIT_USER_ERROR
    assert _one_error_line(capsys.readouterr().err, "run").endswith(f"--only grpo: not a stage of {recipe} (its stages: sft)")
    assert not (tmp_path / "run").exists()


def test_run_only_eval_before_the_stages_it_evaluates_ran_is_one_line(tmp_path, capsys):
    """`run --only eval` on a fresh run directory: before, the eval handed the missing `<run>/model-init` to
    vLLM, and transformers' Hub lookup ended in a traceback (exit 1)."""
    recipe = tmp_path / "chain.yaml"
    recipe.write_text("name: x\nstages:\n  init: {}\n  eval: {num_problems: 2, max_tokens: 8}\n")
    out = tmp_path / "run"
    assert cli.main(["run", str(recipe), "--output_dir", str(out), "--only", "eval"]) == cli.EXIT_USER_ERROR
    line = _one_error_line(capsys.readouterr().err, "run")
    assert f"error: stages.eval: the init checkpoint: no checkpoint directory at {out / 'model-init'}" in line


def test_init_model_does_not_write_over_a_directory_that_holds_something(tmp_path, capsys):
    """A trained checkpoint there was replaced by random weights with exit 0 (its checkpoint-N and
    trainer_state.json left beside them)."""
    out = tmp_path / "sft"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"trained")
    (out / "trainer_state.json").write_text("{}")
    assert cli.main(["init-model", "--output", str(out)]) == cli.EXIT_USER_ERROR
    assert _one_error_line(capsys.readouterr().err, "init-model").endswith(
        f"--output {out} already exists and is not empty (holds model.safetensors, trainer_state.json): choose a "
        "new or empty directory, or remove it first")
    assert (out / "model.safetensors").read_bytes() == b"trained"
    (out / "model.safetensors").unlink()
    (out / "trainer_state.json").unlink()
    assert cli.main(["init-model", "--output", str(out)]) == 0  # an empty directory is fine
