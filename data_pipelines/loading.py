"""Dataset loading and validation shared by distill, SFT, GRPO and eval.

``dataset_name`` may be:

* ``builtin:arith`` — the built-in task; options after ``?`` (``builtin:arith?n_train=500&
  seed=1&level=medium``) or via ``task_options``; a split may be named inline
  (``builtin:arith:test``), which wins over the ``split`` argument;
* a local ``.jsonl`` / ``.json`` / ``.parquet`` file, or a directory of shards (split
  files are found with ``datasets``' own naming rules: ``train-00000.jsonl``,
  ``test.parquet``, ``train/``… — otherwise every shard in the directory);
* a Hugging Face Hub id, loaded with ``datasets.load_dataset``.

JSON lines are parsed here, line by line, so a malformed line is reported as
``file.jsonl line 17: invalid JSON``; every problem raises :class:`DataError`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence
from urllib.parse import parse_qsl

from .errors import DataError

BUILTIN_PREFIX = "builtin:"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
_CHAT_ROLES = {"system", "user", "assistant", "tool"}

# Row -> "file line N" for datasets read here, keyed by the dataset's fingerprint, so a
# validation error can point at the exact line.
_LOCATIONS: dict[str, list[str]] = {}


@dataclass(frozen=True)
class BuiltinSpec:
    task: str
    split: str | None
    options: dict[str, Any]


def _coerce(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def parse_builtin(name: str) -> BuiltinSpec:
    """``builtin:arith[:split][?key=value&...]`` → its parts."""
    body = name[len(BUILTIN_PREFIX):]
    body, _, query = body.partition("?")
    task, _, split = body.partition(":")
    return BuiltinSpec(task, split or None, {k: _coerce(v) for k, v in parse_qsl(query)})


def _load_builtin(name: str, split: str, options: dict[str, Any] | None) -> "datasets.Dataset":
    import datasets

    from . import arith_task

    spec = parse_builtin(name)
    if spec.task != "arith":
        raise DataError(f"unknown built-in task {spec.task!r} in {name!r}; available: builtin:arith")
    split = spec.split or split
    opts = {**spec.options, **(options or {})}
    sizes = {"train": opts.pop("n_train", 2000), "validation": opts.pop("n_validation", 200),
             "test": opts.pop("n_test", 200)}
    seed = opts.pop("seed", 0)
    if split not in sizes:
        raise DataError(f"{name}: unknown split {split!r}; the built-in task has {list(sizes)}")
    try:
        rows = arith_task.generate_split(split, int(sizes[split]), int(seed), **opts)
    except (ValueError, TypeError) as e:
        raise DataError(f"{name}: {e}") from None
    return datasets.Dataset.from_list(rows)


def _utf8_problem(line: bytes, start: int, reason: str) -> str:
    """``not valid UTF-8 (byte 0xe9 at column 7: invalid continuation byte)``: the bad byte at
    ``start`` of one line's bytes, its column counted in characters as JSON errors count them."""
    column = len(line[:start].decode("utf-8", errors="replace")) + 1
    return f"not valid UTF-8 (byte 0x{line[start]:02x} at column {column}: {reason})"


def _read_jsonl(path: Path, bad: list[dict[str, str]] | None = None) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows and their line numbers.  A malformed line (invalid JSON, not an object, not UTF-8)
    raises, or with a ``bad`` list is recorded there and skipped.  Lines are read as bytes and
    decoded one by one, so an undecodable byte is reported on its own line."""
    rows, lines = [], []

    def fail(msg: str) -> None:
        if bad is None:
            raise DataError(msg)
        bad.append({"location": msg.split(": ", 1)[0], "reason": msg.split(": ", 1)[1]})
    try:
        fh = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                fail(f"{path} line {lineno}: {_utf8_problem(raw, e.start, e.reason)}")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(obj, dict):
                fail(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
                continue
            rows.append(obj)
            lines.append(lineno)
    return rows, lines


def read_jsonl_objects(path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The JSON objects of a .jsonl file and their 1-based line numbers (blank lines skipped), as they
    are (no schema applied, unlike `load_rows`); a `DataError` names the line of anything malformed."""
    return _read_jsonl(Path(path))


def _read_json(path: Path, bad: list[dict[str, str]] | None = None
               ) -> tuple[list[dict[str, Any]], list[int] | None, list[int] | None]:
    """A ``.json`` file: a JSON array of objects, ``{"data": [...]}``, or JSON lines.  Returns the rows
    with their line numbers (JSON lines) or their positions in the array."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        # One JSON document with a bad byte is named by its line; JSON lines are read line by
        # line, where a bad line is skipped like any other malformed one when collecting bad rows.
        try:
            json.loads(data.decode("utf-8", errors="surrogateescape"))
        except json.JSONDecodeError:
            return (*_read_jsonl(path, bad), None)
        line_start = data.rfind(b"\n", 0, e.start) + 1
        lineno = data.count(b"\n", 0, line_start) + 1
        problem = _utf8_problem(data[line_start:e.end], e.start - line_start, e.reason)
        raise DataError(f"{path} line {lineno}: {problem}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return (*_read_jsonl(path, bad), None)  # JSON lines under a .json name (what datasets writes)
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if isinstance(obj, dict):  # a single record
        obj = [obj]
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a JSON array of objects (or JSON lines)")
    rows, items = [], []
    for i, r in enumerate(obj):  # an item that is no object is a bad row: named, or skipped
        if isinstance(r, dict):
            rows.append(r)
            items.append(i)
        elif bad is None:
            raise DataError(f"{path} item {i}: expected a JSON object, got {type(r).__name__}")
        else:
            bad.append({"location": f"{path} item {i}", "reason": f"expected a JSON object, got {type(r).__name__}"})
    return rows, None, items


def _kind(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(v), type(v).__name__)


def _drop_mixed_types(rows: list[dict[str, Any]], where: list[str], bad: list[dict[str, str]] | None
                      ) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows whose value in some column has another JSON type than that column's usual one
    (e.g. a number among string prompts) cannot share a table: name the first, or drop and
    record them all when collecting ``bad`` rows."""
    kinds: dict[str, Counter] = {}
    for r in rows:
        for k, v in r.items():
            kind = _kind(v)
            if kind:
                kinds.setdefault(k, Counter())[kind] += 1
    usual = {k: c.most_common(1)[0][0] for k, c in kinds.items() if len(c) > 1}
    if not usual:
        return rows, where
    keep_rows, keep_where = [], []
    for r, loc in zip(rows, where):
        off = next((k for k, u in usual.items() if _kind(r.get(k)) not in (None, u)), None)
        if off is None:
            keep_rows.append(r)
            keep_where.append(loc)
            continue
        reason = f"column {off!r} is a {_kind(r[off])} here but a {usual[off]} in other rows"
        if bad is None:
            raise DataError(f"{loc}: {reason}")
        bad.append({"location": loc, "reason": reason})
    return keep_rows, keep_where


# what pyarrow raises for values that cannot be one array (ArrowInvalid and ArrowTypeError subclass these)
_ARROW_ERRORS = (TypeError, ValueError, OverflowError)


def _arrow_problem(values: list[Any]) -> str | None:
    """Why ``values`` cannot be one Arrow array (pyarrow's message), or None when they can."""
    import pyarrow as pa

    try:
        pa.array(values)
        return None
    except _ARROW_ERRORS as e:
        return str(e) or type(e).__name__


def _odd_rows(columns: dict[str, list[Any]]) -> dict[int, str]:
    """Row index -> why, for the rows whose value in some column cannot share one Arrow type with the
    same column's values in the other rows: a type mixed inside nested values, which
    :func:`_drop_mixed_types` does not see (an int ``output`` among string ones in a list of test
    cases, an int message ``content``).

    The odd row is the one that differs from most rows, wherever it is in the file (the first row
    included): a column's usual type is the one most values have on their own, and a value is odd
    when it cannot be an array even alone, or not next to a value of the usual type.  Should the
    clash be between rare shapes only, the first row that cannot join the rows before it is named
    (found by bisecting the column's prefixes)."""
    import pyarrow as pa

    odd: dict[int, str] = {}
    failing = [name for name, values in columns.items() if _arrow_problem(values)]
    for name in failing:
        values = columns[name]
        types: list[Any] = []
        alone: dict[int, str] = {}  # rows whose value is no array even on its own (an int among strs in one list)
        for i, v in enumerate(values):
            if v is None:
                types.append(None)
                continue
            try:
                types.append(pa.array([v]).type)
            except _ARROW_ERRORS as e:
                types.append(None)
                alone[i] = str(e)
        counts = Counter(t for t in types if t is not None)
        usual = counts.most_common(1)[0][0] if counts else None
        for i, why in alone.items():
            if usual is not None:
                try:
                    pa.array([values[i]], type=usual)
                except _ARROW_ERRORS as e:  # says what does not fit: "Expected bytes, got a 'int' object"
                    why = str(e)
            odd.setdefault(i, f"column {name!r} has a value of another type than in most rows"
                              f"{f' ({usual})' if usual is not None else ''}: {why}")
        if usual is None:
            continue
        ref = values[types.index(usual)]
        for i, t in enumerate(types):
            if t is not None and t != usual and i not in odd and _arrow_problem([ref, values[i]]):
                odd[i] = (f"column {name!r} has a value of another type than in most rows: {t} here, "
                          f"{usual} in most rows")
    if odd:
        return odd
    for name in failing:
        values = columns[name]
        lo, hi = 0, len(values)  # values[:lo] builds, values[:hi] does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _arrow_problem(values[:mid]) is None else (lo, mid)
        if hi - 1 not in odd:
            odd[hi - 1] = (f"column {name!r} has a value of another type than in the rows before it "
                           f"({_arrow_problem(values[:hi])})")
    return odd


def _rows_to_dataset(rows: list[dict[str, Any]], source: str, where: list[str] | None = None,
                     bad: list[dict[str, str]] | None = None) -> tuple["datasets.Dataset", list[str] | None]:
    """The rows as a table, and ``where`` for the rows kept: a row whose values cannot share the table
    with the others is named (``file line N: column 'c' …``), or, when collecting ``bad`` rows,
    recorded there and dropped."""
    import datasets
    import pyarrow as pa

    while True:
        columns: dict[str, list[Any]] = {}
        for r in rows:  # union of keys in first-seen order; a missing key is a null
            for k in r:
                columns.setdefault(k, [])
        for k in columns:
            columns[k] = [r.get(k) for r in rows]
        try:
            return datasets.Dataset.from_dict(columns), where
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as e:
            # name the row and column, not only the file: a big file is otherwise searched by hand
            odd = {i: why for i, why in _odd_rows(columns).items() if i < len(where)} if where else {}
            if not odd:
                raise DataError(f"{source}: cannot build a table: {e}") from None
            if bad is None:
                first = min(odd)
                raise DataError(f"{where[first]}: {odd[first]}") from None
            bad.extend({"location": where[i], "reason": odd[i]} for i in sorted(odd))
            rows = [r for i, r in enumerate(rows) if i not in odd]
            where = [w for i, w in enumerate(where) if i not in odd]


def _read_parquet(path: Path) -> "datasets.Dataset":
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    return datasets.Dataset(datasets.table.InMemoryTable(table))


def _split_files(path: Path) -> dict[str, list[Path]]:
    """A directory's data files by split, found with ``datasets``' naming rules."""
    from datasets.data_files import DataFilesDict, get_data_patterns
    try:
        patterns = get_data_patterns(str(path))
        files = DataFilesDict.from_patterns(patterns, base_path=str(path))
    except FileNotFoundError:  # datasets' "no data files" errors subclass it
        files = {}
    files = {str(k): [Path(f) for f in v if Path(f).suffix in LOCAL_SUFFIXES] for k, v in files.items()}
    if not any(files.values()):
        raise DataError(f"{path}: no {'/'.join(LOCAL_SUFFIXES)} files in this directory")
    return files


def _dir_files(path: Path, split: str) -> list[Path]:
    files = _split_files(path)
    if split not in files or not files[split]:
        raise DataError(f"{path}: no files for split {split!r}; splits found: {sorted(k for k, v in files.items() if v)}")
    suffixes = {f.suffix for f in files[split]}
    if len(suffixes) > 1:
        raise DataError(f"{path}: split {split!r} mixes file types {sorted(suffixes)}")
    return sorted(files[split])


def _load_local(path: Path, split: str, bad: list[dict[str, str]] | None = None) -> "datasets.Dataset":
    import datasets

    files = _dir_files(path, split) if path.is_dir() else [path]
    parts, all_rows, where = [], [], []
    for f in files:
        if f.suffix == ".parquet":
            parts.append(_read_parquet(f))
            where.extend(f"{f} row {i}" for i in range(parts[-1].num_rows))
            continue
        rows, lines, items = (*_read_jsonl(f, bad), None) if f.suffix == ".jsonl" else _read_json(f, bad)
        all_rows.extend(rows)
        if lines is not None:
            where.extend(f"{f} line {n}" for n in lines)
        else:
            where.extend(f"{f} item {i}" for i in items)
    if parts and all_rows:
        raise DataError(f"{path}: mixes parquet and JSON files")
    if all_rows:
        all_rows, where = _drop_mixed_types(all_rows, where, bad)
        table, where = _rows_to_dataset(all_rows, str(path), where, bad)
        parts.append(table)
    if not parts:
        ds = datasets.Dataset.from_dict({})
    elif len(parts) == 1:
        ds = parts[0]
    else:
        try:
            ds = datasets.concatenate_datasets(parts)
        except ValueError as e:
            raise DataError(f"{path}: shards have different columns or types ({e})") from None
    _LOCATIONS[ds._fingerprint] = where
    return ds


def _looks_local(name: str) -> bool:
    # A Hub id is "name" or "org/name"; anything else path-like is treated as a path so a
    # typo gives "no such file" instead of a slow failed Hub lookup.
    return (os.path.exists(name) or name.endswith(LOCAL_SUFFIXES) or name.startswith((".", "/", "~"))
            or name.strip("/").count("/") > 1)


def local_data_files(dataset_name: str) -> list[Path] | None:
    """The files a local ``dataset_name`` reads from, whatever the split: the file itself, or
    every data file :func:`load_rows` finds in the directory.  None for the built-in task and
    Hub ids, which their name and options pin."""
    if not isinstance(dataset_name, str) or not dataset_name or dataset_name.startswith(BUILTIN_PREFIX):
        return None
    if not _looks_local(dataset_name):
        return None
    path = Path(dataset_name).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if not path.is_dir():
        return [path]
    return sorted({f for files in _split_files(path).values() for f in files})


def load_rows(dataset_name: str, split: str = "train", *, dataset_config: str | None = None,
              streaming: bool = False, task_options: dict[str, Any] | None = None,
              bad_rows: list[dict[str, str]] | None = None):
    """Load one split as a ``datasets.Dataset`` (an ``IterableDataset`` when ``streaming``).

    Pass a list as ``bad_rows`` to skip unreadable rows of local files (malformed JSON
    lines, values of the wrong type) instead of raising; each is recorded there as
    ``{"location": "file.jsonl line 17", "reason": ...}``.
    """
    if not dataset_name or not isinstance(dataset_name, str):
        raise DataError(f"dataset name must be a non-empty string, got {dataset_name!r}")
    if dataset_name.startswith(BUILTIN_PREFIX):
        ds = _load_builtin(dataset_name, split, task_options)
    elif _looks_local(dataset_name):
        path = Path(dataset_name).expanduser()
        if not path.exists():
            raise DataError(f"{path}: no such file or directory")
        if path.is_file() and path.suffix not in LOCAL_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(LOCAL_SUFFIXES)}")
        ds = _load_local(path, split, bad_rows)
    else:
        return _load_hub(dataset_name, split, dataset_config, streaming)
    return ds.to_iterable_dataset() if streaming else ds


def _load_hub(name: str, split: str, config: str | None, streaming: bool):
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=streaming)
    except Exception as e:  # datasets raises many types; all mean "cannot load this"
        raise DataError(
            f"could not load {name!r} (split {split!r}) from the Hugging Face Hub: "
            f"{type(e).__name__}: {e}. For a local file give a path ending in "
            f"{', '.join(LOCAL_SUFFIXES)}; for the built-in task use 'builtin:arith'."
        ) from None


# --- validation -------------------------------------------------------------------


def row_location(ds: Any, index: int, source: str = "dataset") -> str:
    """``"file.jsonl line 17"`` when the row came from a file read here, else ``"<source> row N"``."""
    where = _LOCATIONS.get(getattr(ds, "_fingerprint", None) or "")
    if where and 0 <= index < len(where):
        return where[index]
    return f"{source} row {index}"


def first_rows(ds: Any, n: int) -> Any:
    """The first ``n`` rows of ``ds`` (``ds.select``), still named by their file lines in :func:`row_location`."""
    out = ds.select(range(n))
    where = _LOCATIONS.get(getattr(ds, "_fingerprint", None) or "")
    if where is not None:
        _LOCATIONS[out._fingerprint] = where[:n]
    return out


def _location_key(location: str) -> tuple[Path, int] | None:
    m = re.fullmatch(r"(.*) (?:line|row|item) (\d+)", location)
    return (Path(m.group(1)), int(m.group(2))) if m else None


def bad_rows_in_use(bad_rows: list[dict[str, str]], ds: Any, n_used: int, source: str = "dataset"
                    ) -> list[dict[str, str]]:
    """Of the rows `load_rows` skipped (its ``bad_rows``), those a run reading only the first ``n_used``
    rows of ``ds`` passed over: the ones before its last used row (by file, then line), not ones in the
    part of the file that is never used.  All of them when every row is used."""
    if n_used >= len(ds):
        return list(bad_rows)
    last = _location_key(row_location(ds, n_used - 1, source)) if n_used > 0 else None
    return [b for b in bad_rows if (k := _location_key(b["location"])) is None or (last is not None and k < last)]


def require_columns(ds: Any, cols: Iterable[str | None], source: str) -> None:
    """Raise a :class:`DataError` naming the missing column(s) and the ones that exist."""
    have = list(ds.column_names or [])
    missing = [c for c in cols if c and c not in have]
    if missing:
        raise DataError(f"{source}: missing column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(repr(c) for c in missing)}; columns are: {have}")


def prompt_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable prompt (a non-empty string or chat messages), or None."""
    if isinstance(value, str):
        return None if value.strip() else "prompt is empty"
    if isinstance(value, (list, tuple)):
        if not value:
            return "prompt is an empty message list"
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                return f"prompt message {i} is not a {{'role': str, 'content': str}} dict"
            if m["role"] not in _CHAT_ROLES:
                return f"prompt message {i} has unknown role {m['role']!r}"
        if not any(m["role"] == "user" and m["content"].strip() for m in value):
            return "prompt has no non-empty user message"
        return None
    if value is None:
        return "prompt is null"
    return f"prompt is a {type(value).__name__}, not a string or chat messages"


def answer_problem(value: Any) -> str | None:
    if value is None:
        return "answer is null"
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"answer is a {type(value).__name__}, not a string or number"
    if isinstance(value, str) and not value.strip():
        return "answer is empty"
    if isinstance(value, float) and math.isnan(value):
        return "answer is NaN (a missing value)"
    return None


def tests_problem(value: Any) -> str | None:
    """Why ``value`` is not usable code test cases (see ``rewards.code_reward.parse_tests``), or None.

    Checked when the prompts are read, so a malformed row is named by its line (or skipped) before
    the teacher samples for it, not found by the verifier after.  A case whose input or output is
    null counts as missing it: JSON rows whose cases have different keys become one table with
    nulls for the missing ones, which the verifier would compare as the text "None"."""
    from rewards.code_reward import parse_tests

    try:
        parse_tests(value)
    except ValueError as e:
        return f"malformed tests: {e}"
    if isinstance(value, (list, tuple)):
        for i, case in enumerate(value):
            missing = [k for k in ("input", "output") if case.get(k) is None]
            if missing:
                return f"malformed tests: test case {i} has no {' or '.join(repr(k) for k in missing)}"
    return None


def to_messages(prompt: str | Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """A prompt column value as chat messages (a bare string becomes one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
