"""A small process pool whose workers can be killed one at a time.

``concurrent.futures.ProcessPoolExecutor`` cannot stop one stuck task: killing a worker
breaks the whole pool (``BrokenProcessPool``) and fails every pending future. Verifiers
such as sympy can hang inside C code (e.g. ``9^{9^{9}}`` builds a 370-million-digit
integer), where neither threads nor ``signal.alarm`` can interrupt them. So each worker
here takes one item at a time; when an item passes its deadline the worker is SIGKILLed
and a fresh one is started in the background, and the other items carry on.

Workers are started with ``spawn`` (not ``fork``): forking a process that already runs
torch's OpenMP/intra-op threads can deadlock the child on a lock held by a thread that
does not exist there. Spawn re-imports the parent's ``__main__`` in the child, so scripts
need the usual ``if __name__ == "__main__":`` guard (vLLM needs it too).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import multiprocessing as mp
import os
import resource
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["Outcome", "KillablePool", "get_pool", "default_workers"]


def default_workers() -> int:
    """Number of CPU cores this process may use (the pool size bound)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Outcome:
    """What happened to one item: ``status`` is ``ok``, ``error`` (the function raised),
    ``timeout`` (killed at its deadline) or ``crashed`` (the worker died on it)."""

    status: str
    value: Any = None
    error: str | None = None


def _resolve_target(target: str) -> Callable[[Any], Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _mapped_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _worker_main(conn: Connection, target: str, memory_bytes: int | None) -> None:
    # The parent handles Ctrl-C; a worker dying on SIGINT mid-item would only add noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))  # no core files
    if memory_bytes:  # a runaway item (e.g. a huge integer) fails with MemoryError, not OOM
        # On top of what is mapped already: spawn has re-imported the parent's __main__,
        # which may have pulled in torch.
        limit = _mapped_bytes() + memory_bytes
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        fn = _resolve_target(target)
    except BaseException as exc:  # report why we cannot work, then exit
        conn.send(("dead", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        idx, item = msg
        try:
            conn.send((idx, "ok", fn(item)))
        except Exception as exc:  # the item failed, the worker is fine
            conn.send((idx, "error", f"{type(exc).__name__}: {exc}"))


class _Worker:
    def __init__(self, ctx: Any, target: str, memory_bytes: int | None) -> None:
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child_conn, target, memory_bytes), daemon=True)
        self.proc.start()
        child_conn.close()
        self.ready = False
        self.task: tuple[int, float] | None = None  # (item index, deadline)

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class KillablePool:
    """``workers`` processes each running ``target`` (``"module:function"``, taking one item).

    Each worker may map ``memory_bytes`` beyond what it holds after start-up (RLIMIT_AS;
    None for no cap). :meth:`map` gives up (RuntimeError) when for ``startup_timeout_s`` in a
    row no worker is ready, i.e. all are still starting (counted afresh each time the pool runs
    out of ready workers, e.g. after a timeout kill), or when workers fail to start 3 times.

    :meth:`map` gives every item a hard wall-clock deadline counted from the moment it is
    handed to a worker; a worker past its deadline is killed and replaced. One ``map`` runs at
    a time (calls from several threads queue on a lock).
    """

    def __init__(
        self,
        target: str,
        workers: int | None = None,
        start_method: str = "spawn",
        startup_timeout_s: float = 120.0,
        memory_bytes: int | None = 4 << 30,
    ) -> None:
        self.target = target
        self.memory_bytes = memory_bytes
        self.size = workers or default_workers()
        self._ctx = mp.get_context(start_method)
        self._startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------
    def _fill(self) -> None:
        while len(self._workers) < self.size:
            self._workers.append(_Worker(self._ctx, self.target, self.memory_bytes))

    def close(self) -> None:
        """Stop all workers (politely, then by force)."""
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 2
        for w in self._workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            w.kill()
        self._workers = []

    # -- work ------------------------------------------------------------------------
    def map(self, items: Sequence[Any], timeout_s: float | None = None) -> list[Outcome]:
        """Run the target on every item; return one :class:`Outcome` per item, in order."""
        if self._closed:
            raise RuntimeError("pool is closed")
        if os.getpid() != self._owner_pid:
            raise RuntimeError("a KillablePool cannot be used from a forked child; create a new one")
        with self._lock:
            return self._map(list(items), timeout_s)

    def _map(self, items: list[Any], timeout_s: float | None) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(items)
        pending = deque(range(len(items)))
        # How long no worker has been ready (all booting, e.g. after a timeout kill); None while one is.
        # Counted from the moment the pool ran out of ready workers, not from the start of the map.
        unready_since: float | None = None
        boot_failures: list[str] = []
        while pending or any(w.task for w in self._workers):
            self._fill()
            now = time.monotonic()
            for w in self._workers:
                if pending and w.ready and w.task is None:
                    idx = pending.popleft()
                    try:
                        w.conn.send((idx, items[idx]))
                    except (OSError, ValueError):  # it died just now; the item goes back
                        pending.appendleft(idx)
                        continue
                    w.task = (idx, now + timeout_s if timeout_s is not None else float("inf"))
            if any(w.ready for w in self._workers):
                unready_since = None
            else:
                if len(boot_failures) >= 3:
                    raise RuntimeError(f"pool workers for {self.target} cannot start: {boot_failures[-1]}")
                if unready_since is None:
                    unready_since = now
                elif now - unready_since > self._startup_timeout_s:
                    raise RuntimeError(f"no worker for {self.target} became ready in {self._startup_timeout_s:.0f} s")
            deadlines = [w.task[1] for w in self._workers if w.task]
            wait_s = min(1.0, max(0.0, min(deadlines) - now)) if deadlines else 1.0
            wait([w.conn for w in self._workers] + [w.proc.sentinel for w in self._workers], timeout=wait_s)
            for w in list(self._workers):
                eof = self._drain(w, results, boot_failures)
                if w.task and time.monotonic() >= w.task[1]:
                    idx = w.task[0]
                    results[idx] = Outcome("timeout", error=f"exceeded {timeout_s} s; worker killed")
                    logger.warning("%s: item %d timed out after %s s; killing worker pid %s",
                                   self.target, idx, timeout_s, w.proc.pid)
                    w.task = None
                    w.kill()
                    self._workers.remove(w)
                elif eof or not w.proc.is_alive():
                    w.proc.join(1)
                    if w.task:
                        results[w.task[0]] = Outcome("crashed", error=f"worker died (exit code {w.proc.exitcode})")
                        w.task = None
                    elif not w.ready:
                        boot_failures.append(f"exit code {w.proc.exitcode}")
                    w.kill()
                    self._workers.remove(w)
        self._fill()  # replacements boot in the background, ready for the next call
        return [r if r is not None else Outcome("crashed", error="lost") for r in results]

    @staticmethod
    def _drain(w: _Worker, results: list[Outcome | None], boot_failures: list[str]) -> bool:
        """Read every message the worker has sent; True if its pipe is closed."""
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                elif msg[0] == "dead":
                    boot_failures.append(msg[1])
                else:
                    idx, status, payload = msg
                    results[idx] = Outcome("ok", payload) if status == "ok" else Outcome("error", error=payload)
                    w.task = None
        except (EOFError, OSError):
            return True
        return False


_pools: dict[tuple[str, int], KillablePool] = {}
_pools_lock = threading.Lock()


def get_pool(target: str, workers: int | None = None) -> KillablePool:
    """The shared pool for ``target`` in this process (created on first use, closed at exit)."""
    key = (target, workers or default_workers())
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None or pool._closed or pool._owner_pid != os.getpid():
            pool = _pools[key] = KillablePool(target, workers)
        return pool


@atexit.register
def _close_pools() -> None:
    for pool in list(_pools.values()):
        if pool._owner_pid == os.getpid():
            pool.close()
