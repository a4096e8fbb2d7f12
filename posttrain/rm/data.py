"""Preference pairs for the reward model: the built-in arithmetic pairs and user datasets.

Every row becomes TRL's *conversational preference* form, which `RewardTrainer` tokenizes with
the chat template (prompt + response as the assistant turn)::

    {"prompt": [{"role": "user", "content": ...}, ...],
     "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}]}

`rewards.reward_model.RewardModelScorer` builds exactly the same conversation at scoring time, so
the RM is trained and applied on one format.

Accepted input columns: `prompt` (text or chat messages), `chosen` and `rejected` (text, or
assistant messages, whose contents are joined into one response), optional `margin` (a number;
TRL's margin loss), and an optional chain-of-thought. Without `prompt`, conversational `chosen` /
`rejected` that share their opening turns give it, as TRL's implicit-prompt format (`extract_prompt`).

**Chain-of-thought** (DeepSeek-V3 report §5.2.1: the RM's preference data "includes the
chain-of-thought leading to the reward"). A scalar RM reads the reasoning that leads to a
response's final answer, so it can reward sound reasoning rather than only the answer. A
dataset may store that reasoning apart from the response (as reasoning APIs return
`reasoning_content`): give it as `rationale: {"chosen": str, "rejected": str}` or as the two
columns `chosen_rationale` / `rejected_rationale`. It is put in front of its response as
`<think>\\n{rationale}\\n</think>\\n\\n{response}` — the R1 format the policy's completions have
when the RM scores them in GRPO. Both sides of a pair must carry one (or neither): if only the
chosen side had reasoning, the RM would learn "has a think block" instead of "is right".
Responses that already contain their `<think>` block (the built-in traces) need no rationale.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import UserError

log = logging.getLogger(__name__)

BUILTIN_NAME = "builtin:arith-preferences"
_ROLES = {"system", "user", "assistant", "tool"}


# --- the built-in pairs ------------------------------------------------------------------------
ERROR_KINDS = ("operation", "misread", "mixed")


def _flip_operation(row: Mapping[str, Any], rng: random.Random) -> tuple[dict[str, Any], str] | None:
    """The row with one `+`/`-` step replaced by the opposite operation (every intermediate value
    staying >= 0, so no negative number gives the error away), and the original op of that step."""
    from data_pipelines.arith_task import evaluate

    ops, operands = list(row["ops"]), list(row["operands"])
    options = []
    for j, op in enumerate(ops):
        if op == "*":
            continue
        flipped = ops[:j] + ["-" if op == "+" else "+"] + ops[j + 1:]
        if all(evaluate(operands[:k + 2], flipped[:k + 1]) >= 0 for k in range(len(flipped))):
            options.append((flipped, op))
    if not options:
        return None
    flipped, op = rng.choice(options)
    return {**row, "ops": flipped}, op


def arith_preference_pairs(split: str = "train", n: int = 256, seed: int = 0, errors: str = "operation",
                           balanced: bool = False, **difficulty: Any) -> list[dict[str, Any]]:
    """`n` preference pairs on the built-in task's `split` (train / validation / test hold disjoint
    problems). `chosen` is the scripted teacher's correct R1-style trace (`scripted_trace`); `rejected`
    is a wrong trace for the same problem, wrong in one of two ways (`errors`):

    * `"operation"`: the trace adds where the problem takes away (or the reverse) in one step and
      carries that through consistently — every step and self-check is internally right, only the
      problem text says which operation was asked for, and the final answer is wrong for the
      problem's operands. A step is only flipped where no intermediate value turns negative, so
      naturally more subtractions become additions than the reverse (about 2:1) and a prompt-blind
      "the subtracting trace wins" rule scores ~65%. With `balanced=True` both directions are
      equally frequent and every prompt-blind rule scores 50%: the held-out set to measure reading on.
    * `"misread"`: `scripted_trace(..., wrong=True)` — one operand misread (y → y±1, ±2, ±10) and
      carried through; only comparing the trace's numbers with the problem's reveals it. The 2-layer
      tiny model does not learn this in a CPU-minute budget (held-out 0.55-0.62 after 125-300 steps
      of 16 pairs from scratch): it needs an equality test between a prompt token and a response
      token carried to the last position, one hop more than two layers give easily.
    * `"mixed"`: alternately one and the other.

    Rows keep `id`, `answer` and `error` (which kind the rejected trace has).
    """
    from data_pipelines.arith_task import generate_split, scripted_trace

    if errors not in ERROR_KINDS:
        raise ValueError(f"errors must be one of {ERROR_KINDS}, got {errors!r}")
    pairs: list[dict[str, Any]] = []
    pool = 2 * n + 16  # some problems admit no flip; retry with more if that was not enough
    while len(pairs) < n:
        rows = generate_split(split, pool, seed=seed, **difficulty)
        rng = random.Random(f"rm-pairs|{seed}|{split}|{errors}")
        pairs, flips = [], {"+": 0, "-": 0}
        for row in rows:
            if len(pairs) == n:
                break
            kind = errors if errors != "mixed" else ERROR_KINDS[len(pairs) % 2]
            if kind == "misread":
                chosen = scripted_trace(row, rng, wrong=False)
                rejected = scripted_trace(row, rng, wrong=True)
            else:
                flip = _flip_operation(row, rng)
                if flip is None or (balanced and flips[flip[1]] > flips["-" if flip[1] == "+" else "+"]):
                    continue
                flips[flip[1]] += 1
                # One wording for both traces (same teacher seed): the pair differs only where the
                # arithmetic does, so the comparison carries no phrasing noise.
                wording = rng.getrandbits(64)
                chosen = scripted_trace(row, random.Random(wording), wrong=False)
                rejected = scripted_trace(flip[0], random.Random(wording), wrong=False)
            pairs.append({"id": row["id"], "prompt": row["prompt"], "chosen": chosen, "rejected": rejected,
                          "answer": row["answer"], "error": kind})
        pool *= 2
    return pairs


def _parse_builtin(name: str, split: str) -> tuple[str, dict[str, Any]]:
    """`builtin:arith-preferences[:split][?n=256&seed=0&errors=operation&balanced=1&level=easy]` →
    (split, options for `arith_preference_pairs`)."""
    from urllib.parse import parse_qsl

    body = name[len(BUILTIN_NAME):]
    body, _, query = body.partition("?")
    if body.startswith(":") and body[1:]:
        split = body[1:]
    elif body:
        raise UserError(f"dataset_name {name!r}: expected {BUILTIN_NAME}[:split][?n=N&seed=S&errors=E&balanced=1]")
    opts: dict[str, Any] = {}
    for k, v in parse_qsl(query):
        try:
            opts[k] = int(v)
        except ValueError:
            opts[k] = v
    return split, opts


def without_inline_split(name: str) -> str:
    """`builtin:arith-preferences:train?n=8` → `builtin:arith-preferences?n=8` (the split then comes
    from the caller)."""
    head, sep, query = name.partition("?")
    return (BUILTIN_NAME if head.startswith(BUILTIN_NAME) else head) + sep + query


def load_preference_rows(dataset_name: str, split: str = "train", *, dataset_config: str | None = None,
                         n_builtin: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Raw rows of a preference dataset: the built-in pairs for `builtin:arith-preferences`, anything
    else through `data_pipelines.loading.load_rows` (local jsonl/json/parquet, shard dirs, Hub ids)."""
    if dataset_name.startswith(BUILTIN_NAME):
        split, opts = _parse_builtin(dataset_name, split)
        n = int(opts.pop("n", n_builtin if n_builtin is not None else 256))
        if "balanced" in opts:
            opts["balanced"] = str(opts["balanced"]).lower() in ("1", "true", "yes")
        s = int(opts.pop("seed", seed))
        try:
            return arith_preference_pairs(split, n, s, **opts)
        except (ValueError, TypeError) as e:
            raise UserError(f"{dataset_name}: {e}") from None
    from data_pipelines.errors import DataError
    from data_pipelines.loading import load_rows, row_location

    try:
        ds = load_rows(dataset_name, split, dataset_config=dataset_config)
    except DataError as e:
        raise UserError(str(e)) from None
    rows = list(ds)
    for i, row in enumerate(rows):  # remember where each row came from, for error messages
        row["__where__"] = row_location(ds, i, dataset_name)
    return rows


# --- normalisation -----------------------------------------------------------------------------
def _messages(value: Any, field: str, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: '{field}' is empty")
        return [{"role": "user", "content": value}]
    if isinstance(value, Sequence) and value and all(isinstance(m, Mapping) for m in value):
        out = []
        for k, m in enumerate(value):
            role, content = m.get("role"), m.get("content")
            if role not in _ROLES or not isinstance(content, str):
                raise UserError(f"{where}: '{field}' message {k} must be {{'role': one of {sorted(_ROLES)}, "
                                f"'content': str}}, got {dict(m)!r:.120}")
            out.append({"role": role, "content": content})
        return out
    raise UserError(f"{where}: '{field}' must be text or a non-empty list of chat messages, got "
                    f"{type(value).__name__}")


def _implicit_prompt(row: Mapping[str, Any], where: str) -> dict[str, Any]:
    """TRL's implicit-prompt preference row (chosen and rejected are whole conversations that share their
    opening turns): the shared turns become the prompt, as TRL's `extract_prompt` makes them."""
    from trl.data_utils import extract_prompt

    chosen, rejected = _messages(row["chosen"], "chosen", where), _messages(row["rejected"], "rejected", where)
    split = extract_prompt({"chosen": chosen, "rejected": rejected})
    if not split["prompt"]:
        raise UserError(f"{where}: no 'prompt', and 'chosen' and 'rejected' share no opening turn to take it from "
                        "(TRL's implicit-prompt format)")
    return split


def _response_text(value: Any, field: str, where: str) -> str:
    """A response column as text: a string, or assistant messages (their contents joined: one response)."""
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, str):
        text = value
    else:
        msgs = _messages(value, field, where)
        others = [m["role"] for m in msgs if m["role"] != "assistant"]
        if others:  # the RM scores one response to the prompt; a later user turn was dropped without a word
            raise UserError(f"{where}: '{field}' has a {others[0]} turn; a response is assistant messages only (put "
                            "earlier turns of a conversation in 'prompt')")
        assistant = [m["content"] for m in msgs]
        if not assistant:
            raise UserError(f"{where}: '{field}' has no assistant message")
        text = "\n".join(assistant)
    if not text.strip():
        raise UserError(f"{where}: '{field}' is empty")
    return text


def _rationales(row: Mapping[str, Any], where: str) -> tuple[str | None, str | None]:
    r = row.get("rationale")
    if r is not None:
        if not isinstance(r, Mapping) or set(r) - {"chosen", "rejected"}:
            raise UserError(f"{where}: 'rationale' must be {{'chosen': str, 'rejected': str}} (the reasoning behind "
                            f"each response), got {type(r).__name__}")
        chosen, rejected = r.get("chosen"), r.get("rejected")
    else:
        chosen, rejected = row.get("chosen_rationale"), row.get("rejected_rationale")
    for name, v in (("chosen", chosen), ("rejected", rejected)):
        if v is not None and not isinstance(v, str):
            raise UserError(f"{where}: the {name} rationale must be a string, got {type(v).__name__}")
    chosen, rejected = (chosen or None), (rejected or None)
    if (chosen is None) != (rejected is None):
        raise UserError(f"{where}: only the {'chosen' if chosen else 'rejected'} response has a rationale; give "
                        "both or neither (a one-sided rationale teaches the RM the format, not the quality)")
    return chosen, rejected


def with_rationale(response: str, rationale: str | None) -> str:
    """The response as the RM reads it: the reasoning in a leading `<think>` block (R1 format)."""
    if not rationale:
        return response
    return f"<think>\n{rationale.strip()}\n</think>\n\n{response.lstrip()}"


def to_preference_example(row: Mapping[str, Any], index: int = 0, source: str = "dataset") -> dict[str, Any]:
    """One raw row → TRL's conversational preference example (see the module docstring)."""
    where = str(row.get("__where__") or f"{source} row {index}")
    if row.get("prompt") is None and isinstance(row.get("chosen"), (list, tuple)) \
            and isinstance(row.get("rejected"), (list, tuple)):
        row = {**row, **_implicit_prompt(row, where)}
    missing = [c for c in ("prompt", "chosen", "rejected") if row.get(c) is None]
    if missing:
        # the row's own fields: a table's columns are the union over rows, and a missing one reads as null here
        have = sorted(k for k, v in row.items() if not k.startswith("__") and v is not None)
        raise UserError(f"{where}: missing {', '.join(repr(c) for c in missing)}; a preference row needs "
                        f"'prompt', 'chosen' and 'rejected' (this row has: {have})")
    prompt = _messages(row["prompt"], "prompt", where)
    if prompt[-1]["role"] == "assistant":
        raise UserError(f"{where}: 'prompt' ends with an assistant message; the responses go in chosen/rejected")
    chosen_r, rejected_r = _rationales(row, where)
    out = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": with_rationale(_response_text(row["chosen"], "chosen", where),
                                                                   chosen_r)}],
        "rejected": [{"role": "assistant", "content": with_rationale(
            _response_text(row["rejected"], "rejected", where), rejected_r)}],
    }
    if row.get("margin") is not None:
        m = row["margin"]
        # NaN passes isinstance (JSON's NaN, pandas' missing value) and turns the loss and then every weight NaN
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise UserError(f"{where}: 'margin' must be a finite number, got {m!r}")
        out["margin"] = float(m)
    return out


def to_preference_examples(rows: Iterable[Mapping[str, Any]], source: str = "dataset") -> list[dict[str, Any]]:
    """All rows normalised; the first bad row raises a `UserError` naming it. Pairs whose chosen and
    rejected responses are the same are dropped with a warning: the two scores are then equal, so the
    pair has no gradient, dilutes each batch's mean loss, and counts as a miss in the pairwise accuracy
    (chosen must score *above* rejected), in training and in the held-out evaluation."""
    examples, ties = [], []
    for i, row in enumerate(rows):
        example = to_preference_example(row, i, source)
        if example["chosen"] == example["rejected"]:
            ties.append(str(row.get("__where__") or f"{source} row {i}"))
        else:
            examples.append(example)
    if ties and not examples:
        raise UserError(f"{source}: every pair has the same chosen and rejected response (e.g. {ties[0]})")
    if not examples:
        raise UserError(f"{source}: no preference pairs")
    if ties:
        log.warning("%s: dropped %d pair(s) whose chosen and rejected responses are the same (first: %s)",
                    source, len(ties), ties[0])
    with_margin = sum("margin" in e for e in examples)
    if 0 < with_margin < len(examples):
        raise UserError(f"{source}: 'margin' is set on {with_margin} of {len(examples)} rows; set it on all or none")
    return examples
