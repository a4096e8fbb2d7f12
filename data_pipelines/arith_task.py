"""The built-in task: seeded arithmetic word problems with exact integer answers.

Small enough that a ~1M-parameter model learns the easy level on CPU in minutes, and
with a scripted "teacher" (:func:`scripted_trace`) that writes R1-style responses, so
the whole distill -> SFT -> GRPO chain runs without downloading anything.

Split membership is a pure function of a problem's canonical text (a hash), so train,
validation and test can never share a problem whatever the seeds or sizes.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from .formatting import (
    DEFAULT_SYSTEM_PROMPT,
    SAMPLE_TYPE_ORIGINAL,
    SAMPLE_TYPE_R1,
    sft_messages,
    user_messages,
    with_system,
)

SPLITS = ("train", "validation", "test")
# Share of the hash space owned by each split (percent buckets 0..99).
_SPLIT_BUCKETS = {"train": range(0, 80), "validation": range(80, 90), "test": range(90, 100)}


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the generator.  ``ops`` may include ``+``, ``-``, ``*``; a ``*`` can only
    open a problem ("4 bags with 6 marbles each"), later steps add or take away."""

    max_operand: int = 30
    ops: tuple[str, ...] = ("+", "-")
    max_steps: int = 2  # operations per problem
    multi_step_prob: float = 0.15  # chance a problem has more than one operation


LEVELS: dict[str, Difficulty] = {
    # one step on single digits: the level the tiny model learns in a few CPU minutes (the demo's)
    "digits": Difficulty(max_operand=9, ops=("+", "-"), max_steps=1, multi_step_prob=0.0),
    "easy": Difficulty(),
    "medium": Difficulty(max_operand=99, ops=("+", "-", "*"), max_steps=2, multi_step_prob=0.4),
    "hard": Difficulty(max_operand=999, ops=("+", "-", "*"), max_steps=3, multi_step_prob=0.7),
}


def make_difficulty(level: str = "easy", **overrides: Any) -> Difficulty:
    """``level`` preset with field overrides (``steps`` is accepted for ``max_steps``;
    ``ops`` may be a string like ``"+-*"``)."""
    if level not in LEVELS:
        raise ValueError(f"unknown difficulty level {level!r}; choose from {sorted(LEVELS)}")
    if "steps" in overrides:
        overrides["max_steps"] = overrides.pop("steps")
    if "ops" in overrides:
        overrides["ops"] = tuple(overrides["ops"])
    unknown = set(overrides) - set(asdict(LEVELS[level]))
    if unknown:
        raise ValueError(f"unknown difficulty option(s) {sorted(unknown)}")
    d = replace(LEVELS[level], **overrides)
    if not set(d.ops) <= {"+", "-", "*"} or not d.ops:
        raise ValueError(f"ops must be a non-empty subset of '+-*', got {d.ops!r}")
    if d.max_operand < 2 or d.max_steps < 1:
        raise ValueError("max_operand must be >= 2 and max_steps >= 1")
    return d


# --- templates ---------------------------------------------------------------------
# Parsing relies on two invariants: every "add" sentence contains the word "more" and
# no "take away" sentence does; only the opening sentence of a product has two numbers.

_PEOPLE = [("Mia", "she", "her"), ("Leo", "he", "him"), ("Ava", "she", "her"), ("Sam", "he", "him"),
           ("Noah", "he", "him"), ("Emma", "she", "her"), ("Liam", "he", "him"), ("Zoe", "she", "her"),
           ("Omar", "he", "him"), ("Nina", "she", "her"), ("Ravi", "he", "him"), ("Lena", "she", "her"),
           ("Tom", "he", "him"), ("Ines", "she", "her"), ("Ken", "he", "him"), ("Sara", "she", "her")]
_ITEMS = ["marbles", "apples", "stickers", "books", "coins", "cards", "pencils", "shells",
          "cookies", "stamps", "balloons", "crayons", "buttons", "beads", "toy cars"]
_CONTAINERS = [("bags", "bag"), ("boxes", "box"), ("jars", "jar"), ("packs", "pack"), ("baskets", "basket")]

_START = ["{name} has {a} {item}.", "{name} starts the day with {a} {item}.",
          "{name} owns {a} {item}.", "{name} collected {a} {item}."]
_START_MUL = ["{name} has {a} {cs} with {b} {item} in each {c}.",
              "{name} buys {a} {cs} of {item}. Each {c} holds {b} {item}.",
              "{name} has {a} {cs}, and each {c} contains {b} {item}."]
_ADD = ["{sub} buys {b} more.", "{friend} gives {obj} {b} more {item}.",
        "{sub} finds {b} more {item}.", "{sub} wins {b} more {item} at a game."]
_SUBTRACT = ["{sub} gives {b} to {friend}.", "{sub} loses {b} {item}.",
             "{sub} uses {b} of them.", "{sub} sells {b} {item}.", "{friend} takes {b} of them."]
_CONNECT = ["Then", "After that,", "Later,", "Next,"]
_QUESTION = ["How many {item} does {name} have now?", "How many {item} does {sub} have in the end?",
             "How many {item} does {name} have at the end?"]
_QUESTION_MUL = ["How many {item} does {name} have in total?", "How many {item} does {sub} have altogether?"]

_OP_WORD = {"+": "plus", "-": "minus", "*": "times"}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _apply(x: int, op: str, y: int) -> int:
    return x + y if op == "+" else x - y if op == "-" else x * y


def evaluate(operands: Sequence[int], ops: Sequence[str]) -> int:
    """Left-to-right value; equals normal precedence because ``*`` only comes first."""
    value = int(operands[0])
    for op, y in zip(ops, operands[1:]):
        value = _apply(value, op, int(y))
    return value


def expression_text(operands: Sequence[int], ops: Sequence[str]) -> str:
    parts = [str(operands[0])]
    for op, y in zip(ops, operands[1:]):
        parts += [op, str(y)]
    return " ".join(parts)


def _sample_problem(rng: random.Random, d: Difficulty) -> tuple[str, list[int], list[str]]:
    name, sub, obj = rng.choice(_PEOPLE)
    friend = rng.choice([p[0] for p in _PEOPLE if p[0] != name])
    item = rng.choice(_ITEMS)
    cs, c = rng.choice(_CONTAINERS)
    n_steps = 1
    if d.max_steps > 1 and rng.random() < d.multi_step_prob:
        n_steps = rng.randint(2, d.max_steps)
    first = rng.choice(d.ops)
    later_ops = [o for o in d.ops if o != "*"]
    if not later_ops:
        n_steps = 1

    sentences: list[str] = []
    step_ops: list[str | None] = []
    if first == "*":
        a = rng.randint(2, min(12, d.max_operand))
        b = rng.randint(2, d.max_operand)
        operands, ops = [a, b], ["*"]
        sentences.append(rng.choice(_START_MUL).format(name=name, a=a, b=b, cs=cs, c=c, item=item))
        step_ops = [None] * (n_steps - 1)
    else:
        a = rng.randint(2, d.max_operand)
        operands, ops = [a], []
        sentences.append(rng.choice(_START).format(name=name, a=a, item=item))
        step_ops = [first] + [None] * (n_steps - 1)  # the opening operation is the one drawn
    value = evaluate(operands, ops)
    for op in step_ops:
        op = op or rng.choice(later_ops)
        if op == "-" and value < 1:
            if "+" not in later_ops:
                break
            op = "+"
        b = rng.randint(1, d.max_operand) if op == "+" else rng.randint(1, min(value, d.max_operand))
        s = rng.choice(_ADD if op == "+" else _SUBTRACT).format(sub=sub, obj=obj, friend=friend, b=b, item=item)
        if ops:  # not the opening sentence's operation: chain it with a connector
            s = f"{rng.choice(_CONNECT)} {s if s.startswith(friend) else s[0].lower() + s[1:]}"
        sentences.append(_cap(s))
        operands.append(b)
        ops.append(op)
        value = _apply(value, op, b)
    q = rng.choice(_QUESTION_MUL if ops == ["*"] else _QUESTION)
    sentences.append(q.format(item=item, name=name, sub=sub))
    return " ".join(sentences), operands, ops


def parse_problem(problem: str) -> tuple[list[int], list[str]]:
    """Recover (operands, ops) from a generated problem's text, independently of the
    generator's bookkeeping (used by the scripted teacher and by the tests)."""
    sentences = [s for s in re.split(r"(?<=[.?])\s+", problem.strip()) if s]
    body = [s for s in sentences if not s.endswith("?")]
    first_nums = [int(x) for x in re.findall(r"\d+", body[0])]
    # "buys 4 packs of ... Each pack holds 6 ..." spans two sentences.
    idx = 1
    if len(first_nums) == 1 and len(body) > 1 and body[1].startswith("Each "):
        first_nums += [int(x) for x in re.findall(r"\d+", body[1])]
        idx = 2
    if len(first_nums) == 2:
        operands, ops = first_nums, ["*"]
    elif len(first_nums) == 1:
        operands, ops = first_nums, []
    else:
        raise ValueError(f"not an arithmetic task problem: {problem!r}")
    for s in body[idx:]:
        nums = re.findall(r"\d+", s)
        if len(nums) != 1:
            raise ValueError(f"cannot parse sentence {s!r}")
        operands.append(int(nums[0]))
        ops.append("+" if re.search(r"\bmore\b", s) else "-")
    return operands, ops


def canonical_text(problem: str) -> str:
    return " ".join(problem.split()).lower()


def problem_id(problem: str) -> str:
    """Content hash of the problem text: stable across runs and machines."""
    return hashlib.sha1(canonical_text(problem).encode("utf-8")).hexdigest()[:16]


def split_of(problem: str) -> str:
    bucket = int.from_bytes(hashlib.sha1(b"split|" + canonical_text(problem).encode()).digest()[:8], "big") % 100
    for split, r in _SPLIT_BUCKETS.items():
        if bucket in r:
            return split
    raise AssertionError("unreachable")


def reference_solution(operands: Sequence[int], ops: Sequence[str]) -> str:
    """A short non-reasoning solution: the task's "original response" column."""
    lines, value = [], int(operands[0])
    for op, y in zip(ops, operands[1:]):
        new = _apply(value, op, int(y))
        lines.append(f"{value} {op} {y} = {new}")
        value = new
    return "\n".join(lines) + f"\nThe answer is \\boxed{{{value}}}."


def generate_split(split: str, n: int, seed: int = 0, **difficulty: Any) -> list[dict[str, Any]]:
    """``n`` unique problems belonging to ``split`` (train / validation / test).

    Row columns: ``id``, ``prompt`` (chat messages), ``answer`` (str), ``problem``,
    ``expression``, ``operands``, ``ops``, ``solution`` (a short reference response).
    """
    if split not in _SPLIT_BUCKETS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    d = make_difficulty(**difficulty)
    rng = random.Random(f"arith|{seed}|{split}")
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    misses = 0  # the problem space is finite: give up after a long run of no new problem
    while len(rows) < n:
        problem, operands, ops = _sample_problem(rng, d)
        pid = problem_id(problem)
        if pid in seen or split_of(problem) != split:
            misses += 1
            if misses > 20_000:
                raise ValueError(f"could only find {len(rows)} unique {split} problems of {n} at {d}")
            continue
        misses = 0
        seen.add(pid)
        rows.append({
            "id": pid,
            "prompt": user_messages(problem),
            "answer": str(evaluate(operands, ops)),
            "problem": problem,
            "expression": expression_text(operands, ops),
            "operands": operands,
            "ops": ops,
            "solution": reference_solution(operands, ops),
        })
    return rows


def build_dataset(n_train: int = 2000, n_validation: int = 200, n_test: int = 200, seed: int = 0,
                  **difficulty: Any):
    """A ``datasets.DatasetDict`` with train / validation / test splits."""
    import datasets

    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    return datasets.DatasetDict({
        split: datasets.Dataset.from_list(generate_split(split, n, seed, **difficulty))
        for split, n in sizes.items()
    })


def write_dataset(out_dir: str | os.PathLike, n_train: int = 2000, n_validation: int = 200,
                  n_test: int = 200, seed: int = 0, fmt: str = "jsonl", **difficulty: Any) -> dict[str, Path]:
    """Write ``{split}.jsonl`` (or ``.parquet``) files; returns their paths."""
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"fmt must be 'jsonl' or 'parquet', got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dd = build_dataset(n_train, n_validation, n_test, seed, **difficulty)
    paths = {}
    for split, ds in dd.items():
        path = out / f"{split}.{fmt}"
        tmp = path.with_name(path.name + ".tmp")
        if fmt == "jsonl":
            ds.to_json(str(tmp), lines=True, force_ascii=False)
        else:
            ds.to_parquet(str(tmp))
        os.replace(tmp, path)
        paths[split] = path
    return paths


# --- the scripted teacher --------------------------------------------------------

_INTROS = ["Let me work through this step by step.", "Let me track the count carefully.",
           "I will follow each change in the amount.", "Okay, let me compute this one step at a time."]
_CHECK_OK = ["Correct.", "That matches.", "Good, that checks out.", "Yes, that is right."]
_WRAP = ["So the final amount is {v}.", "That gives {v} in the end.", "So the answer should be {v}."]


def _step_line(rng: random.Random, x: int, op: str, y: int, z: int) -> str:
    if op == "*":
        return rng.choice([f"There are {x} groups of {y}, so {x} * {y} = {z}.",
                           f"{x} groups with {y} each: {x} * {y} = {z}."])
    verb = "add" if op == "+" else "take away"
    return rng.choice([f"Starting from {x}, {verb} {y}: {x} {op} {y} = {z}.",
                       f"{x} {op} {y} = {z}.",
                       f"Now {x} {_OP_WORD[op]} {y} is {z}."])


def _check_line(rng: random.Random, x: int, op: str, y: int, z: int) -> str:
    # Verify by the inverse operation; numbers are the trace's own, so a misread
    # operand still yields a self-consistent (but wrong) check.
    inverse = {"+": f"{z} - {y} = {x}", "-": f"{z} + {y} = {x}", "*": f"{z} / {y} = {x}"}[op]
    return f"Check: {inverse}. {rng.choice(_CHECK_OK)}"


def _misread(rng: random.Random, y: int) -> int:
    choices = [y + d for d in (-2, -1, 1, 2, 10, -10) if y + d >= 1]
    return rng.choice(choices)


def scripted_trace(problem_row: dict[str, Any], rng: random.Random, wrong: bool = False) -> str:
    """An R1-style response (``<think>`` reasoning with self-checks, then a boxed answer).

    With ``wrong`` the trace misreads one operand and carries the mistake through
    consistently, so the final answer differs from the gold one.  ASCII only.
    """
    if problem_row.get("operands") is not None and problem_row.get("ops") is not None:
        operands, ops = [int(x) for x in problem_row["operands"]], list(problem_row["ops"])
    else:
        operands, ops = parse_problem(problem_row["problem"])
    operands = list(operands)
    if wrong:
        j = rng.randrange(len(operands)) if ops[:1] == ["*"] else rng.randrange(1, len(operands)) \
            if len(operands) > 1 else 0
        operands[j] = _misread(rng, operands[j])
    lines = [rng.choice(_INTROS), f"Start with {operands[0]}." if ops[:1] != ["*"] else ""]
    value = operands[0]
    for op, y in zip(ops, operands[1:]):
        new = _apply(value, op, y)
        lines.append(_step_line(rng, value, op, y, new))
        lines.append(_check_line(rng, value, op, y, new))
        value = new
    lines.append(rng.choice(_WRAP).format(v=value))
    think = "\n".join(line for line in lines if line)
    return f"<think>\n{think}\n</think>\n\nThe answer is \\boxed{{{value}}}."


def sft_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` SFT rows of the train split without running distill, alternating the two sample types
    of the V3 report §5.1: <problem, original response> (the reference solution) and <system
    prompt, problem, R1 response> (a scripted trace). Columns as distill writes them: ``id``,
    ``sample_type``, ``messages``, ``answer``. For tests and benchmarks."""
    rng = random.Random(seed)
    rows = []
    for i, r in enumerate(generate_split("train", n, seed=seed)):
        if i % 2:
            msgs = sft_messages(with_system(r["prompt"], DEFAULT_SYSTEM_PROMPT), scripted_trace(r, rng))
            kind = SAMPLE_TYPE_R1
        else:
            msgs = sft_messages(r["prompt"], r["solution"])
            kind = SAMPLE_TYPE_ORIGINAL
        rows.append({"id": f"{r['id']}-{i}", "sample_type": kind, "messages": msgs, "answer": r["answer"]})
    return rows


def task_corpus(n: int, seed: int = 0) -> Iterator[str]:
    """``n`` text samples covering the task's alphabet (problems of every level, correct
    and wrong scripted traces, reference solutions, the default system prompt), for
    training the tokenizer."""
    rng = random.Random(f"corpus|{seed}")
    levels = list(LEVELS)
    for i in range(n):
        d = LEVELS[levels[i % len(levels)]]
        problem, operands, ops = _sample_problem(rng, d)
        row = {"problem": problem, "operands": operands, "ops": ops}
        kind = i % 5
        if kind == 0:
            yield problem
        elif kind == 1:
            yield scripted_trace(row, rng, wrong=False)
        elif kind == 2:
            yield scripted_trace(row, rng, wrong=True)
        elif kind == 3:
            yield reference_solution(operands, ops)
        else:
            yield DEFAULT_SYSTEM_PROMPT if i % 50 == 4 else f"{problem}\n{scripted_trace(row, rng)}"
