"""`dsv3-posttrain run RECIPE`: the stages of a recipe in order, each feeding the next.

    init (or a given model) -> distill -> sft -> grpo -> eval -> report

The runner lives in `eval_hooks` because it is the downstream end: it calls every stage and ends
with the evaluation and the report. Each stage writes under the run directory
(`runs/<recipe name>/` unless `--output_dir` says otherwise) and is recorded in `manifest.json`
(status, a hash of its inputs, output path, metrics). Rerunning skips finished stages whose inputs
did not change; a stage that was killed resumes from its own checkpoint (distill from its ledger,
SFT and GRPO from their last Trainer checkpoint, eval after the checkpoints it had finished); a stage whose inputs changed starts afresh, and the
output an earlier run left in its directory is kept as `<dir>.replaced-N`. A top-level `seed: S`
seeds every stage (the initial weights, the teacher's samples, SFT's data order, GRPO's rollouts)
unless a stage sets its own `seed`: one line to change to repeat a run with another seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.checkpoints import last_complete_checkpoint
from posttrain.errors import ConfigError, UserError
from posttrain.recipe import build_config, read_recipe

log = logging.getLogger(__name__)

STAGES = ("init", "distill", "sft", "grpo", "eval")
MANIFEST = "manifest.json"


@dataclass
class InitStage:
    """How the starting checkpoint is made: a preset, or an existing directory."""

    preset: str = field(default="tiny", metadata={"help": "Model preset to initialise (tiny, small)."})
    seed: int = field(default=0, metadata={"help": "Seed of the random weights and the tokenizer."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from this checkpoint instead of initialising one."}
    )

    def __post_init__(self):
        from posttrain.presets import PRESETS

        if self.preset not in PRESETS:  # before any stage runs, not when init's turn comes
            raise ValueError(f"preset: unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")


@dataclass
class EvalStage:
    """Held-out evaluation of every checkpoint the chain produced."""

    dataset_name: str = field(default="builtin:arith", metadata={"help": "Evaluation set."})
    dataset_split: str = field(default="test", metadata={"help": "Split of the evaluation set."})
    num_problems: int = field(default=200, metadata={"help": "How many problems to evaluate on."})
    max_tokens: int = field(default=160, metadata={"help": "Generation budget per answer."})
    k: int = field(default=1, metadata={"help": "Samples per problem for pass@k / maj@k, drawn at temperature 1.0, "
                                         "top-p 1.0 (1: greedy only)."})
    sampled_pass1_k: int = field(
        default=0, metadata={"help": "Also report pass@1 as DeepSeek-R1 (§3.1) does: the mean correctness of this "
                             "many samples per problem at sampled_temperature / sampled_top_p, with 95% "
                             "intervals and paired differences; less noisy than greedy pass@1 where the "
                             "model is weak and its argmax flips. 0 disables."}
    )
    sampled_temperature: float = field(default=0.6, metadata={"help": "Temperature of sampled pass@1 (R1: 0.6)."})
    sampled_top_p: float = field(default=0.95, metadata={"help": "Top-p of sampled pass@1 (R1: 0.95)."})
    mtp_acceptance: bool = field(
        default=False, metadata={"help": "Also measure each checkpoint's MTP drafter on the evaluation's own answers "
                                 "(the sampled pass@1 answers when sampled_pass1_k > 0, else the greedy ones): the "
                                 "fraction of answer tokens after the first that the MTP module's top-1 guess "
                                 "equals, which is the acceptance of one-token speculative decoding (V3 report "
                                 "§5.4.3). Stages are compared on the same problems, with paired intervals. "
                                 "Loads each checkpoint in transformers in the eval process."}
    )
    max_model_len: int = field(default=512, metadata={"help": "Engine context length."})
    every_n_steps: int = field(
        default=0, metadata={"help": "Also evaluate during SFT and GRPO every N optimizer steps (greedy pass@1, "
                             "logged as eval/accuracy in each stage's trainer_state.json); 0 disables."}
    )
    during_training_problems: int = field(
        default=100, metadata={"help": "How many problems the during-training evaluation uses (the first ones "
                               "of the evaluation set)."}
    )

    def __post_init__(self):
        # checked with the recipe (`run --validate` included), not when the benchmark or vLLM meets them;
        # build_config turns the ValueError into a ConfigError naming the recipe
        for name in ("num_problems", "max_tokens", "k", "max_model_len", "during_training_problems"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sampled_pass1_k", "every_n_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 disables it), got {getattr(self, name)}")
        if not self.sampled_temperature >= 0:
            raise ValueError(f"sampled_temperature must be >= 0, got {self.sampled_temperature}")
        if not 0 < self.sampled_top_p <= 1:
            raise ValueError(f"sampled_top_p must be in (0, 1], got {self.sampled_top_p}")
        if self.max_tokens >= self.max_model_len:  # vLLM would cut answers short at the context length, silently
            raise ValueError(f"max_tokens ({self.max_tokens}) must be below max_model_len ({self.max_model_len}), "
                             "which holds the prompt and the answer")


@dataclass
class ChainRecipe:
    name: str
    output_dir: Path
    stages: dict[str, dict[str, Any]]
    source: str
    seed: int | None = None  # the top-level `seed:`: every stage's seed unless the stage sets its own


def load_chain_recipe(path: str | Path, output_dir: str | None = None) -> ChainRecipe:
    data = read_recipe(path)
    unknown = set(data) - {"name", "output_dir", "stages", "description", "seed"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}; expected name, output_dir, seed, "
                          "stages")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"{path}: 'seed' must be an integer, got {seed!r}")
    stages = data.get("stages") or {}
    if not isinstance(stages, dict):
        raise ConfigError(f"{path}: 'stages' must be a mapping of stage name to settings")
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise ConfigError(f"{path}: unknown stage(s) {bad}; stages are {list(STAGES)} (run in that order)")
    if not stages:
        raise ConfigError(f"{path}: no stages; give at least one of {list(STAGES)} under 'stages'")
    for stage, settings in stages.items():
        if settings is not None and not isinstance(settings, dict):
            raise ConfigError(f"{path}: stages.{stage} must be a mapping of settings, got {settings!r}")
    name = str(data.get("name") or Path(path).stem)
    out = Path(output_dir or data.get("output_dir") or Path("runs") / name)
    return ChainRecipe(name, out, {k: dict(v or {}) for k, v in stages.items()}, str(path), seed)


def validate_chain_recipe(recipe: ChainRecipe) -> dict[str, Any]:
    """Builds every stage's config (with the chain's wiring filled in) without running anything."""
    return {stage: _stage_config(recipe, stage, recipe.output_dir) for stage in STAGES if stage in recipe.stages}


def _check_rewards(specs: list[str], source: str) -> None:
    """A misspelt reward name or a broken reward file, said before the first stage runs (GRPO would say it
    only after init, distill and SFT)."""
    from rewards import RewardError, check_spec

    for spec in specs:
        try:
            check_spec(spec)
        except RewardError as e:
            raise ConfigError(f"{source}: reward_funcs: {e}") from None


# -- wiring ----------------------------------------------------------------------------------------
def _stage_config(recipe: ChainRecipe, stage: str, out: Path) -> Any:
    values = dict(recipe.stages.get(stage, {}))
    source = f"{recipe.source} (stages.{stage})"
    if recipe.seed is not None and stage in ("init", "distill", "sft", "grpo"):
        values.setdefault("seed", recipe.seed)  # one number re-seeds the whole chain (weights, teacher, data order, rollouts)
    model0 = _initial_model(recipe, out)
    if stage == "init":
        return build_config(InitStage, values, source)
    if stage == "distill":
        from data_pipelines.distill import DistillConfig

        values.setdefault("output_dir", str(out / "distill"))
        if values.get("backend", "scripted") != "scripted":
            values.setdefault("model_name_or_path", model0)
        return build_config(DistillConfig, values, source)
    if stage == "sft":
        from posttrain.sft.config import SFTRecipeConfig

        values.setdefault("model_name_or_path", model0)
        if "distill" in recipe.stages:
            values.setdefault("dataset_name", str(out / "distill"))
        values.setdefault("output_dir", str(out / "sft"))
        return build_config(SFTRecipeConfig, values, source)
    if stage == "grpo":
        from posttrain.grpo.config import GRPORecipeConfig

        values.setdefault("model_name_or_path", str(out / "sft") if "sft" in recipe.stages else model0)
        values.setdefault("output_dir", str(out / "grpo"))
        cfg = build_config(GRPORecipeConfig, values, source)
        _check_rewards(cfg.reward_funcs, source)
        return cfg
    if stage == "eval":
        return build_config(EvalStage, values, source)
    raise AssertionError(stage)


def _initial_model(recipe: ChainRecipe, out: Path) -> str:
    init = recipe.stages.get("init", {})
    return str(init.get("model_name_or_path") or out / "model-init")


def _inputs_hash(stage: str, config: Any, upstream: dict[str, Any]) -> str:
    from posttrain.recipe import config_to_dict

    payload = {"stage": stage, "config": config_to_dict(config) if hasattr(config, "__dataclass_fields__") else config,
               "upstream": upstream}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- manifest ----------------------------------------------------------------------------------------
class Manifest:
    def __init__(self, path: Path):
        self.path = path
        try:
            self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"stages": {}}
        except (ValueError, UnicodeDecodeError) as e:  # written atomically by us: only an outside edit breaks it
            raise UserError(f"{path}: not a readable run manifest ({e}); repair it, or remove it to rerun "
                            "every stage") from None
        if not isinstance(self.data, dict) or not isinstance(self.data.get("stages"), dict):
            raise UserError(f"{path}: not a run manifest (no 'stages' mapping); repair it, or remove it to rerun "
                            "every stage")

    def get(self, stage: str) -> dict[str, Any]:
        return self.data["stages"].get(stage, {})

    def update(self, stage: str, **fields: Any) -> None:
        self.data["stages"].setdefault(stage, {}).update(fields)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)  # atomic: a kill never leaves half a manifest


# -- the stages ----------------------------------------------------------------------------------------
def run_chain(recipe_path: str | Path, output_dir: str | None = None, only: list[str] | None = None) -> dict[str, Any]:
    recipe = load_chain_recipe(recipe_path, output_dir)
    absent = [s for s in only or () if s not in recipe.stages]
    if absent:  # else nothing would run, and the run would end as if it had
        raise UserError(f"--only {' '.join(absent)}: not a stage of {recipe.source} (its stages: "
                        f"{', '.join(recipe.stages)})")
    out = recipe.output_dir
    configs = validate_chain_recipe(recipe)  # every stage's config checked before anything runs (or is written)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out / MANIFEST)
    manifest.data.update({"recipe": recipe.source, "name": recipe.name})
    upstream: dict[str, Any] = {}
    t_start = time.time()
    for stage in STAGES:
        if stage not in configs:
            continue
        cfg = configs[stage]
        digest = _inputs_hash(stage, cfg, upstream)
        prev = manifest.get(stage)
        upstream[stage] = digest  # what later stages' hashes build on, whether this one runs now or not
        if prev.get("status") == "done" and prev.get("inputs_hash") == digest:
            print(f"[{stage}] done already ({prev.get('output')}), skipping")
            continue
        if only and stage not in only:
            # later stages build on what this stage's directory holds, not on what its config would make: their
            # hashes must say so, or the run that brings this stage up to date would skip them as done
            upstream[stage] = (prev.get("inputs_hash") if prev.get("status") == "done"
                               else f"{prev.get('status', 'not run')}:{prev.get('inputs_hash')}")
            state = {"done": "done with other inputs", "running": "unfinished"}.get(prev.get("status"), "not run yet")
            print(f"[{stage}] not run (--only); its output is {state}")
            continue
        resuming = prev.get("status") == "running" and prev.get("inputs_hash") == digest
        if not resuming:
            _set_aside_earlier_output(stage, cfg)
        print(f"[{stage}] {'resuming' if resuming else 'starting'}")
        manifest.update(stage, status="running", inputs_hash=digest, started=time.time())
        t0 = time.time()
        output, metrics = STAGE_RUNNERS[stage](cfg, recipe, out, resuming)
        manifest.update(stage, status="done", output=str(output), seconds=round(time.time() - t0, 1), metrics=metrics)
        print(f"[{stage}] done in {time.time() - t0:.0f}s -> {output}")
    manifest.update("_run", seconds=round(time.time() - t_start, 1))
    from .report import write_report

    # the report is of this recipe's stages: a stage an earlier version of the recipe had stays in the manifest,
    # but its results (an eval of checkpoints retrained since) must not be reported as this run's
    stages = {s: v for s, v in manifest.data["stages"].items() if s in configs or s.startswith("_")}
    return write_report(out, {**manifest.data, "stages": stages})


def _set_aside_earlier_output(stage: str, cfg: Any) -> Path | None:
    """A stage that starts afresh must not pick up checkpoints or shards that an earlier run with other
    inputs left in its output directory (SFT and GRPO resume from the newest checkpoint they find: a
    changed GRPO temperature would otherwise "resume" the old run at max_steps and train nothing).
    The earlier output is kept, renamed to `<dir>.replaced-N`."""
    if stage not in ("distill", "sft", "grpo"):
        return None
    path = Path(cfg.output_dir)
    if not path.is_dir() or not any(path.iterdir()):
        return None
    n = 1
    while path.with_name(f"{path.name}.replaced-{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.replaced-{n}")
    path.rename(target)
    print(f"[{stage}] its inputs changed since {path} was written: that output is kept as {target}")
    return target


def _run_init(cfg: InitStage, recipe: ChainRecipe, out: Path, resuming: bool) -> tuple[Path, dict]:
    from posttrain.model_init import init_model

    if cfg.model_name_or_path:
        if not Path(cfg.model_name_or_path).is_dir():
            raise UserError(f"stages.init.model_name_or_path: no checkpoint directory at {cfg.model_name_or_path}")
        return Path(cfg.model_name_or_path), {}
    return init_model(cfg.preset, out / "model-init", seed=cfg.seed), {"preset": cfg.preset}


def _run_distill(cfg, recipe: ChainRecipe, out: Path, resuming: bool) -> tuple[Path, dict]:
    from data_pipelines.distill import run_distill

    stats = run_distill(cfg)
    keep = ("prompts", "samples", "kept", "acceptance_rate", "rows_written")
    return Path(cfg.output_dir), {k: stats.get(k) for k in keep if k in stats}


def _attach_eval_callback(trainer, recipe: ChainRecipe, out: Path) -> None:
    """The eval stage's `every_n_steps`: an EvalCallback on the SFT or GRPO trainer (GRPO evaluates
    through its own rollout engine, SFT through transformers generate)."""
    if "eval" not in recipe.stages:
        return
    cfg: EvalStage = _stage_config(recipe, "eval", out)
    if cfg.every_n_steps <= 0:
        return
    from .benchmarks import load_benchmark
    from .callback import EvalCallback

    prompts, answers = load_benchmark(cfg.dataset_name, cfg.dataset_split, cfg.during_training_problems)
    EvalCallback(prompts, answers, cfg.every_n_steps, max_tokens=cfg.max_tokens, k=cfg.k).attach(trainer)


def _can_resume(trainer) -> bool:
    """Whether the stage's output_dir holds a checkpoint complete by the trainer's own rule (a kill during
    the first save leaves one that is not: the stage then starts afresh)."""
    return last_complete_checkpoint(trainer.args.output_dir, trainer.checkpoint_state_files()) is not None


def _run_sft(cfg, recipe: ChainRecipe, out: Path, resuming: bool) -> tuple[Path, dict]:
    from posttrain.sft.run import build_trainer, run_sft

    trainer = build_trainer(cfg)
    cfg.resume_from_checkpoint = "last" if resuming and _can_resume(trainer) else None
    cfg.overwrite_output_dir = True  # a fresh start replaces what is left: a partial first checkpoint at most
    _attach_eval_callback(trainer, recipe, out)
    summary = run_sft(cfg, trainer)
    return Path(cfg.output_dir), {"train_loss": summary.get("train_loss"), "global_step": summary.get("global_step")}


def _run_grpo(cfg, recipe: ChainRecipe, out: Path, resuming: bool) -> tuple[Path, dict]:
    from posttrain.grpo.run import build_trainer, run_grpo

    trainer = build_trainer(cfg)
    cfg.resume_from_checkpoint = "last" if resuming and _can_resume(trainer) else None
    cfg.overwrite_output_dir = True  # a fresh start replaces what is left: a partial first checkpoint at most
    _attach_eval_callback(trainer, recipe, out)
    summary = run_grpo(cfg, trainer)
    return Path(cfg.output_dir), {"steps": summary.get("steps")}


def _run_eval(cfg: EvalStage, recipe: ChainRecipe, out: Path, resuming: bool) -> tuple[Path, dict]:
    from .evaluate import evaluate_checkpoints

    start = _initial_model(recipe, out)
    first = next((s for s in ("sft", "grpo") if s in recipe.stages), None)
    if "init" not in recipe.stages and first is not None:
        # no init stage: the chain started from the model the first training stage names (model-init is never made)
        start = _stage_config(recipe, first, out).model_name_or_path
    checkpoints = {"init": start}
    if "sft" in recipe.stages:
        checkpoints["sft"] = str(out / "sft")
    if "grpo" in recipe.stages:
        checkpoints["grpo"] = str(out / "grpo")
    from posttrain.recipe import require_model_dir

    for name, path in checkpoints.items():  # a stage that never ran (`--only eval`) left none: one line, not a traceback
        require_model_dir(path, f"stages.eval: the {name} checkpoint", allow_hub=name == "init")
    results = evaluate_checkpoints(checkpoints, cfg, out / "eval", reuse_finished=resuming)
    metrics = {}
    for name, r in results.items():
        metrics[name] = {"accuracy": r["accuracy"], "n": r["n"]}
        if "sampled_pass1" in r:
            metrics[name]["sampled_pass1"] = r["sampled_pass1"]["pass@1"]
    return out / "eval", metrics


STAGE_RUNNERS = {"init": _run_init, "distill": _run_distill, "sft": _run_sft, "grpo": _run_grpo, "eval": _run_eval}
