"""`dsv3-posttrain`: the toolkit's command line.

Each subcommand is a small function here that parses its options and calls into the package that
does the work. Recipe-driven subcommands take `--recipe FILE` plus `--key value` overrides whose
names follow TRL and transformers (`--model_name_or_path`, `--output_dir`, `--max_steps`, …).
User errors (bad recipe, missing file, bad data) print one line and exit 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2

# name -> one-line purpose (shown by `dsv3-posttrain --help`)
COMMANDS: dict[str, str] = {
    "init-model": "write a randomly initialised DeepSeek-V3-architecture checkpoint (tiny default or a preset)",
    "distill": "build an R1-style SFT dataset: teacher sampling + rejection sampling",
    "sft": "sample-masked SFT of the whole V3 model (MTP and routing balance included)",
    "grpo": "GRPO with vLLM group sampling, rule-based and model-based rewards",
    "rm": "train or apply the V3-based reward model",
    "eval": "evaluate a checkpoint (pass@1, pass@k, maj@k)",
    "run": "run a recipe that chains the stages (init, distill, SFT, GRPO, eval)",
    "rewards": "list the reward functions that resolve (built-ins, plugins)",
    "convert": "convert checkpoints between FP8 (DeepSeek block-scaled) and bf16",
    "export": "turn a LoRA SFT checkpoint-N into a full model directory (merged, with the routers' biases)",
    "plan": "estimate per-GPU memory and step time for a model on a cluster",
    "serve": "serve a model over an OpenAI-compatible API (vLLM with the engine fixes; --trl for GRPO's server mode)",
    "smoke": "check the install: init the tiny model, a forward/backward pass, a vLLM generation",
}


# ---------------------------------------------------------------------------------------------
def cmd_init_model(argv: list[str]) -> int:
    from posttrain.presets import PRESETS

    p = argparse.ArgumentParser(
        prog="dsv3-posttrain init-model",
        description="Write a randomly initialised DeepSeek-V3-architecture checkpoint in Hugging Face format "
        "(model, config with the MTP module in the DeepSeek layout, and for small presets the locally "
        "trained tokenizer). The deepseek-v3 preset is built on the meta device: config and parameter "
        "count only.",
    )
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (default: tiny)")
    p.add_argument("--output", "--output_dir", dest="output", required=True, help="directory to write")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and tokenizer (default: 0)")
    p.add_argument("--vocab_size", type=int, default=1024, help="BPE vocabulary size of the tokenizer (default: 1024)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weight dtype (default: float32)")
    args = p.parse_args(argv)
    require_output_dir(args.output, "output")
    from posttrain.recipe import require_empty_output

    require_empty_output(args.output)  # a trained model there was replaced by random weights
    from posttrain.model_init import count_parameters, init_model

    out = init_model(args.preset, args.output, seed=args.seed, vocab_size=args.vocab_size, dtype=args.dtype)
    if args.preset == "deepseek-v3":
        print(f"wrote {out}/config.json (meta-device build, no weights): {(out / 'parameter_count.json').read_text().strip()}")
    else:
        from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

        model = DeepseekV3ForCausalLMWithMTP.from_pretrained(out)
        print(f"wrote {out}: {count_parameters(model)}")
    return 0


def cmd_smoke(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv3-posttrain smoke", description=COMMANDS["smoke"])
    p.add_argument("--output_dir", default="runs/smoke", help="where the tiny checkpoint goes")
    p.add_argument("--no_vllm", action="store_true", help="skip the vLLM generation")
    args = p.parse_args(argv)
    require_output_dir(args.output_dir)
    from posttrain.smoke import run_smoke

    run_smoke(args.output_dir, use_vllm=not args.no_vllm)
    return 0


def cmd_rewards(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="dsv3-posttrain rewards", description=COMMANDS["rewards"])
    p.add_argument("action", choices=["list"], help="list: show every reward name that resolves")
    p.parse_args(argv)
    import rewards

    rows = rewards.list_rewards()
    width = max((len(r[0]) for r in rows), default=4)
    for name, source, doc in rows:
        print(f"{name:<{width}}  {source:<10}  {doc}")
    return 0


def cmd_convert(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dsv3-posttrain convert",
        description="Stream a checkpoint shard by shard between DeepSeek's FP8 (e4m3, 128x128 block scales) and bf16, "
        "rewriting the index and config so the result loads without hand edits: a bf16 result in transformers, vLLM "
        "and this toolkit's commands; an FP8 result in this toolkit's commands and in vLLM (GPUs, or CPUs with AMX), "
        "but not in transformers on a CPU, whose FP8 dequantizer needs every dimension a multiple of 128 "
        "(kv_a_proj_with_mqa has 576 rows). DST must be new or empty (or a killed conversion's own output).",
    )
    p.add_argument("direction", choices=["fp8-to-bf16", "bf16-to-fp8"])
    p.add_argument("src", help="input checkpoint directory")
    p.add_argument("dst", help="output checkpoint directory")
    # `None` among the choices showed in --help as a value, which argparse then refused ("invalid choice: 'None'")
    p.add_argument("--scale_fmt", default=None, choices=["ue8m0"],
                   help="bf16-to-fp8: power-of-two scales (V3.1); default: unset, fp32 scales")
    args = p.parse_args(argv)
    from posttrain.fp8 import convert as fp8_convert

    if args.direction == "fp8-to-bf16":
        fp8_convert.convert_fp8_to_bf16(args.src, args.dst)
    else:
        fp8_convert.convert_bf16_to_fp8(args.src, args.dst, scale_fmt=args.scale_fmt)
    print(f"wrote {args.dst}")
    return 0


def cmd_export(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dsv3-posttrain export",
        usage="dsv3-posttrain export CHECKPOINT_DIR --output OUT_DIR [--base BASE_MODEL_DIR]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Turn an intermediate checkpoint of a LoRA SFT run (checkpoint-N: the peft adapter and the balancer's "
            "state) into a full model directory, as the run's final output_dir is: base + adapter merged, with "
            "the routers' e_score_correction_bias as balancing left it at that step, in the DeepSeek layout (FP8 "
            "again for an FP8 base), plus the tokenizer. Plain transformers and vLLM load the result.",
            width=100, break_on_hyphens=False),
        epilog=textwrap.fill(
            "Why not peft's PeftModel.from_pretrained: with transformers 5 peft moves a V3 adapter's "
            "gate_proj/up_proj/down_proj onto the fused routed experts (the dense and shared-expert MLPs lose "
            "theirs), and the moved router biases are not in the adapter. A full (non-LoRA) checkpoint-N needs "
            "no export: it loads as it is.", width=100, break_on_hyphens=False),
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a LoRA checkpoint-N directory (adapter_config.json)")
    p.add_argument("--output", "--output_dir", dest="output", required=True, metavar="OUT_DIR",
                   help="directory to write the full model to")
    p.add_argument("--base", default=None, metavar="BASE_MODEL_DIR",
                   help="the model the run trained (default: base_model_name_or_path in adapter_config.json)")
    args = p.parse_args(argv)
    require_output_dir(args.output, "output")
    from posttrain.sft.lora_export import export_lora_checkpoint, read_adapter_config

    read_adapter_config(Path(args.checkpoint).expanduser())  # not a LoRA checkpoint: said before torch loads
    out = export_lora_checkpoint(args.checkpoint, args.output, base=args.base)
    print(f"wrote {out}")
    return 0


def distill_summary(stats: dict) -> str:
    """'kept 317 of 400 samples (79.2%)' from `run_distill`'s statistics (`stats["samples"]`)."""
    samples = stats.get("samples") or {}
    kept, total = samples.get("kept", 0), samples.get("total", 0)
    rate = f" ({kept / total:.1%})" if total else ""
    return f"kept {kept} of {total} samples{rate}"


@dataclass(frozen=True)
class RecipeCommand:
    """A command whose options are a config dataclass, filled from `--recipe FILE` + `--key value`
    overrides (posttrain.recipe: did-you-mean, type checks), then handed to its runner."""

    config: str  # "module:Class"
    runner: str  # "module:function", called with the config; returns its summary
    description: str  # the --help text
    done: Callable[[Any, Any], str]  # (config, summary) -> the closing line

    def __call__(self, name: str, argv: list[str]) -> int:
        config_cls, run = _load(self.config), _load(self.runner)
        cfg = _recipe_config(name, config_cls, argv, self.description)
        if cfg is None:
            return 0
        require_output_dir(getattr(cfg, "output_dir", None))
        summary = run(cfg)
        print(f"{name}: {self.done(cfg, summary)}")
        return 0


def _load(ref: str) -> Any:
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


RECIPE_COMMANDS: dict[str, RecipeCommand] = {
    "distill": RecipeCommand(
        "data_pipelines.distill:DistillConfig", "data_pipelines.distill:run_distill",
        "Build an R1-style SFT dataset (DeepSeek-V3 report §5.1).",
        lambda cfg, stats: f"{distill_summary(stats)} -> {cfg.output_dir}"),
    "sft": RecipeCommand(
        "posttrain.sft.config:SFTRecipeConfig", "posttrain.sft.run:run_sft",
        "Sample-masked SFT of the whole V3 model: packed samples that never see each other, loss on assistant "
        "tokens, the MTP loss (report §2.2) and aux-loss-free balancing (§2.1.2).",
        lambda cfg, summary: f"done -> {cfg.output_dir} ({_short(summary)})"),
    "grpo": RecipeCommand(
        "posttrain.grpo.config:GRPORecipeConfig", "posttrain.grpo.run:run_grpo",
        "GRPO (DeepSeekMath §4.1): G completions per prompt sampled with vLLM, rule-based and model rewards, "
        "group-normalised advantages, clipped ratio with a k3 KL penalty; the whole MoE model is updated, MTP "
        "and router biases included.",
        lambda cfg, summary: f"{summary['steps']} steps -> {cfg.output_dir}"),
}


def cmd_run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dsv3-posttrain run",
        description="Run a recipe that chains the stages (init, distill, sft, grpo, eval), each feeding the next, and "
        "write report.md, plots and results.json in the run directory. Finished stages are skipped on a rerun; a "
        "killed stage resumes from its last checkpoint.",
    )
    from eval_hooks.chain import STAGES, load_chain_recipe, run_chain, validate_chain_recipe

    p.add_argument("recipe", help="chain recipe YAML (e.g. recipes/tiny-arith.yaml)")
    p.add_argument("--output_dir", default=None, help="run directory (default: runs/<recipe name>)")
    p.add_argument("--only", nargs="+", default=None, choices=STAGES, metavar="STAGE",
                   help=f"run only these stages ({', '.join(STAGES)}); the others are not run, and later stages use "
                   "what an earlier run left in their directories")
    p.add_argument("--validate", action="store_true", help="check every stage's config and exit")
    args = p.parse_args(argv)

    recipe = load_chain_recipe(args.recipe, args.output_dir)
    require_output_dir(recipe.output_dir)
    if args.validate:
        configs = validate_chain_recipe(recipe)
        print(f"{args.recipe}: valid ({', '.join(configs)})")
        return 0
    run_chain(args.recipe, args.output_dir, args.only)
    return 0


# EvalStage fields that only a chain recipe uses (evaluation during SFT and GRPO), not `eval` itself
EVAL_CHAIN_ONLY_FIELDS = ("every_n_steps", "during_training_problems")


def cmd_eval(argv: list[str]) -> int:
    from eval_hooks.chain import EvalStage
    from posttrain.recipe import describe_fields, load_config, require_model_dir

    p = argparse.ArgumentParser(
        prog="dsv3-posttrain eval",
        usage="dsv3-posttrain eval --model_name_or_path DIR [DIR ...] [--output_dir DIR] [--key value ...]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Evaluate checkpoints on a benchmark (built-in task, MATH-500, GSM8K, AIME-style problem/answer "
            "sets; local files or Hub ids): greedy pass@1, and with --k N sampled pass@N and maj@N, checked with "
            "math-verify. Results as JSON.", width=100, break_on_hyphens=False),
        epilog="benchmark options (as --key value; in a chain recipe, under stages.eval):\n"
        + describe_fields(EvalStage, exclude=EVAL_CHAIN_ONLY_FIELDS),
    )
    # extend: `--model_name_or_path A --model_name_or_path B` evaluates both (argparse's default kept only B)
    p.add_argument("--model_name_or_path", nargs="+", action="extend", required=True, metavar="DIR",
                   help="checkpoint directories")
    p.add_argument("--output_dir", default="runs/eval", metavar="DIR",
                   help="where the JSON results go (default: runs/eval)")
    if any(a in ("-h", "--help") for a in argv):
        p.print_help()
        return 0
    args, rest = p.parse_known_args(argv)
    from posttrain.errors import ConfigError
    from posttrain.recipe import parse_overrides

    chain_only = [k for k in parse_overrides(rest) if k in EVAL_CHAIN_ONLY_FIELDS]
    if chain_only:  # accepted, they would do nothing here: there is no training to evaluate during
        raise ConfigError(f"{', '.join(chain_only)}: only in a chain recipe (stages.eval), where SFT and GRPO "
                          "evaluate during training; `eval` evaluates finished checkpoints")
    cfg = load_config(EvalStage, None, rest)
    for path in args.model_name_or_path:
        require_model_dir(path)
    names = checkpoint_names(args.model_name_or_path)
    require_output_dir(args.output_dir)
    from eval_hooks.evaluate import evaluate_checkpoints

    evaluate_checkpoints(names, cfg, args.output_dir)
    return 0


def checkpoint_names(paths: Sequence[str]) -> dict[str, str]:
    """{name: path} for `eval`, whose results go to `<output_dir>/<name>.json`: each checkpoint's
    directory name, with as many parent directories (joined by "--") as it takes to tell apart
    checkpoints whose names are the same: runs/a/final, runs/b/final, runs/sft -> a--final,
    b--final, sft. The same directory given twice is a `ConfigError`."""
    from collections import Counter

    from posttrain.errors import ConfigError

    seen: dict[Path, str] = {}
    for m in paths:
        real = Path(m).expanduser().resolve()
        if real in seen:
            same = "" if seen[real] == m else f" (as {seen[real]})"
            raise ConfigError(f"model_name_or_path: {m} is given twice{same}")
        seen[real] = m
    # absolute, without following symlinks (runs/latest keeps its own name); no root
    parts = [Path(os.path.abspath(os.path.expanduser(m))).parts[1:] or ("model",) for m in paths]
    depth = [1] * len(paths)
    while True:
        names = ["--".join(p[-d:]) for p, d in zip(parts, depth)]
        counts = Counter(names)
        longer = [i for i, n in enumerate(names) if counts[n] > 1 and depth[i] < len(parts[i])]
        if not longer:
            break
        for i in longer:
            depth[i] += 1
    out: dict[str, str] = {}
    for m, name in zip(paths, names):
        unique, k = name, 2
        while unique in out:  # joined names that still collide (/c, /x/c and /x--c): a number
            unique, k = f"{name}-{k}", k + 1
        out[unique] = m
    return out


def cmd_serve(argv: list[str]) -> int:
    from posttrain.recipe import require_model_dir

    p = argparse.ArgumentParser(
        prog="dsv3-posttrain serve",
        usage="dsv3-posttrain serve MODEL [--host H] [--port P] [--trl] [options] [vLLM server options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Serve MODEL with vLLM's OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, "
            "/health) in a process where the engine fixes are applied (on vLLM's CPU build: the MLA rotary fix, "
            "fp32, eager mode, a small KV cache; an FP8 checkpoint is served dequantized where vLLM has no FP8 "
            "kernel). The openai distillation teacher takes it as api_base http://HOST:PORT/v1 with "
            "model_name_or_path MODEL.", width=100, break_on_hyphens=False),
        epilog=textwrap.fill(
            "--trl adds TRL's `trl vllm-serve` options (processed log-probs, weight-update endpoints, NCCL weight "
            "transfer on CUDA): GRPO's vllm_mode: server with vllm_server_base_url http://HOST:PORT. Weight sync "
            "needs CUDA; on CPU, GRPO runs colocated. Any other option is passed to vLLM's server as it is "
            "(e.g. --max-num-seqs 64; set the KV cache on CPU with VLLM_CPU_KVCACHE_SPACE=GiB).",
            width=100, break_on_hyphens=False),
    )
    p.add_argument("model", metavar="MODEL", help="checkpoint directory (or a Hugging Face Hub id)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port, 1-65535 (default: 8000)")
    p.add_argument("--dtype", default=None, help="weight dtype (default: float32 on CPU, the checkpoint's on GPU)")
    p.add_argument("--max_model_len", "--max-model-len", type=int, default=None,
                   help="context length (default on CPU: the model's, at most 4096)")
    p.add_argument("--seed", type=int, default=0, help="vLLM's random seed (default: 0)")
    p.add_argument("--served_model_name", "--served-model-name", default=None,
                   help="the model name clients send (default: MODEL as given)")
    p.add_argument("--trl", action="store_true", help="also speak TRL's vllm-serve protocol (GRPO vllm_mode: server)")
    args, extra = p.parse_known_args(argv)
    require_model_dir(args.model, "MODEL", allow_hub=True)
    _require_free_port(args.host, args.port)
    from engines.serve import serve

    serve(args.model, host=args.host, port=args.port, dtype=args.dtype, max_model_len=args.max_model_len,
          seed=args.seed, served_model_name=args.served_model_name, trl=args.trl, extra=extra)
    return 0


def _port(text: str) -> int:
    """argparse type of `serve --port`: an integer in 1-65535 (socket.bind raises OverflowError beyond)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: not an integer") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: must be 1-65535")
    return port


def _require_free_port(host: str, port: int) -> None:
    import socket

    from posttrain.errors import UserError

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: only a listener conflicts
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _short(summary) -> str:
    if not isinstance(summary, dict):
        return ""
    keys = [k for k in ("global_step", "steps", "train_loss", "loss") if k in summary]
    return ", ".join(f"{k}={summary[k]}" for k in keys)


def _recipe_config(name: str, cls: type, argv: list[str], description: str, section: str | None = None):
    """Parses `--recipe FILE` + overrides into `cls`; prints field help for -h and returns None."""
    from posttrain.recipe import describe_fields, load_config, split_recipe_arg

    if any(a in ("-h", "--help") for a in argv):
        print(
            f"usage: dsv3-posttrain {name} [--recipe FILE] [--key value ...]\n\n{description}\n\n"
            "Options (any field below, from the recipe or as --key value):\n"
            + describe_fields(cls, exclude=getattr(cls, "unapplied_fields", ()))
        )
        return None
    recipe, rest = split_recipe_arg(argv)
    return load_config(cls, recipe, rest, section=section or name)


def require_output_dir(path: str | os.PathLike | None, field: str = "output_dir") -> None:
    """`posttrain.recipe.require_output_path` for an output directory."""
    from posttrain.recipe import require_output_path

    require_output_path(path, field, directory=True)


# The one dispatch table: command -> handler (a recipe command's handler is its RecipeCommand).
HANDLERS: dict[str, Callable[[list[str]], int]] = {
    "init-model": cmd_init_model,
    "smoke": cmd_smoke,
    "rewards": cmd_rewards,
    "convert": cmd_convert,
    "export": cmd_export,
    **{name: partial(command, name) for name, command in RECIPE_COMMANDS.items()},
    "rm": lambda argv: __import__("posttrain.rm.cli", fromlist=["main_rm"]).main_rm(argv),
    "eval": cmd_eval,
    "serve": cmd_serve,
    "run": cmd_run,
    "plan": lambda argv: __import__("posttrain.plan", fromlist=["main_plan"]).main_plan(argv),
}
assert set(HANDLERS) == set(COMMANDS), "every command has a one-line purpose and a handler"


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = []
    for mod, name in (("posttrain.errors", "UserError"), ("data_pipelines.errors", "DataError"), ("rewards.errors", "RewardError")):
        try:
            types.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(types)


def build_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {n:<11} {d}" for n, d in COMMANDS.items())
    return argparse.ArgumentParser(
        prog="dsv3-posttrain",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Post-training for DeepSeek-V3-architecture models: R1 distillation, sample-masked SFT, "
        "GRPO, on the whole MoE model (MLA, experts, router balancing, MTP, FP8).",
        epilog=f"commands:\n{lines}\n\n`dsv3-posttrain COMMAND --help` explains each one.",
        usage="dsv3-posttrain COMMAND [options]",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else EXIT_USER_ERROR
    name, rest = argv[0], argv[1:]
    if name not in HANDLERS:
        import difflib

        close = difflib.get_close_matches(name, list(HANDLERS), n=2)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        print(f"dsv3-posttrain: unknown command {name!r}{hint}; see dsv3-posttrain --help", file=sys.stderr)
        return EXIT_USER_ERROR
    logging.basicConfig(level=os.environ.get("DSV3_LOG_LEVEL", "INFO"), format="%(levelname)s %(name)s: %(message)s")
    # TRL 1.16 warns at import, five times, that it supports vLLM up to 0.31; the vLLM it meets here is
    # the pinned 0.32 whose every contact point with TRL is tested (engines/compat.py, tests/test_compat.py).
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM versions", category=UserWarning)
    user_errors = _user_error_types()
    finished = False
    try:
        rc = HANDLERS[name](rest)
        finished = True
        return rc
    except user_errors as e:  # the user's to fix: one line, no traceback
        print(f"dsv3-posttrain {name}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except FileNotFoundError as e:
        logging.getLogger("dsv3-posttrain").debug("%s failed", name, exc_info=True)
        print(f"dsv3-posttrain {name}: error: file not found: {e.filename or e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        if not e.filename:  # no path to name: not one the user gave, so not theirs to fix
            raise
        # A path the user gave (an output that is a file, a folder they cannot write): one line with
        # the path; the traceback, should it be a bug after all, with DSV3_LOG_LEVEL=DEBUG.
        logging.getLogger("dsv3-posttrain").debug("%s failed", name, exc_info=True)
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else f"{e.filename}"
        reason = (e.strerror or type(e).__name__).lower()
        print(f"dsv3-posttrain {name}: error: {reason}: {where}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"dsv3-posttrain {name}: interrupted", file=sys.stderr)
        return 130
    finally:
        end_process_group(wait_for_peers=finished)


def end_process_group(wait_for_peers: bool) -> None:
    """Tear down the process group of an `accelerate launch` run before the interpreter exits.

    A rank that exits with its gloo group still alive can die in static destruction ("terminate
    called without an active exception", SIGABRT), which the launcher reports as a failed run. So
    every rank first waits for the others (rank 0 may still be writing the final model) and then
    destroys the group. After an error there is no barrier: the other ranks may never reach it."""
    if "torch" not in sys.modules:  # commands that never touched torch have no group
        return
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if wait_for_peers:
            dist.barrier()
        _end_vllm_groups()
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception as e:  # teardown must never add a second error to the run's own
        if wait_for_peers:  # the run itself finished: say so in one line, keep its exit status
            print(f"dsv3-posttrain: warning: process group teardown failed: {e}", file=sys.stderr)


def _end_vllm_groups() -> None:
    """A colocated vLLM engine keeps its own groups (TP, PP, ... on top of the default one) and
    destroys them when it shuts down, at the latest at interpreter exit. Destroying the default
    group first would leave those invalid and the engine's shutdown would fail with "Invalid
    process group specified", after the run's own error. So vLLM's groups go first, through
    vLLM's own teardown, which also clears its references to them."""
    parallel_state = sys.modules.get("vllm.distributed.parallel_state")
    if parallel_state is None:
        return
    for name in ("destroy_model_parallel", "destroy_distributed_environment"):
        fn = getattr(parallel_state, name, None)
        if fn is not None:
            try:
                fn()
            except Exception:  # a group that is already gone: nothing left to tear down
                pass


def entry() -> None:
    """The `dsv3-posttrain` command (and `python cli.py`): `main`, then the process exits with its status."""
    rc = main()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        exit_launched_rank(rc)
    sys.exit(rc)


def exit_launched_rank(rc: int) -> None:
    """Ends a rank of an `accelerate launch` / torchrun run without C++ static destruction.

    Even after the barrier and `destroy_process_group` (end_process_group), a rank sometimes died at
    interpreter exit with "terminate called without an active exception" (SIGABRT: a joinable
    std::thread of the distributed stack destroyed), seen once in five 2-process SFT runs here and on
    CI in session 4; the launcher then SIGTERMs the other rank and reports a failed run although
    training and saving had finished. Python's own exit handlers still run; only what follows them
    (module teardown, static destructors) is skipped."""
    import atexit

    atexit._run_exitfuncs()  # what a normal exit runs first (stdlib; flushes loggers, pools, trackers)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    entry()
