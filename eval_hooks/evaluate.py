"""Evaluate checkpoints with one vLLM engine: it loads the first and takes each next one through
weight sync, which costs a fraction of a second instead of an engine start (a checkpoint whose config differs
gets an engine of its own: a sync carries weights only). Each checkpoint's results are
written whole as soon as it is done, so a killed evaluation resumed by the chain redoes only the rest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .accuracy import evaluate_accuracy
from .benchmarks import load_benchmark_with_groups
from .mtp_acceptance import drafter_hits


def _model_config(path: str) -> dict[str, Any]:
    """A checkpoint's config.json without what does not change the model it describes."""
    config = json.loads((Path(path) / "config.json").read_text())
    # use_cache: transformers' generate setting, which training saves as false (vLLM never reads it); counted, it
    # gave every trained checkpoint an engine start of its own instead of a weight sync
    for bookkeeping in ("_name_or_path", "transformers_version", "use_cache"):
        config.pop(bookkeeping, None)
    return config


def evaluate_checkpoints(checkpoints: dict[str, str], cfg, out_dir: str | Path, engine=None,
                         reuse_finished: bool = False) -> dict[str, dict[str, Any]]:
    """{name: checkpoint dir} -> {name: {"accuracy", "n", ...}}; each result also written as JSON
    (`<out_dir>/<name>.json`). `reuse_finished`: a checkpoint whose JSON is already there, for the same
    checkpoint directory, is not evaluated again (the chain's resume of a killed eval stage with unchanged
    inputs; anything else evaluates every checkpoint). A file written under other settings is not reused."""
    from dataclasses import asdict

    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from data_pipelines.shards import atomic_write_bytes
    from engines.vllm_engine import VLLMColocateEngine
    from posttrain.fp8.training import check_checkpoint
    from posttrain.layout import weights_for_engine
    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    for path in checkpoints.values():  # a corrupt or foreign checkpoint in one line, not a vLLM traceback
        check_checkpoint(path, DeepseekV3ForCausalLMWithMTP)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts, answers, groups = load_benchmark_with_groups(cfg.dataset_name, cfg.dataset_split, cfg.num_problems)
    names = list(checkpoints)
    results: dict[str, dict[str, Any]] = {}
    # written with each result: a resumed stage whose settings changed since a file was written (a restart with
    # new settings killed before reaching that checkpoint) must not reuse it
    settings = json.loads(json.dumps(asdict(cfg)))
    if reuse_finished:
        for name in names:
            done = _finished(out / f"{name}.json", checkpoints[name], settings)
            if done is not None:
                results[name] = done
                print(f"[eval] {name}: done already ({out / f'{name}.json'})")
    todo = [name for name in names if name not in results]
    own_engine = engine is None
    served = None  # the config of the checkpoint our own engine was built from
    if own_engine and todo:
        engine = VLLMColocateEngine(checkpoints[todo[0]], max_model_len=cfg.max_model_len)
        served = _model_config(checkpoints[todo[0]])
    measure_drafter = cfg.mtp_acceptance
    # one tick per part of each checkpoint's evaluation (each a few seconds to minutes); shown on a terminal only
    parts = 1 + (cfg.k > 1) + (cfg.sampled_pass1_k > 0) + bool(measure_drafter)
    bar = tqdm(total=len(todo) * parts, desc="eval", unit="part", disable=None, dynamic_ncols=True)

    def doing(name: str, what: str) -> None:
        bar.set_postfix_str(f"{name}: {what}")

    try:
        for i, name in enumerate(todo):
            path = checkpoints[name]
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = None
            config = _model_config(path) if own_engine and i > 0 else served
            if config != served:
                # A weight sync carries weights only: another config (routing, scaling, sizes) needs its own engine,
                # or this checkpoint would run under the first one's settings
                engine.close()
                engine = VLLMColocateEngine(path, max_model_len=cfg.max_model_len)
                served = config
            elif i > 0 or not own_engine:
                model = DeepseekV3ForCausalLMWithMTP.from_pretrained(path)
                engine.sync_weights(weights_for_engine(model, engine))
            doing(name, f"greedy pass@1 on {len(prompts)} problems")
            res = evaluate_accuracy(engine, tokenizer, prompts, answers, k=1, temperature=0.0,
                                    max_tokens=cfg.max_tokens, keep_token_ids=measure_drafter and cfg.sampled_pass1_k == 0)
            drafted_on, answers_ids = "greedy answers", res.pop("token_ids", None)
            bar.update(1)
            if cfg.k > 1:
                doing(name, f"pass@{cfg.k} / maj@{cfg.k}")
                sampled = evaluate_accuracy(engine, tokenizer, prompts, answers, k=cfg.k, temperature=1.0,
                                            max_tokens=cfg.max_tokens)
                res[f"pass@{cfg.k}"], res[f"maj@{cfg.k}"] = sampled[f"pass@{cfg.k}"], sampled[f"maj@{cfg.k}"]
                bar.update(1)
            if cfg.sampled_pass1_k > 0:  # DeepSeek-R1 §3.1: pass@1 = mean correctness of k samples
                doing(name, f"sampled pass@1 ({cfg.sampled_pass1_k} per problem)")
                r1 = evaluate_accuracy(engine, tokenizer, prompts, answers, k=cfg.sampled_pass1_k,
                                       temperature=cfg.sampled_temperature, top_p=cfg.sampled_top_p,
                                       max_tokens=cfg.max_tokens, keep_token_ids=measure_drafter)
                if measure_drafter:
                    answers_ids = r1["token_ids"]
                    drafted_on = (f"sampled pass@1 answers ({cfg.sampled_pass1_k} per problem, T "
                                  f"{cfg.sampled_temperature}, top-p {cfg.sampled_top_p})")
                res["sampled_pass1"] = {"pass@1": r1["mean_correct"], "k": cfg.sampled_pass1_k,
                                        "temperature": cfg.sampled_temperature, "top_p": cfg.sampled_top_p,
                                        "fraction_correct": r1["fraction_correct"]}
                bar.update(1)
            if measure_drafter:
                doing(name, "MTP drafter on the answers")
                model = model or DeepseekV3ForCausalLMWithMTP.from_pretrained(path)
                if model.mtp_layers:
                    counts = drafter_hits(model.eval(), answers_ids["prompts"], answers_ids["completions"])
                    hits, drafts = sum(h for h, _ in counts), sum(n for _, n in counts)
                    res["mtp_acceptance"] = {"rate": hits / max(drafts, 1), "drafts": drafts, "on": drafted_on,
                                             "per_problem": [h / n if n else None for h, n in counts]}
                bar.update(1)
            res.update({"checkpoint": path, "dataset": f"{cfg.dataset_name}:{cfg.dataset_split}", "settings": settings})
            if groups is not None:
                res["groups"] = groups  # what each problem asks: the report's intervals are over these
            atomic_write_bytes(out / f"{name}.json", (json.dumps(res, indent=2) + "\n").encode())  # whole or absent
            sampled_note = (f", pass@{cfg.k} {res[f'pass@{cfg.k}']:.3f}, maj@{cfg.k} {res[f'maj@{cfg.k}']:.3f} (T=1.0)"
                            if cfg.k > 1 else "")
            sampled_note += (f", sampled pass@1 {res['sampled_pass1']['pass@1']:.3f} (k={cfg.sampled_pass1_k}, "
                             f"T={cfg.sampled_temperature})" if "sampled_pass1" in res else "")
            if "mtp_acceptance" in res:
                measured = res["mtp_acceptance"]
                sampled_note += f", MTP drafts accepted {measured['rate']:.3f} of {measured['drafts']}"
            tqdm.write(f"[eval] {name}: accuracy {res['accuracy']:.3f}{sampled_note} on {res['n']} problems")
            results[name] = res
    finally:
        bar.close()
        if own_engine and todo:
            engine.close()
    return {name: results[name] for name in names}


def _finished(path: Path, checkpoint: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The results an earlier run wrote for `checkpoint` under the same `settings`, or None."""
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return (res if isinstance(res, dict) and res.get("checkpoint") == checkpoint and res.get("settings") == settings
            and "accuracy" in res else None)
