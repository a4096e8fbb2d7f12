"""The V3-based reward model as a reward function (DeepSeek-V3 report §5.2.1, "Model-Based RM").

Two ways to turn a DeepSeek-V3-architecture model into rewards, both with TRL's reward contract
``f(prompts, completions, **columns) -> list[float | None]``:

* :class:`RewardModelScorer` — a scalar reward model (``DeepseekV3ForSequenceClassification``,
  ``num_labels=1``, trained by ``dsv3-posttrain rm train``). Each row is the conversation
  ``prompt + [assistant: completion]`` through the tokenizer's chat template — the format the RM
  was trained on — and the score is the head's output at the last non-pad token (raw Bradley–Terry
  logit; GRPO normalises within each group anyway). Usable as the spec ``reward_model:PATH``
  (``reward_model:PATH(batch_size=16, sigmoid=True)``), e.g. in a GRPO recipe's ``reward_funcs``.
* :class:`GenerativeJudge` — a V3 chat model asked through vLLM for a rationale and a verdict
  ``Score: N/10`` (the report's RM writes the chain-of-thought leading to the reward); the last
  ``Score:`` in the answer, divided by its scale, is the reward in [0, 1]. An answer without a
  parseable score is a failure: None under ``policy="skip"`` (the suite counts None rows), a
  :class:`RewardError` naming the row under ``policy="error"``.

This module never imports ``posttrain`` or ``data_pipelines`` (see the package docstring); the judge's
engine comes from ``engines.vllm_engine``. torch, transformers and vLLM are imported lazily so
``import rewards`` stays light.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import RewardError
from .text import _content_text, completion_text

__all__ = [
    "SPEC_PREFIX",
    "RewardModelScorer",
    "GenerativeJudge",
    "load_reward_model",
    "clear_reward_model_cache",
    "parse_judge_score",
    "resolve_spec",
    "conversation",
]

SPEC_PREFIX = "reward_model:"

_CACHE: dict[tuple[str, str, str], tuple[Any, Any]] = {}
_CACHE_LOCK = threading.Lock()


# --- conversations -----------------------------------------------------------------------------
def _prompt_messages(prompt: Any, row: int) -> list[dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, dict):
        prompt = [prompt]
    if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return [{"role": str(m["role"]), "content": _content_text(m.get("content"))} for m in prompt]
    raise RewardError(f"reward_model: row {row}: prompt must be text or chat messages, got {type(prompt).__name__}")


def conversation(prompt: Any, completion: Any, row: int = 0) -> list[dict[str, str]]:
    """``prompt`` (text or messages) + ``completion`` (text or TRL conversational messages) as one chat:
    the completion is the final assistant turn. Training (``posttrain.rm``) builds the same."""
    return _prompt_messages(prompt, row) + [{"role": "assistant", "content": completion_text(completion)}]


# --- loading -----------------------------------------------------------------------------------
def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(device: str, path: Any) -> str:
    """`device` if torch can place the model there; a RewardError naming it otherwise (a typo or
    `cuda` on a machine without CUDA would otherwise fail deep inside `model.to`)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RewardError(f"reward_model: {path}: device {device!r}: {e}") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise RewardError(f"reward_model: {path}: device {device!r}, but torch sees "
                          f"{torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s)")
    return device


def load_reward_model(path: str | os.PathLike, device: str | None = None, dtype: str = "float32"
                      ) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a reward-model directory, loaded once per (path, device, dtype)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise RewardError(f"reward_model: {path} is not a model directory (no config.json); train one with "
                          "`dsv3-posttrain rm train`")
    device = _check_device(device or _default_device(), path)
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise RewardError(f"reward_model: {path}: dtype must name a torch floating-point type (float32, bfloat16, "
                          f"float16), got {dtype!r}")
    key = (str(p.resolve()), device, dtype)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
        config = AutoConfig.from_pretrained(p)
        archs = list(getattr(config, "architectures", None) or [])
        if not any(a.endswith("ForSequenceClassification") for a in archs) or getattr(config, "num_labels", 1) != 1:
            raise RewardError(f"reward_model: {path} is not a scalar reward model (architectures {archs}, "
                              f"num_labels {getattr(config, 'num_labels', None)}); expected "
                              "*ForSequenceClassification with num_labels=1 from `dsv3-posttrain rm train`")
        try:
            tokenizer = AutoTokenizer.from_pretrained(p)
        except (OSError, ValueError) as e:
            raise RewardError(f"reward_model: {path}: cannot load its tokenizer: {e}") from None
        try:
            model = AutoModelForSequenceClassification.from_pretrained(p, dtype=torch_dtype)
        except OSError as e:  # no or unreadable weight files: an unfinished or copied-in-part directory
            raise RewardError(f"reward_model: {path}: cannot load its weights: {e}") from None
        model.to(device).eval()
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            # The head reads the last non-pad token, which needs the pad id (see posttrain/rm/model.py).
            model.config.pad_token_id = tokenizer.pad_token_id
        _CACHE[key] = (model, tokenizer)
        return model, tokenizer


def clear_reward_model_cache() -> None:
    """Forget every loaded reward model (frees their memory once no scorer holds them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# --- the scalar reward model -------------------------------------------------------------------
class RewardModelScorer:
    """Scores completions with a scalar V3 reward model (report §5.2.1): one float per completion.

    Args:
        path: a reward-model directory (``dsv3-posttrain rm train`` output).
        batch_size: rows per forward pass (rows are length-sorted to pad little).
        device: ``"cpu"``, ``"cuda"``, … (default: cuda when available).
        max_length: longest tokenized conversation; longer ones keep their first token (BOS) and
            their last ``max_length - 1`` tokens, because the head reads the end (the answer and
            end-of-turn token). Default: the model's ``max_position_embeddings``.
        sigmoid: return ``sigmoid(score)`` in (0, 1) instead of the raw Bradley–Terry logit.
        dtype: weight dtype to load (``float32`` on CPU).
    """

    __name__ = "reward_model"

    def __init__(self, path: str | os.PathLike, batch_size: int = 16, device: str | None = None,
                 max_length: int | None = None, sigmoid: bool = False, dtype: str = "float32",
                 show_progress: bool = False, *, model: Any = None, tokenizer: Any = None) -> None:
        if batch_size < 1:
            raise RewardError(f"reward_model: batch_size must be >= 1, got {batch_size}")
        self.path = str(path)
        if model is None:
            model, tokenizer = load_reward_model(path, device, dtype)
        elif tokenizer is None:
            raise RewardError("reward_model: a model passed in needs its tokenizer")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.sigmoid, self.show_progress = batch_size, sigmoid, show_progress
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_length = max_length if max_length is not None else (limit or 4096)  # 0 is refused below, not unset
        if self.max_length < 2:
            raise RewardError(f"reward_model: max_length must be >= 2, got {max_length}")

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, **kwargs: Any) -> RewardModelScorer:
        """A scorer around an already loaded model (e.g. right after training)."""
        return cls(getattr(model, "name_or_path", "<in-memory>"), model=model, tokenizer=tokenizer, **kwargs)

    def encode(self, prompt: Any, completion: Any, row: int = 0) -> list[int]:
        """Token ids of one row: the chat template over prompt + completion (as at training)."""
        ids = self.tokenizer.apply_chat_template(conversation(prompt, completion, row), tokenize=True,
                                                 return_dict=True)["input_ids"]
        ids = list(ids)
        if len(ids) > self.max_length:
            ids = ids[:1] + ids[len(ids) - self.max_length + 1:]
        return ids

    def score(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[float]:
        """One score per (prompt, completion) row."""
        import torch

        if len(prompts) != len(completions):
            raise RewardError(f"reward_model: {len(prompts)} prompts for {len(completions)} completions")
        encoded = [self.encode(p, c, i) for i, (p, c) in enumerate(zip(prompts, completions))]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        out: list[float] = [0.0] * len(encoded)
        batches = [order[k:k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        if self.show_progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="reward model", unit="batch")
        for idx in batches:
            width = max(len(encoded[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # right padding; the head takes the last non-pad token
                input_ids[r, :len(encoded[i])] = torch.tensor(encoded[i])
                mask[r, :len(encoded[i])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                    use_cache=False).logits
            values = logits.float().reshape(len(idx)).cpu().tolist()
            for i, v in zip(idx, values):
                out[i] = _sigmoid(v) if self.sigmoid else float(v)
        return out

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        return self.score(prompts, completions)

    def __repr__(self) -> str:
        return f"RewardModelScorer({self.path!r}, batch_size={self.batch_size}, max_length={self.max_length})"


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def resolve_spec(spec: str, params: dict[str, Any] | None = None) -> RewardModelScorer:
    """``reward_model:PATH`` (+ keyword arguments) → a :class:`RewardModelScorer`; the model itself is
    cached per path, so every spec naming one directory shares one copy."""
    path = spec[len(SPEC_PREFIX):] if spec.startswith(SPEC_PREFIX) else spec
    if not path.strip():
        raise RewardError(f"reward spec {spec!r}: expected reward_model:PATH (a `dsv3-posttrain rm train` output)")
    try:
        return RewardModelScorer(path.strip(), **(params or {}))
    except TypeError as e:
        raise RewardError(f"reward spec {spec!r}: {e}") from None


# --- the generative judge ----------------------------------------------------------------------
JUDGE_PROMPT = (
    "You are a strict grader. Read the question and the response below. Think step by step about "
    "whether the response is correct and well reasoned, then end your answer with a final line of "
    "the form 'Score: N/10', where N is from 0 (wrong) to 10 (fully correct).\n\n"
    "Question:\n{question}\n\nResponse:\n{response}"
)

_NUM = r"[-+]?\d+(?:\.\d+)?"
_SCORE_RE = re.compile(rf"score\W{{0,4}}\s*[:=]\s*\**\s*({_NUM})(?:\s*(?:/|out of)\s*({_NUM}))?", re.IGNORECASE)


def parse_judge_score(text: str, max_score: float = 10.0) -> float | None:
    """The last ``Score: N`` (``Score: N/M``, ``**Score:** N out of M``) in ``text`` as ``N / M`` in [0, 1]
    (``M`` defaults to ``max_score``); None when there is none or it falls outside [0, M]."""
    if not isinstance(text, str):
        return None
    matches = list(_SCORE_RE.finditer(text))
    if not matches:
        return None
    value, scale = matches[-1].group(1), matches[-1].group(2)
    n, m = float(value), float(scale) if scale else float(max_score)
    if m <= 0 or not 0.0 <= n <= m:
        return None
    return n / m


def _judge_question(prompt: Any) -> str:
    msgs = _prompt_messages(prompt, 0)
    users = [m["content"] for m in msgs if m["role"] == "user"]
    return users[-1] if users else "\n".join(m["content"] for m in msgs)


GenerateFn = Callable[[list[list[dict[str, str]]]], list[str]]


class GenerativeJudge:
    """A V3 chat model as a judge through vLLM: it writes a rationale and ``Score: N/10``; the reward is
    the parsed score / 10 (see :func:`parse_judge_score`).

    Args:
        model_path: a V3 chat checkpoint vLLM can serve.
        policy: ``"skip"`` (unparseable answer → None for that row) or ``"error"`` (:class:`RewardError`
            naming the row and quoting the answer).
        max_score: the scale when the judge writes ``Score: N`` without ``/M``.
        prompt_template: the judge's user message, with ``{question}`` and ``{response}``.
        max_tokens, temperature, seed: sampling of the judge's answer (greedy by default).
        max_model_len: vLLM context length; rows whose judge prompt leaves no room for ``max_tokens``
            fail by the policy (named in the error).
        generate: a function ``list[messages] -> list[str]`` used instead of vLLM (tests, other backends).
        llm: an existing ``vllm.LLM`` to use instead of starting one.
        llm_kwargs: extra ``vllm.LLM`` arguments.
    """

    __name__ = "generative_judge"

    def __init__(self, model_path: str | None = None, *, policy: str = "skip", max_score: float = 10.0,
                 prompt_template: str = JUDGE_PROMPT, max_tokens: int = 256, temperature: float = 0.0,
                 seed: int = 0, max_model_len: int = 1024, dtype: str | None = None,
                 generate: GenerateFn | None = None, llm: Any = None, llm_kwargs: dict[str, Any] | None = None
                 ) -> None:
        if policy not in ("skip", "error"):
            raise RewardError(f"generative_judge: policy must be 'skip' or 'error', got {policy!r}")
        if model_path is None and generate is None and llm is None:
            raise RewardError("generative_judge: give model_path (or a generate function / vllm.LLM)")
        if "{question}" not in prompt_template or "{response}" not in prompt_template:
            raise RewardError("generative_judge: prompt_template needs {question} and {response}")
        self.model_path, self.policy, self.max_score = model_path, policy, max_score
        self.prompt_template = prompt_template
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.max_model_len, self.dtype = max_model_len, dtype
        self.llm_kwargs = dict(llm_kwargs or {})
        self._generate, self._llm = generate, llm
        self._owns_llm = False
        self.last_answers: list[str | None] = []  # the judge's raw texts of the latest call (for inspection)

    # vLLM ------------------------------------------------------------------------------------
    def _engine(self) -> Any:
        if self._llm is None:
            self._llm = _start_vllm(str(self.model_path), self.max_model_len, self.seed, self.dtype, self.llm_kwargs)
            self._owns_llm = True
        return self._llm

    def _vllm_generate(self, chats: list[list[dict[str, str]]]) -> list[str | None]:
        from engines import SamplingSettings
        from engines.vllm_engine import chat_completions, chat_prompt_lengths

        llm = self._engine()
        budget = self.max_model_len - self.max_tokens
        out: list[str | None] = [None] * len(chats)
        fits = [i for i, n in enumerate(chat_prompt_lengths(llm, chats)) if n <= budget]
        if fits:
            sampling = SamplingSettings(temperature=self.temperature, max_tokens=self.max_tokens, seed=self.seed)
            for i, (c,) in zip(fits, chat_completions(llm, [chats[i] for i in fits], 1, sampling)):
                out[i] = c.text
        return out

    def close(self) -> None:
        """Stop the vLLM engine this judge started (one passed in as `llm` is left running)."""
        llm, self._llm = self._llm, None
        if llm is not None and self._owns_llm:
            from engines.vllm_engine import shutdown_llm

            shutdown_llm(llm)

    # the reward ------------------------------------------------------------------------------
    def judge_messages(self, prompt: Any, completion: Any) -> list[dict[str, str]]:
        """The chat sent to the judge for one row."""
        text = self.prompt_template.format(question=_judge_question(prompt), response=completion_text(completion))
        return [{"role": "user", "content": text}]

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        if len(prompts) != len(completions):
            raise RewardError(f"generative_judge: {len(prompts)} prompts for {len(completions)} completions")
        chats = [self.judge_messages(p, c) for p, c in zip(prompts, completions)]
        answers: list[str | None] = list(self._generate(chats) if self._generate else self._vllm_generate(chats))
        if len(answers) != len(chats):
            raise RewardError(f"generative_judge: the judge returned {len(answers)} answers for {len(chats)} rows")
        self.last_answers = answers
        scores: list[float | None] = []
        for i, answer in enumerate(answers):
            s = parse_judge_score(answer, self.max_score) if answer is not None else None
            if s is None and self.policy == "error":
                why = ("no answer (the judge prompt does not fit max_model_len - max_tokens)" if answer is None
                       else f"no 'Score: N/{self.max_score:g}' in the judge's answer {answer[-200:]!r}")
                raise RewardError(f"generative_judge: row {i}: {why}")
            scores.append(s)
        return scores


def _start_vllm(model_path: str, max_model_len: int, seed: int, dtype: str | None, extra: dict[str, Any]) -> Any:
    """The judge's `vllm.LLM` (engines.vllm_engine.make_llm: the CPU fixes, fp32 on CPU unless `dtype` says
    otherwise); a path vLLM cannot serve is a RewardError."""
    from engines.vllm_engine import make_llm

    try:
        return make_llm(model_path, max_model_len=max_model_len, seed=seed, dtype=dtype, **extra)
    except Exception as e:  # vLLM raises many types for a path it cannot serve
        raise RewardError(f"generative_judge: vLLM could not load {model_path}: {type(e).__name__}: {e}") from e
