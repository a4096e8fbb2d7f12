"""Schema adapters: evaluation sets of different shapes -> (prompt messages, gold answer) pairs.

Supported: the built-in task (`prompt`, `answer`), MATH-500 (`problem`, `answer`), GSM8K
(`question`, `answer` ending in `#### <number>`), AIME-style sets (`problem`/`question`, `answer`).
Sets come from local files or Hub ids through `data_pipelines.loading.load_rows`.
"""

from __future__ import annotations

import re
from typing import Any

from posttrain.errors import UserError

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$")


def _messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def adapt_row(row: dict[str, Any], index: int, source: str, where: str | None = None
              ) -> tuple[list[dict[str, str]], str]:
    """One row -> (prompt messages, gold answer), by the columns it has. `where` names the row in
    errors (e.g. "set.jsonl line 3"; default "<source> row <index>")."""
    from data_pipelines.loading import answer_problem, prompt_problem, to_messages

    where = where or f"{source} row {index}"
    question = next((c for c in ("prompt", "question", "problem") if c in row), None)
    if question is not None and "answer" in row:
        # str(None) would be graded as the literal "None" (a missing key in a JSONL row reads as null)
        value = row[question]
        if value is None:
            col, problem = question, f"{question} is null"
        elif question == "prompt" or isinstance(value, str):
            # as GRPO checks its prompts: an empty text, or messages that are no chat (unknown role, no
            # content, no user turn) would be sent to the model and scored
            col, problem = question, prompt_problem(value)
        else:
            col, problem = question, None
        if not problem:
            col, problem = "answer", answer_problem(row["answer"])
        if problem:
            raise UserError(f"{where}: {problem} (column {col!r})")
    if "prompt" in row and "answer" in row:
        prompt = row["prompt"]
        return to_messages(prompt), str(row["answer"])
    if "question" in row and "answer" in row:  # GSM8K: the answer column is a worked solution
        m = _GSM8K_FINAL.search(str(row["answer"]))
        gold = m.group(1).replace(",", "") if m else str(row["answer"])
        return _messages(str(row["question"])), gold
    if "problem" in row and "answer" in row:  # MATH-500, AIME
        return _messages(str(row["problem"])), str(row["answer"])
    raise UserError(
        f"{where}: no known schema (need prompt+answer, problem+answer or question+answer); "
        f"columns are {sorted(row)}"
    )


# Columns that name what a problem asks, when several problems ask the same thing in other words: the
# built-in task's `expression` (its held-out problems are other wordings of the same arithmetic facts),
# or a set's own `group`. Problems of one group succeed or fail together, so intervals over problems
# must be computed over groups (eval_hooks.report).
GROUP_COLUMNS = ("group", "expression")


def load_benchmark_with_groups(dataset_name: str, split: str = "test",
                               limit: int | None = None) -> tuple[list, list[str], list[str] | None]:
    """(prompt messages, gold answers, groups) of the first `limit` problems; groups is None when the
    set names none (every problem then stands alone)."""
    from data_pipelines.loading import load_rows, row_location

    ds = load_rows(dataset_name, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n == 0:
        raise UserError(f"{dataset_name} ({split}): the evaluation set is empty")
    prompts, answers = [], []
    for i in range(n):
        p, a = adapt_row(ds[i], i, dataset_name, where=row_location(ds, i, dataset_name))
        prompts.append(p)
        answers.append(a)
    column = next((c for c in GROUP_COLUMNS if c in ds.column_names), None)
    groups = [str(v) for v in ds.select(range(n))[column]] if column is not None else None
    return prompts, answers, groups


def load_benchmark(dataset_name: str, split: str = "test", limit: int | None = None) -> tuple[list, list[str]]:
    """(prompt messages, gold answers) of the first `limit` problems."""
    prompts, answers, _ = load_benchmark_with_groups(dataset_name, split, limit)
    return prompts, answers
