"""SFT throughput: our sample-masked SFT (packing + MTP + balancing) vs TRL's SFTTrainer.

Same model weights, same data (the built-in task's two SFT sample types, report §5.1), same row
length and tokens per optimizer step, fp32 on CPU, in one process. Variants:

  ours            posttrain.sft: BFD packing, MTP (λ=0.3), balancing (γ, seq-wise α) — what `sft` runs
  ours-no-mtp     the same with mtp_loss_weight=0 (the MTP block is not run)
  trl-packed      trl.SFTTrainer, packing=True, packing_strategy="bfd" (padding-free: each batch is one
                  flattened row with position_ids), assistant_only_loss
  trl-packed-seg  trl-packed with our CPU attention kernel (attn_implementation="sdpa_segmented"), to
                  separate what the kernel buys from what the trainer does
  trl-padded      trl.SFTTrainer without packing: samples padded per batch, attention_mask

Throughput counts real (non-pad) tokens over the timed steps (after warm-up), per wall-clock second
and per CPU second of this process (robust when the machine is shared; with one torch thread the
two agree on an idle machine); median of `--repeats` interleaved runs. The pad fraction is pad
tokens / tokens the model processed.

    python benchmarks/bench_sft.py                      # tiny preset, 3 repeats
    python benchmarks/bench_sft.py --preset small --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402


def arith_messages(n: int, seed: int = 0) -> list[dict]:
    """Messages only: TRL's SFTTrainer gets the same columns as ours."""
    from data_pipelines.arith_task import sft_rows

    return [{"messages": r["messages"]} for r in sft_rows(n, seed)]


class Meter:
    """Wraps a collator: records real / total tokens of every batch, in order."""

    def __init__(self, collator, kind: str):
        self.collator, self.kind, self.batches = collator, kind, []

    def __call__(self, examples):
        batch = self.collator(examples)
        ids = batch["input_ids"]
        if "token_mask" in batch:
            real = int(batch["token_mask"].sum())
        elif "attention_mask" in batch:
            real = int(batch["attention_mask"].sum())
        else:  # TRL padding-free: one flattened row, no padding
            real = ids.numel()
        self.batches.append((real, ids.numel()))
        return batch


def _timing_callback(times: list[tuple[float, float]]):
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append((time.perf_counter(), time.process_time()))

    return StepTimes()


def _result(meter: Meter, times: list[tuple[float, float]], warmup: int) -> dict:
    # times[0] is the start, times[i] the end of step i (from 1), which trains on meter.batches[i - 1]; the
    # dataloader collates one batch ahead, so the meter's last batch was never trained on
    steps = len(times) - 1 - warmup
    trained = meter.batches[: len(times) - 1]
    timed = trained[warmup:]  # the batches of steps warmup + 1 .. the last
    real = sum(r for r, _ in timed)
    total = sum(t for _, t in timed)
    dt = times[-1][0] - times[warmup][0]
    cpu = times[-1][1] - times[warmup][1]
    all_real = sum(r for r, _ in trained)
    all_total = sum(t for _, t in trained)
    return {
        "tokens_per_s": real / dt,
        "tokens_per_cpu_s": real / cpu,
        "step_s": dt / steps,
        "tokens_per_step": real / steps,
        "pad_fraction": 1 - all_real / all_total,
        "timed_pad_fraction": 1 - real / total,
    }


def _train_timed(trainer, label: str, warmup: int) -> dict:
    """Train with the token meter on the collator and per-step wall/CPU times; the same for every variant."""
    meter = Meter(trainer.data_collator, label)
    trainer.data_collator = meter
    times: list[tuple[float, float]] = []
    trainer.add_callback(_timing_callback(times))
    times.append((time.perf_counter(), time.process_time()))
    trainer.train()
    return _result(meter, times, warmup)


def run_ours(model_dir, data_file, out, *, steps, rows, max_length, mtp: bool, warmup: int) -> dict:
    from posttrain.recipe import build_config
    from posttrain.sft import SFTRecipeConfig, build_trainer

    cfg = build_config(SFTRecipeConfig, dict(
        model_name_or_path=str(model_dir), dataset_name=str(data_file), output_dir=str(out),
        max_steps=steps, per_device_train_batch_size=rows, max_length=max_length, learning_rate=1e-4,
        logging_steps=10, save_strategy="no", save_final_model=False, disable_tqdm=True, seed=0,
        mtp_loss_weight=0.3 if mtp else 0.0, bias_update_speed=1e-3, seq_balance_alpha=1e-4,
        balance_history_interval=0, dataloader_pin_memory=False,
    ))
    return _train_timed(build_trainer(cfg), "ours", warmup)


def run_trl(model_dir, ds, out, *, steps, batch, max_length, packing: bool, warmup: int, attn: str = "sdpa") -> dict:
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from posttrain.modeling import DeepseekV3ForCausalLMWithMTP

    tok = AutoTokenizer.from_pretrained(model_dir)
    if attn == "sdpa_segmented":
        from posttrain.sft.attention import register_segmented_sdpa

        register_segmented_sdpa()
    model = DeepseekV3ForCausalLMWithMTP.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    args = SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, max_length=max_length,
        packing=packing, packing_strategy="bfd", assistant_only_loss=True, bf16=False,
        gradient_checkpointing=False, learning_rate=1e-4, logging_steps=10, save_strategy="no",
        report_to="none", disable_tqdm=True, seed=0, dataloader_pin_memory=False,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": 1e-5},
    )
    return _train_timed(SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok), "trl", warmup)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=14, help="optimizer steps per run (the first --warmup untimed)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--rows", type=int, default=4, help="packed rows of max_length per step")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--samples", type=int, default=800)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: shared 2-core machine)")
    p.add_argument("--variants", default="ours,ours-no-mtp,trl-packed,trl-packed-seg,trl-padded")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import datasets
    from transformers import AutoTokenizer

    from posttrain.model_init import init_model

    work = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    try:
        model_dir = init_model(a.preset, work / "model", seed=0)
        rows = arith_messages(a.samples)
        data_file = work / "train.jsonl"
        data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        ds = datasets.Dataset.from_list(rows)
        tok = AutoTokenizer.from_pretrained(model_dir)
        lengths = [len(tok.apply_chat_template(r["messages"], return_dict=True)["input_ids"]) for r in rows]
        mean_len = sum(lengths) / len(lengths)
        # the padded baseline gets as many samples per step as fit the packed rows' tokens
        pad_batch = max(1, round(a.rows * a.max_length * 0.97 / mean_len))
        variants = [v.strip() for v in a.variants.split(",") if v.strip()]
        results: dict[str, list[dict]] = {v: [] for v in variants}
        common = dict(steps=a.steps, max_length=a.max_length, warmup=a.warmup)
        for rep in range(a.repeats):
            for v in variants:
                out = work / f"{v}-{rep}"
                if v == "ours":
                    r = run_ours(model_dir, data_file, out, rows=a.rows, mtp=True, **common)
                elif v == "ours-no-mtp":
                    r = run_ours(model_dir, data_file, out, rows=a.rows, mtp=False, **common)
                elif v == "trl-packed":
                    r = run_trl(model_dir, ds, out, batch=a.rows, packing=True, **common)
                elif v == "trl-packed-seg":
                    r = run_trl(model_dir, ds, out, batch=a.rows, packing=True, attn="sdpa_segmented", **common)
                elif v == "trl-padded":
                    r = run_trl(model_dir, ds, out, batch=pad_batch, packing=False, **common)
                else:
                    raise SystemExit(f"unknown variant {v}")
                results[v].append(r)
                print(f"[{rep}] {v:14s} {r['tokens_per_s']:8.0f} tok/s {r['tokens_per_cpu_s']:8.0f} tok/cpu-s  "
                      f"step {r['step_s']:.3f}s  "
                      f"tokens/step {r['tokens_per_step']:.0f}  pad {r['pad_fraction']:.3f}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        summary = {}
        for v, rs in results.items():
            summary[v] = {
                "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rs),
                "tokens_per_s_all": [round(r["tokens_per_s"], 1) for r in rs],
                "tokens_per_cpu_s_median": statistics.median(r["tokens_per_cpu_s"] for r in rs),
                "tokens_per_cpu_s_all": [round(r["tokens_per_cpu_s"], 1) for r in rs],
                "pad_fraction": statistics.median(r["pad_fraction"] for r in rs),
                "tokens_per_step": statistics.median(r["tokens_per_step"] for r in rs),
            }
        print(f"\npreset={a.preset} rows={a.rows}x{a.max_length} padded batch={pad_batch} samples "
              f"(mean {mean_len:.0f} tokens) threads={a.threads} repeats={a.repeats} "
              f"steps={a.steps} (warm-up {a.warmup})")
        print(f"{'variant':15s} {'tok/s':>7s} {'tok/cpu-s':>9s} {'pad':>6s} {'vs trl-packed':>14s} "
              f"{'vs trl-padded':>14s}   (ratios: wall / cpu)")
        for v, s in summary.items():
            def rel(ref, s=s):
                if ref not in summary:
                    return "-"
                w = s["tokens_per_s_median"] / summary[ref]["tokens_per_s_median"]
                c = s["tokens_per_cpu_s_median"] / summary[ref]["tokens_per_cpu_s_median"]
                return f"{w:.2f}/{c:.2f}x"
            print(f"{v:15s} {s['tokens_per_s_median']:7.0f} {s['tokens_per_cpu_s_median']:9.0f} "
                  f"{s['pad_fraction']:6.3f} {rel('trl-packed'):>14s} {rel('trl-padded'):>14s}")
        if a.json:
            meta = {"preset": a.preset, "rows": a.rows, "max_length": a.max_length, "pad_batch": pad_batch,
                    "threads": a.threads, "repeats": a.repeats, "steps": a.steps, "warmup": a.warmup,
                    "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__}
            Path(a.json).write_text(json.dumps({"meta": meta, "summary": summary}, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
