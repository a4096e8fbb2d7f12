"""Crash-safe shard output for long generation jobs.

Layout of an output directory::

    data/train-00000.jsonl       kept SFT rows (what SFT reads; ``datasets`` sees split "train")
    rejected/rejected-00000.jsonl every rejected sample, with its reason (to rebuild stats)
    ledger.jsonl                 one line per committed shard: its index and prompt ids
    run_config.json              what produced the shards (a resume must match it)

Work is committed one shard (a fixed number of prompts) at a time: both shard files are
written to temporary names, fsynced and ``os.replace``d into place, and only then is the
shard's ledger line appended (and fsynced).  The ledger line is the commit point.  On
restart, a torn last ledger line is cut off and shard files the ledger does not list are
deleted, so after a SIGKILL at any moment the directory holds exactly the committed
shards: no duplicate, no missing, no half-written row.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DataError

DATA_DIR, REJECTED_DIR = "data", "rejected"
LEDGER, RUN_CONFIG = "ledger.jsonl", "run_config.json"
_SHARD_RE = re.compile(r"^(?:train|rejected)-(\d{5,})\.(jsonl|parquet)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _parquet_bytes(rows: list[dict[str, Any]], schema: Any) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    return sink.getvalue().to_pybytes()


class ShardStore:
    def __init__(self, out_dir: str | os.PathLike, fmt: str = "jsonl", schemas: dict[str, Any] | None = None):
        if fmt not in ("jsonl", "parquet"):
            raise DataError(f"output_format must be 'jsonl' or 'parquet', got {fmt!r}")
        self.root = Path(out_dir)
        self.fmt = fmt
        self.schemas = schemas or {}  # parquet: a fixed schema per kind keeps shards compatible

    # -- paths ---------------------------------------------------------------------
    def shard_path(self, kind: str, index: int) -> Path:
        sub, stem = (DATA_DIR, "train") if kind == "data" else (REJECTED_DIR, "rejected")
        return self.root / sub / f"{stem}-{index:05d}.{self.fmt}"

    @property
    def ledger_path(self) -> Path:
        return self.root / LEDGER

    # -- lifecycle -----------------------------------------------------------------
    def open(self, run_config: dict[str, Any], overwrite: bool = False) -> dict[int, list[str]]:
        """Create or resume the directory; returns the committed shards {index: prompt ids}.

        A directory written with a different ``run_config`` is refused (mixing teachers or
        settings in one dataset would silently corrupt it) unless ``overwrite``.
        """
        cfg_path = self.root / RUN_CONFIG
        if overwrite and self.root.exists():
            # The ledger (the commit point) goes first: killed while the shards are being deleted, the
            # directory must not still list shards whose files are gone (a resume would skip their prompts).
            for name in (LEDGER, RUN_CONFIG):
                (self.root / name).unlink(missing_ok=True)
            _fsync_dir(self.root)
            for name in (DATA_DIR, REJECTED_DIR):
                shutil.rmtree(self.root / name, ignore_errors=True)
        (self.root / DATA_DIR).mkdir(parents=True, exist_ok=True)
        (self.root / REJECTED_DIR).mkdir(parents=True, exist_ok=True)
        if cfg_path.exists():
            try:
                old = json.loads(cfg_path.read_text())
            except ValueError:
                old = None  # torn by a crash before anything was committed
            if old is not None and old != run_config:
                diff = sorted(k for k in set(old) | set(run_config) if old.get(k) != run_config.get(k))
                raise DataError(f"{self.root} holds a run with different settings ({', '.join(diff)}); "
                                "use another output_dir, or overwrite: true to start over")
        atomic_write_bytes(cfg_path, (json.dumps(run_config, indent=2, sort_keys=True) + "\n").encode())
        done = self.committed()
        self._remove_uncommitted(set(done))
        return done

    def committed(self) -> dict[int, list[str]]:
        """The ledger's shards {index: prompt ids}; a torn last line is cut off the file."""
        path = self.ledger_path
        if not path.exists():
            return {}
        raw = path.read_bytes()
        done: dict[int, list[str]] = {}
        good = 0  # byte offset after the last complete, valid line
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                entry = json.loads(line)
                done[int(entry["shard"])] = list(entry["ids"])
            except (ValueError, KeyError, TypeError):
                break
            good += len(line)
        if good != len(raw):  # a torn append: drop it, that shard is redone
            with open(path, "r+b") as fh:
                fh.truncate(good)
                fh.flush()
                os.fsync(fh.fileno())
        return done

    def _remove_uncommitted(self, committed: set[int]) -> None:
        for sub in (DATA_DIR, REJECTED_DIR):
            for p in (self.root / sub).iterdir():
                m = _SHARD_RE.match(p.name)
                if p.name.endswith(".tmp") or (m and int(m.group(1)) not in committed):
                    p.unlink()

    def commit(self, index: int, kept: list[dict[str, Any]], rejected: list[dict[str, Any]],
               prompt_ids: list[str]) -> None:
        """Write one shard's files, then its ledger line (the commit point)."""
        for kind, rows in (("rejected", rejected), ("data", kept)):
            path = self.shard_path(kind, index)
            if rows:
                data = _jsonl_bytes(rows) if self.fmt == "jsonl" else _parquet_bytes(rows, self.schemas.get(kind))
                atomic_write_bytes(path, data)
            else:
                path.unlink(missing_ok=True)  # no file for an empty shard
        line = json.dumps({"shard": index, "ids": prompt_ids}) + "\n"
        with open(self.ledger_path, "ab") as fh:
            fh.write(line.encode())
            fh.flush()
            os.fsync(fh.fileno())

    # -- reading back --------------------------------------------------------------
    def iter_rows(self, kind: str, committed: Iterable[int]) -> Iterator[dict[str, Any]]:
        for index in sorted(committed):
            path = self.shard_path(kind, index)
            if not path.exists():
                continue
            if self.fmt == "jsonl":
                with open(path, encoding="utf-8") as fh:
                    for line in fh:
                        yield json.loads(line)
            else:
                import pyarrow.parquet as pq

                yield from pq.read_table(path).to_pylist()
