"""SFT samples: rows of TRL's conversational (`messages`) or prompt-completion (`prompt` + `completion`)
formats → token ids and labels, with the loss on assistant / completion tokens only.

As in TRL's SFTTrainer, messages reach the chat template with all their keys (`tool_calls`,
`reasoning_content`, ...), with a row's `tools` and `chat_template_kwargs` columns; a tool call or tool
result the template does not render makes the row a bad row rather than a sample trained without it.

Labels are unshifted (transformers' convention: `labels[j]` is the target of position j-1), -100 where
there is no loss. The first token of every sample is never a target, so once samples are packed no
sample's loss depends on the sample before it. Samples longer than `max_length` are dropped or
truncated; bad rows raise a `DataError` naming the row, or are skipped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from trl.data_utils import common_prefix_length

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
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"{what} message {i} is not a {{'role': str, 'content': str}} dict"
        calls = m.get("tool_calls")
        if calls is not None:
            if not isinstance(calls, (list, tuple)) or not all(isinstance(c, dict) for c in calls):
                return f"{what} message {i}: 'tool_calls' is not a list of {{'type': 'function', ...}} dicts"
            if calls and m["role"] != "assistant":
                return f"{what} message {i} (role {m['role']!r}) has tool_calls; only assistant messages call tools"
            if any(not isinstance(_call_name(c), str) for c in calls):
                return f"{what} message {i}: a tool call has no function name"
        # content may be null in an assistant message that calls tools (the OpenAI form)
        if not isinstance(m.get("content"), str) and not (m.get("content") is None and calls):
            return f"{what} message {i} is not a {{'role': str, 'content': str}} dict"
        if m["role"] not in CHAT_ROLES:
            return f"{what} message {i} has unknown role {m['role']!r}"
    return None


def _call_name(call: dict) -> Any:
    fn = call.get("function")
    return fn.get("name") if isinstance(fn, dict) else call.get("name")


def _drop_nulls(value: Any) -> Any:
    """`value` without the dict keys whose value is null, at every depth."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_nulls(v) for v in value]
    return value


def _clean(messages: Any) -> list[dict[str, Any]]:
    """The messages as the chat template gets them (as in TRL, every key is passed on: tool_calls,
    reasoning_content, name, ...), less the null keys Arrow adds to each message from the keys of other rows'
    messages (a `'tool_calls': None` is a tool call to templates that test `'tool_calls' in message`).
    `content` is kept even when null (an assistant message that only calls tools), and an empty `tool_calls`
    list is dropped (DeepSeek-V3's template renders an assistant turn's content within its calls, so none with
    no calls). In tool calls, nulls are dropped at every depth too: Arrow also unions the argument dicts of every
    call in the dataset (give `arguments` as a JSON string, the OpenAI form, to keep null argument values)."""
    out = []
    for m in messages:
        c = {k: v for k, v in m.items() if v is not None}
        c["content"] = m.get("content")
        if "tool_calls" in c:
            c["tool_calls"] = _drop_nulls(c["tool_calls"])
            if not c["tool_calls"]:  # no calls: templates that test `'tool_calls' in message` would drop the content
                del c["tool_calls"]
        out.append(c)
    return out


# apply_chat_template arguments this module sets itself; a row's chat_template_kwargs may not override them
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tools", "chat_template", "add_generation_prompt", "continue_final_message",
    "tokenize", "padding", "truncation", "max_length", "return_tensors", "return_dict", "return_assistant_tokens_mask",
    "tokenizer_kwargs",
})


def _row_template_kwargs(row: dict[str, Any]) -> dict[str, Any]:
    """As TRL 1.16's SFTTrainer (`tokenize_fn` in `_prepare_dataset`): `tools` from the row's `tools` column (a
    JSON string is decoded) and the row's `chat_template_kwargs`, both passed to `apply_chat_template`. Null keys
    (Arrow's union of the rows' dicts) are dropped from both; a JSON string keeps the tools' nulls."""
    import json

    kwargs: dict[str, Any] = {}
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise ValueError(f"'tools' is not valid JSON ({e})") from None
    elif tools is not None:
        tools = _drop_nulls(tools)
    if tools is not None:
        if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
            raise ValueError("'tools' is not a list of tool (JSON schema) dicts")
        kwargs["tools"] = list(tools) or None
    extra = row.get("chat_template_kwargs")
    if extra is not None:
        if not isinstance(extra, dict):
            raise ValueError("'chat_template_kwargs' is not a dict")
        extra = {k: v for k, v in extra.items() if v is not None}
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS & set(extra))
        if reserved:
            raise ValueError(f"'chat_template_kwargs' sets {reserved[0]!r}, which SFT sets itself")
        kwargs.update(extra)
    return kwargs


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

    def __call__(self, row: dict[str, Any], fmt: str) -> tuple[list[int], list[int]]:
        """Raises ValueError with the reason for a bad row."""
        if fmt == "messages":
            return self._messages(row.get("messages"), _row_template_kwargs(row))
        return self._prompt_completion(row.get("prompt"), row.get("completion"), row)

    def _check_tool_turns(self, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> None:
        """A chat template without a tool branch (the embedded one has none) drops tool calls and tool results
        without a word: an assistant turn that only calls a tool would be trained as an empty reply, and the next
        assistant turn without the output it answers. Such rows are refused."""
        results = [i for i, m in enumerate(messages) if m["role"] == "tool" and m["content"].strip()]
        calls = [i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("tool_calls")]
        if not results and not calls:
            return
        # Each call's function name is replaced by a sentinel, so a name that the prompt or the tools' schemas
        # mention does not count as the call rendered (as TRL's `supports_tool_calling`). A null content is
        # rendered as '' here: whether the template can render the row at all is `_render`'s to say.
        probe = [dict(m) for m in messages]
        sentinels: dict[int, list[str]] = {}
        for i in calls:
            probe[i]["tool_calls"] = [dict(c) for c in probe[i]["tool_calls"]]
            if probe[i]["content"] is None:
                probe[i]["content"] = ""
            for j, c in enumerate(probe[i]["tool_calls"]):
                sentinel = f"toolcallprobe{i}x{j}q"
                if isinstance(c.get("function"), dict):
                    c["function"] = {**c["function"], "name": sentinel}
                else:
                    c["name"] = sentinel
                sentinels.setdefault(i, []).append(sentinel)
        text = self._apply(probe, tokenize=False, **kwargs)
        for i in sorted(results + calls):
            if i in sentinels:
                missing = [n for n, s in zip((_call_name(c) for c in messages[i]["tool_calls"]), sentinels[i])
                           if s not in text]
                if missing:
                    raise ValueError(f"message {i} (role 'assistant') calls {missing[0]!r}, and the chat template's "
                                     "rendering has no such call: this tokenizer's template renders no tool calls "
                                     "(the turn would be trained as a reply without its call)")
            elif messages[i]["content"].strip() not in text:
                raise ValueError(f"message {i} (role 'tool') is not in the chat template's rendering: this "
                                 "tokenizer's template has no tool turns")

    def _apply(self, messages, **kwargs):
        import jinja2

        try:
            return self.tok.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)
        except (jinja2.TemplateError, TypeError) as e:  # raise_exception() in the template, or None + str
            raise ValueError(f"the chat template cannot render it ({type(e).__name__}: {e})") from None

    def _render(self, messages, **kwargs) -> dict[str, list[int]]:
        out = self._apply(messages, tokenize=True, return_dict=True, **kwargs)
        return {k: list(v) for k, v in out.items()}

    def _messages(self, messages: Any, kwargs: dict[str, Any]) -> tuple[list[int], list[int]]:
        problem = _message_problem(messages, "messages")
        if problem:
            raise ValueError(problem)
        messages = _clean(messages)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("conversation has no assistant turn (nothing to train on)")
        if self.tok.chat_template is None:
            raise DataError("the tokenizer has no chat template; conversational SFT data needs one")
        self._check_tool_turns(messages, kwargs)
        out = self._render(messages, return_assistant_tokens_mask=self.assistant_only_loss, **kwargs)
        ids = out["input_ids"]
        if self.assistant_only_loss:
            mask = out["assistant_masks"]
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        else:
            labels = list(ids)
        return ids, labels

    def _prompt_completion(self, prompt: Any, completion: Any, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        if prompt is None or completion is None:
            raise ValueError(f"no '{'prompt' if prompt is None else 'completion'}' (null)")
        if isinstance(prompt, str) and isinstance(completion, str):
            return self._text_prompt_completion(prompt, completion)
        elif isinstance(prompt, (list, tuple)) and isinstance(completion, (list, tuple)):
            kwargs = _row_template_kwargs(row)
            problem = _message_problem(prompt, "prompt") or _message_problem(completion, "completion")
            if problem:
                raise ValueError(problem)
            prompt, completion = _clean(prompt), _clean(completion)
            if not any(m["role"] == "assistant" for m in completion):
                raise ValueError("completion has no assistant turn (nothing to train on)")
            self._check_tool_turns(prompt + completion, kwargs)
            p = self._render(prompt, add_generation_prompt=True, **kwargs)["input_ids"]
            out = self._render(prompt + completion, return_assistant_tokens_mask=self.assistant_only_loss, **kwargs)
            ids = out["input_ids"]
            # As TRL: the completion starts where the rendered prompt and prompt+completion diverge.
            n_prompt = common_prefix_length(p, ids)
            if self.assistant_only_loss:
                # As TRL (1.16) too: on top of the completion mask, only assistant turns carry loss (a completion
                # may hold later user turns; without completion_only_loss the prompt's system/user turns would)
                assistant = out["assistant_masks"]
                labels = [t if m and (i >= n_prompt or not self.completion_only_loss) else IGNORE_INDEX
                          for i, (t, m) in enumerate(zip(ids, assistant))]
                return ids, labels
        else:
            raise ValueError("'prompt' and 'completion' must both be strings or both be message lists")
        return ids, self._completion_labels(ids, n_prompt)

    def _text_prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """Plain-text prompt-completion, exactly as TRL 1.16's SFTTrainer (`_prepare_dataset`: `add_eos`, then
        `tokenize_fn`'s prompt-completion case): the EOS token is appended to the completion text unless it already
        ends with it; the prompt and prompt + completion are tokenized with the tokenizer's defaults (special tokens
        included: a BOS where the tokenizer adds one, as DeepSeek-V3's does), and the completion starts where the two
        token sequences diverge (`trl.data_utils.common_prefix_length`: tokens may merge across the boundary)."""
        if self.assistant_only_loss and self.completion_only_loss is False:
            # TRL refuses assistant_only_loss=True for any dataset that is not conversational. Here it is on by
            # default (SFTRecipeConfig), so plain text trains on the completion only, which is the reply; it is an
            # error only where it cannot be honoured: with completion_only_loss=False, which asks for the prompt.
            raise DataError(
                "assistant_only_loss=True (the default) with completion_only_loss=False, but the dataset is plain-text "
                "prompt-completion (not conversational): it has no assistant turns, and training on the prompt too "
                "contradicts assistant-only loss (TRL's SFTTrainer refuses assistant_only_loss=True for a dataset that "
                "is not conversational). Set assistant_only_loss: false to train on prompt and completion, or leave "
                "completion_only_loss unset to train on the completion only."
            )
        eos = self.tok.eos_token
        if eos is None:
            raise DataError("the tokenizer has no eos_token; prompt-completion SFT appends it to each completion")
        if not completion.endswith(eos):
            completion = completion + eos
        p = list(self.tok(text=prompt)["input_ids"])
        ids = list(self.tok(text=prompt + completion)["input_ids"])
        return ids, self._completion_labels(ids, common_prefix_length(p, ids))

    def _completion_labels(self, ids: list[int], n_prompt: int) -> list[int]:
        if self.completion_only_loss:
            return [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        return list(ids)


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
    columns += [c for c in ("tools", "chat_template_kwargs") if c in ds.column_names]  # passed to the template
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
