"""Evaluation during training: every N optimizer steps, greedy pass@1 (and pass@k / maj@k) on a
held-out set, through the run's own rollout engine, logged as `eval/accuracy` etc."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from transformers import TrainerCallback

from engines import RolloutEngine
from engines.hf import HFGenerateEngine

from .accuracy import evaluate_accuracy


class EvalCallback(TrainerCallback):
    """Attach with `EvalCallback(...).attach(trainer)`.

    The engine is the trainer's own when it has one (GRPO: the weights are pushed to it first, so
    it evaluates the current policy); otherwise (SFT) transformers `generate` on the model."""

    def __init__(self, prompts: Sequence[Any], answers: Sequence[str], every_n_steps: int, *,
                 max_tokens: int = 128, k: int = 1, engine: RolloutEngine | None = None):
        if every_n_steps <= 0:
            raise ValueError("every_n_steps must be positive")
        self.prompts, self.answers = list(prompts), list(answers)
        self.every_n_steps, self.max_tokens, self.k = every_n_steps, max_tokens, k
        self.engine = engine
        self.trainer = None
        self.history: list[dict[str, Any]] = []

    def attach(self, trainer) -> "EvalCallback":
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def _engine(self) -> RolloutEngine:
        trainer = self.trainer
        if self.engine is not None:
            return self.engine
        if getattr(trainer, "engine", None) is not None and getattr(trainer.engine, "name", "") != "hf":
            trainer.vllm_generation.sync_weights()
            trainer._last_loaded_step = trainer.state.global_step
            return trainer.engine
        tok = trainer.processing_class
        return HFGenerateEngine(trainer.accelerator.unwrap_model(trainer.model), tok.pad_token_id, [tok.eos_token_id])

    def evaluate(self) -> dict[str, Any]:
        res = evaluate_accuracy(self._engine(), self.trainer.processing_class, self.prompts, self.answers,
                                k=1, temperature=0.0, max_tokens=self.max_tokens)
        metrics = {"eval/accuracy": res["accuracy"], "eval/n": res["n"]}
        if self.k > 1:
            sampled = evaluate_accuracy(self._engine(), self.trainer.processing_class, self.prompts, self.answers,
                                        k=self.k, temperature=1.0, max_tokens=self.max_tokens)
            metrics[f"eval/pass@{self.k}"] = sampled[f"pass@{self.k}"]
            metrics[f"eval/maj@{self.k}"] = sampled[f"maj@{self.k}"]
        return metrics

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer is None or state.global_step % self.every_n_steps:
            return control
        metrics = self.evaluate()
        metrics["step"] = state.global_step
        self.history.append(metrics)
        state.log_history.append(dict(metrics))
        return control
