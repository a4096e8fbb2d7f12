"""SFT samples: rows of TRL's conversational (`messages`) or prompt-completion (`prompt` + `completion`)
formats → token ids and labels, with the loss on assistant / completion tokens only.

Labels are unshifted (transformers' convention: `labels[j]` is the target of position j-1), -100 where
there is no loss. The first token of every sample is never a target, so once samples are packed no
sample's loss depends on the sample before it. Samples longer than `max_length` are dropped or
truncated; bad rows raise a `DataError` naming the row, or are skipped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from data_pipelines.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_BAD_ROWS = 20


@dataclass
class DataStats:
    """What tokenization did to the rows (written to the run summary and logged)."""

    format: str = ""
    rows: int = 0
    kept: int = 0
    bad_rows: int = 0
    too_long: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_target: int = 0
    tokens: int = 0
    target_tokens: int = 0
    bad_examples: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect_format(columns: list[str]) -> str:
    """'messages' or 'prompt_completion'; a `DataError` naming the columns otherwise."""
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    raise DataError(
        f"SFT needs a conversational dataset (a 'messages' column) or a prompt-completion one ('prompt' and "
        f"'completion' columns); columns are: {columns}"
    )


def _message_problem(messages: Any, what: str) -> str | None:
    if messages is None:
        return f"no '{what}' (null)"
    if not isinstance(messages, (list, tuple)) or not messages:
        return f"'{what}' is not a non-empty list of messages"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"{what} message {i} is not a {{'role': str, 'content': str}} dict"
        if m["role"] not in CHAT_ROLES:
            return f"{what} message {i} has unknown role {m['role']!r}"
    return None


def _clean(messages: Any) -> list[dict[str, str]]:
    # Arrow may add null keys of other rows' messages (e.g. tool fields); the template needs role/content.
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class SampleTokenizer:
    """Turns one row into (input_ids, labels) with the model's chat template."""

    def __init__(self, tokenizer, assistant_only_loss: bool = True, completion_only_loss: bool | None = None):
        self.tok = tokenizer
        self.assistant_only_loss = assistant_only_loss
        self.completion_only_loss = True if completion_only_loss is None else completion_only_loss
        self.chat_template = None
        template = getattr(tokenizer, "chat_template", None)
        if assistant_only_loss and template:
            from trl.chat_template_utils import get_training_chat_template, has_generation_markers

            if not has_generation_markers(template):
                # TRL knows the {% generation %} versions of common templates; unknown ones fail clearly.
                try:
                    self.chat_template = get_training_chat_template(tokenizer)
                except Exception as e:  # TRL raises ValueError/NotImplementedError for unknown templates
                    raise DataError(
                        "assistant_only_loss needs a chat template with {% generation %} markers around the "
                        f"assistant turns; this tokenizer's template has none ({e})"
                    ) from None
        self.eos = tokenizer.eos_token_id

    def __call__(self, row: dict[str, Any], fmt: str) -> tuple[list[int], list[int]]:
        """Raises ValueError with the reason for a bad row."""
        if fmt == "messages":
            return self._messages(row.get("messages"))
        return self._prompt_completion(row.get("prompt"), row.get("completion"))

    def _check_tool_turns(self, messages: list[dict[str, str]]) -> None:
        """A chat template without a tool branch (the embedded one has none) drops tool results without a
        word, and the next assistant turn would be trained without the output it answers."""
        tools = [i for i, m in enumerate(messages) if m["role"] == "tool" and m["content"].strip()]
        if not tools:
            return
        text = self.tok.apply_chat_template(messages, tokenize=False, chat_template=self.chat_template)
        dropped = [i for i in tools if messages[i]["content"].strip() not in text]
        if dropped:
            raise ValueError(f"message {dropped[0]} (role 'tool') is not in the chat template's rendering: this "
                             "tokenizer's template has no tool turns")

    def _render(self, messages, **kwargs) -> dict[str, list[int]]:
        out = self.tok.apply_chat_template(
            messages, tokenize=True, return_dict=True, chat_template=self.chat_template, **kwargs
        )
        return {k: list(v) for k, v in out.items()}

    def _messages(self, messages: Any) -> tuple[list[int], list[int]]:
        problem = _message_problem(messages, "messages")
        if problem:
            raise ValueError(problem)
        messages = _clean(messages)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("conversation has no assistant turn (nothing to train on)")
        if self.tok.chat_template is None:
            raise DataError("the tokenizer has no chat template; conversational SFT data needs one")
        self._check_tool_turns(messages)
        out = self._render(messages, return_assistant_tokens_mask=self.assistant_only_loss)
        ids = out["input_ids"]
        if self.assistant_only_loss:
            mask = out["assistant_masks"]
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        else:
            labels = list(ids)
        return ids, labels

    def _prompt_completion(self, prompt: Any, completion: Any) -> tuple[list[int], list[int]]:
        if prompt is None or completion is None:
            raise ValueError(f"no '{'prompt' if prompt is None else 'completion'}' (null)")
        if isinstance(prompt, str) and isinstance(completion, str):
            # TRL's standard prompt-completion: raw text, EOS appended to the completion.
            p = self.tok(prompt, add_special_tokens=False)["input_ids"]
            c = self.tok(completion, add_special_tokens=False)["input_ids"] + [self.eos]
            ids = list(p) + list(c)
            n_prompt = len(p)
        elif isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
            problem = _message_problem(prompt, "prompt") or _message_problem(completion, "completion")
            if problem:
                raise ValueError(problem)
            prompt, completion = _clean(prompt), _clean(completion)
            if not any(m["role"] == "assistant" for m in completion):
                raise ValueError("completion has no assistant turn (nothing to train on)")
            self._check_tool_turns(prompt + completion)
            p = self._render(prompt, add_generation_prompt=True)["input_ids"]
            out = self._render(prompt + completion, return_assistant_tokens_mask=self.assistant_only_loss)
            ids = out["input_ids"]
            # As TRL: the completion starts where the rendered prompt and prompt+completion diverge.
            n_prompt = 0
            while n_prompt < min(len(p), len(ids)) and p[n_prompt] == ids[n_prompt]:
                n_prompt += 1
            if self.assistant_only_loss:
                # As TRL (1.16) too: on top of the completion mask, only assistant turns carry loss (a completion
                # may hold later user turns; without completion_only_loss the prompt's system/user turns would)
                assistant = out["assistant_masks"]
                labels = [t if m and (i >= n_prompt or not self.completion_only_loss) else IGNORE_INDEX
                          for i, (t, m) in enumerate(zip(ids, assistant))]
                return ids, labels
        else:
            raise ValueError("'prompt' and 'completion' must both be strings or both be message lists")
        if self.completion_only_loss:
            labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        else:
            labels = list(ids)
        return ids, labels


def tokenize_dataset(
    ds,
    tokenizer,
    max_length: int,
    truncation: str = "drop",
    on_bad_row: str = "error",
    assistant_only_loss: bool = True,
    completion_only_loss: bool | None = None,
    source: str = "dataset",
    skipped_rows: list[dict[str, str]] | None = None,
):
    """Rows → a `datasets.Dataset` with `input_ids` and `labels`, and the `DataStats`.

    `skipped_rows`: the rows the loader already dropped as unreadable (`load_rows(..., bad_rows=...)` with
    `on_bad_row='skip'`: invalid JSON, a value of another type), counted and reported as bad rows too.
    Raises `DataError` for an empty dataset, an unknown format, a bad row (with `on_bad_row='error'`),
    or when no sample is left.
    """
    import datasets

    from data_pipelines.loading import row_location

    if truncation not in ("drop", "truncate"):
        raise DataError(f"truncation must be 'drop' or 'truncate', got {truncation!r}")
    skipped_rows = list(skipped_rows or [])
    if ds is None or len(ds) == 0:
        if skipped_rows:  # every row was unreadable
            raise DataError(f"{source}: no trainable sample left of {len(skipped_rows)} rows ({len(skipped_rows)} bad; "
                            f"the first, {skipped_rows[0]['location']}: {skipped_rows[0]['reason']})")
        raise DataError(f"{source}: the dataset is empty")
    fmt = detect_format(list(ds.column_names))
    stats = DataStats(format=fmt, rows=len(ds) + len(skipped_rows), bad_rows=len(skipped_rows),
                      bad_examples=skipped_rows[:MAX_REPORTED_BAD_ROWS])
    sample_tok = SampleTokenizer(tokenizer, assistant_only_loss, completion_only_loss)
    columns = ["messages"] if fmt == "messages" else ["prompt", "completion"]
    all_ids: list[list[int]] = []
    all_labels: list[list[int]] = []
    for i, row in enumerate(ds.select_columns(columns)):
        try:
            ids, labels = sample_tok(row, fmt)
            if len(ids) < 2:
                raise ValueError("sample is shorter than 2 tokens")
        except ValueError as e:
            where = row_location(ds, i, source)
            if on_bad_row == "error":
                raise DataError(f"{where}: {e} (set on_bad_row: skip to drop such rows)") from None
            stats.bad_rows += 1
            if len(stats.bad_examples) < MAX_REPORTED_BAD_ROWS:
                stats.bad_examples.append({"location": where, "reason": str(e)})
            continue
        labels[0] = IGNORE_INDEX  # a sample's first token is never a target (packing isolation)
        if len(ids) > max_length:
            stats.too_long += 1
            if truncation == "drop":
                stats.dropped_too_long += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            stats.truncated += 1
        n_target = sum(1 for t in labels if t != IGNORE_INDEX)
        if n_target == 0:
            stats.dropped_no_target += 1
            continue
        all_ids.append(ids)
        all_labels.append(labels)
        stats.tokens += len(ids)
        stats.target_tokens += n_target
    stats.kept = len(all_ids)
    if stats.bad_rows or stats.too_long or stats.dropped_no_target:
        log.warning(
            "SFT data %s: %d rows, %d kept; %d bad rows skipped, %d longer than max_length=%d (%s), "
            "%d without targets dropped",
            source, stats.rows, stats.kept, stats.bad_rows, stats.too_long, max_length,
            f"{stats.dropped_too_long} dropped" if truncation == "drop" else f"{stats.truncated} truncated",
            stats.dropped_no_target,
        )
    if not all_ids:
        raise DataError(
            f"{source}: no trainable sample left of {stats.rows} rows ({stats.bad_rows} bad, "
            f"{stats.dropped_too_long} longer than max_length={max_length}, {stats.dropped_no_target} without targets)"
        )
    return datasets.Dataset.from_dict({"input_ids": all_ids, "labels": all_labels}), stats
