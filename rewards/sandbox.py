"""Run untrusted Python (model-written code) in a contained child process.

Layers, strongest first; each is used where this machine allows it, and what is in effect is
logged once (and returned on every :class:`SandboxResult` as ``isolation``):

- **pids cgroup** (v1 ``/sys/fs/cgroup/pids`` or v2 with the pids controller): caps the
  number of processes of one run (fork bombs) and lists every process of the run, so all of
  them, daemonised or not, are killed at the end.
- **memory cgroup** (v2: the memory controller in the same cgroup; v1: a group under this
  process's own ``/sys/fs/cgroup/memory`` group): ``memory_bytes`` caps the memory of the whole
  run, all its processes together (the kernel's OOM killer kills one of them past it).
- **namespaces** (needs root): a new PID namespace whose init is the program itself, so its
  death kills everything it started; a new network namespace (no interfaces up: no network);
  a private mount namespace with size-capped tmpfs over ``/tmp`` (the fresh working
  directory) and over every other world-writable directory (``/var/tmp``, ``/dev/shm``,
  ``/run/lock``, ...), and every other mount read-only, so the host's temporary files are out
  of sight and nothing the program writes outlives the run or reaches another run.
- **unprivileged uid** (``nobody`` when running as root): file permissions apply, and
  ``RLIMIT_NPROC`` is enforced (the kernel does not enforce it for root).
- **rlimits**: CPU seconds, address space, file size, open files, processes; no core files.
- **host-side**: wall-clock timeout, stdout/stderr read with a cap (the run is killed when
  a cap is passed), a scrubbed environment, a temporary directory removed afterwards.

Programs run as ``python -I -S prog.py`` (standard library only) with an interpreter the
unprivileged user can execute (the first of ``sys.executable``, ``python3`` on PATH,
``/usr/bin/python3`` that is world-executable; pass ``python=`` to choose).

The setup runs in :mod:`rewards._sandbox_init` (a separate script, not ``preexec_fn``,
which may deadlock in a threaded host). Without root only rlimits, process groups and the
timeout remain; a daemonised child can then outlive the run.
"""

from __future__ import annotations

import ast
import logging
import math
import os
import pwd
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["SandboxLimits", "SandboxResult", "run_python", "isolation_report"]

_INIT = str(Path(__file__).with_name("_sandbox_init.py"))
_CGROUP_PARENT = "dsv3_sandbox"
_MEMCG_PREFIX = "dsv3-sbx-"  # cgroup v1 memory groups, made in this process's own group
_NAMESPACES = "mount,pid,net,ipc,uts"


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    timeout_s: float = 5.0  # wall clock, enforced by the host
    cpu_s: int | None = None  # RLIMIT_CPU; default: the timeout rounded up, plus 1
    # RLIMIT_AS (address space) of each process and, where a memory cgroup is available
    # (isolation["memory_cgroup"] is True), the memory of the whole run, all its processes
    # together (exceeding it gets a process OOM-killed: exit status 137). Without a memory
    # cgroup it is per process only: a run of N processes may use up to N times this.
    memory_bytes: int = 1 << 30
    file_size_bytes: int = 16 << 20  # RLIMIT_FSIZE (largest file it may write)
    tmpfs_bytes: int = 64 << 20  # size of the private /tmp working directory
    max_processes: int = 64  # pids.max of the run's cgroup (and RLIMIT_NPROC backstop)
    max_open_files: int = 64  # RLIMIT_NOFILE
    stdout_bytes: int = 1 << 20  # output caps; the run is killed when one is passed
    stderr_bytes: int = 64 << 10

    def __post_init__(self) -> None:
        # 0 or less killed every run at once, and every test case then scored 0.0 as a failed program
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {self.timeout_s}")


@dataclass
class SandboxResult:
    """Outcome of one run. ``killed_reason`` is ``timeout`` or ``output_limit`` when the host
    killed the run (``returncode`` is then -9), else None. A program that died of a signal by
    itself has ``returncode`` 128 + signal (e.g. 137 = SIGKILL, 152 = SIGXCPU).
    ``isolation`` says what was in effect (see :func:`isolation_report`)."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    killed_reason: str | None
    duration_s: float
    isolation: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Exited by itself with status 0."""
        return self.returncode == 0 and self.killed_reason is None


# -- what this machine allows (probed once) ------------------------------------------------
_caps: dict[str, Any] | None = None
_caps_lock = threading.Lock()
_logged = False


def _world_executable(path: str) -> bool:
    """Can an unprivileged user run this file (every directory on the way traversable)?"""
    p = Path(os.path.realpath(path))
    try:
        if not p.stat().st_mode & stat.S_IXOTH:
            return False
        return all(d.stat().st_mode & stat.S_IXOTH for d in p.parents)
    except OSError:
        return False


def _cgroup_root() -> tuple[str | None, bool]:
    """The parent of the per-run pids cgroups, and whether (cgroup v2) they have the memory
    controller too."""
    v1 = "/sys/fs/cgroup/pids"
    if os.path.isfile(os.path.join(v1, "cgroup.procs")):
        root = v1
    elif "pids" in _read("/sys/fs/cgroup/cgroup.subtree_control").split():
        root = "/sys/fs/cgroup"
    else:
        return None, False
    parent = os.path.join(root, _CGROUP_PARENT)
    memory = False
    try:
        os.makedirs(parent, exist_ok=True)
        if root == "/sys/fs/cgroup":  # v2: children of our group need the controller too
            with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                f.write("+pids")
            if "memory" in _read("/sys/fs/cgroup/cgroup.subtree_control").split():
                try:
                    with open(os.path.join(parent, "cgroup.subtree_control"), "w") as f:
                        f.write("+memory")
                    memory = True
                except OSError:
                    pass
        _probe(parent, "probe-")
    except OSError:
        return None, False
    _remove_stale(parent, "")
    return parent, memory


def _memcg_v1_parent() -> str | None:
    """Where per-run cgroup v1 memory groups go: inside this process's own memory group (so a
    run stays within any limit set on the host process), not in a shared parent directory."""
    mount = "/sys/fs/cgroup/memory"
    if not os.path.isfile(os.path.join(mount, "memory.limit_in_bytes")):
        return None
    own = "/"
    for line in _read("/proc/self/cgroup").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and "memory" in parts[1].split(","):
            own = parts[2].strip()
    parent = os.path.join(mount, own.lstrip("/"))
    if not os.path.isdir(parent):  # the mount shows only our own part of the hierarchy
        parent = mount
    try:
        _probe(parent, _MEMCG_PREFIX + "probe-")
    except OSError:
        return None
    _remove_stale(parent, _MEMCG_PREFIX)
    return parent


def _probe(parent: str, prefix: str) -> None:
    probe = os.path.join(parent, prefix + uuid.uuid4().hex)
    os.mkdir(probe)
    os.rmdir(probe)


def _remove_stale(parent: str, prefix: str) -> None:
    # Groups left by a host that died mid-run: remove the empty ones (rmdir refuses the
    # others); only old ones, since other processes may be setting up runs right now.
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.name.startswith(prefix) and entry.is_dir() and time.time() - entry.stat().st_mtime > 600:
                os.rmdir(entry.path)
        except OSError:
            pass


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _capabilities() -> dict[str, Any]:
    global _caps
    with _caps_lock:
        if _caps is None:
            root = os.geteuid() == 0
            caps: dict[str, Any] = {"root": root, "cgroup": None, "memory_v2": False, "memcg_v1": None}
            if root:
                caps["cgroup"], caps["memory_v2"] = _cgroup_root()
                if not caps["memory_v2"]:
                    caps["memcg_v1"] = _memcg_v1_parent()
            caps["uid"] = caps["gid"] = -1
            if root:
                try:
                    pw = pwd.getpwnam("nobody")
                    caps["uid"], caps["gid"] = pw.pw_uid, pw.pw_gid
                except KeyError:
                    pass
            candidates = [sys.executable, shutil.which("python3") or "", "/usr/bin/python3", "/usr/local/bin/python3"]
            usable = [c for c in candidates if c and os.path.exists(c)]
            if caps["uid"] >= 0:
                usable = [c for c in usable if _world_executable(c)]
            caps["python"] = os.path.realpath(usable[0]) if usable else None
            _caps = caps
        return _caps


def isolation_report() -> dict[str, Any]:
    """Run a trivial program once and return the isolation that was in effect."""
    return run_python("print(1)").isolation


def _log_isolation_once(iso: dict[str, Any]) -> None:
    global _logged
    if _logged or not iso:
        return
    _logged = True
    missing = [k for k in ("cgroup", "memory_cgroup", "ns_pid", "ns_net", "ns_mount", "private_tmp", "read_only_fs")
               if iso.get(k) is not True]
    if iso.get("uid", 0) == 0:
        missing.append("unprivileged uid")
    if missing:
        logger.warning("code sandbox: running with weaker isolation, missing: %s (%s)", ", ".join(missing), iso)
    else:
        logger.info("code sandbox: isolation in effect: %s", iso)


# -- one run -------------------------------------------------------------------------------
def run_python(
    code: str,
    stdin: str | bytes = "",
    limits: SandboxLimits | None = None,
    python: str | None = None,
) -> SandboxResult:
    """Run ``code`` as a Python script with ``stdin`` as its input, contained (see module doc).

    Never raises for anything the program does; the host and its files are unaffected
    whatever the program does within the isolation that is in effect. Text is passed on as
    UTF-8; lone surrogates (not valid Unicode text) are encoded as such (``surrogatepass``), so
    such a program fails to compile and such input reads as invalid UTF-8, as they would from
    any file.
    """
    limits = limits or SandboxLimits()
    caps = _capabilities()
    python = python or caps["python"]
    if python is None:
        raise RuntimeError("no Python interpreter that the sandbox user may run was found")
    tmp = tempfile.mkdtemp(prefix="dsv3-sbx-")
    cgroup = memcg = None
    memory_capped = False
    try:
        os.chmod(tmp, 0o711)  # the unprivileged user may pass through to work/, not list
        prog = os.path.join(tmp, "prog.py")
        with open(prog, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)
        workdir = os.path.join(tmp, "work")  # used only when no private /tmp can be mounted
        os.mkdir(workdir, 0o700)
        stdin_path = os.path.join(tmp, "stdin")
        with open(stdin_path, "wb") as f:
            f.write(stdin.encode("utf-8", "surrogatepass") if isinstance(stdin, str) else stdin)
        if caps["cgroup"]:
            cgroup = os.path.join(caps["cgroup"], uuid.uuid4().hex)
            try:
                os.mkdir(cgroup)
                with open(os.path.join(cgroup, "pids.max"), "w") as f:
                    f.write(str(limits.max_processes))
            except OSError as exc:
                logger.warning("code sandbox: cannot create cgroup %s: %s", cgroup, exc)
                _remove_cgroup(cgroup)
                cgroup = None
            if cgroup and caps["memory_v2"]:
                memory_capped = _set_memory_limit(cgroup, limits.memory_bytes, "memory.max", "memory.swap.max")
        if caps["memcg_v1"]:
            memcg = os.path.join(caps["memcg_v1"], _MEMCG_PREFIX + uuid.uuid4().hex)
            try:
                os.mkdir(memcg)
            except OSError as exc:
                logger.warning("code sandbox: cannot create memory cgroup %s: %s", memcg, exc)
                memcg = None
            if memcg:
                memory_capped = _set_memory_limit(memcg, limits.memory_bytes, "memory.limit_in_bytes",
                                                  "memory.memsw.limit_in_bytes")
                if not memory_capped:
                    _remove_cgroup(memcg)
                    memcg = None
        cpu = limits.cpu_s or math.ceil(limits.timeout_s) + 1
        cfg = {
            "prog": prog,
            "workdir": workdir,
            "cpu": cpu,
            "as": limits.memory_bytes,
            "fsize": limits.file_size_bytes,
            "nofile": limits.max_open_files,
            # RLIMIT_NPROC counts every process of the uid machine-wide (concurrent runs
            # share it), so it is only a loose backstop; the cgroup is the per-run cap.
            "nproc": limits.max_processes * 4,
            "tmpfs_bytes": limits.tmpfs_bytes,
        }
        if caps["root"]:
            cfg.update(unshare=_NAMESPACES, uid=caps["uid"], gid=caps["gid"])
        if cgroup:
            cfg["cgroup"] = cgroup
        if memcg:
            cfg["memcg"] = memcg
        res = _execute(cfg, python, stdin_path, limits, [g for g in (cgroup, memcg) if g])
        iso = res.isolation
        joined = iso.get("memory_cgroup") if memcg else iso.get("cgroup")
        iso["memory_cgroup"] = memory_capped and joined is True
        if memcg:
            iso["memory_cgroup_path"] = memcg
        _log_isolation_once(iso)
        return res
    finally:
        for group in (cgroup, memcg):
            if group:
                _kill_cgroup(group)
                _remove_cgroup(group)
        shutil.rmtree(tmp, ignore_errors=True)


def _set_memory_limit(group: str, limit: int, limit_file: str, swap_file: str) -> bool:
    """Cap the group's memory at ``limit`` bytes; and its swap (v2: none, v1: memory + swap at the
    same limit) where the kernel accounts for swap. False if the memory limit could not be set."""
    try:
        with open(os.path.join(group, limit_file), "w") as f:
            f.write(str(limit))
    except OSError as exc:
        logger.warning("code sandbox: cannot set %s in %s: %s", limit_file, group, exc)
        return False
    if os.path.exists(os.path.join(group, swap_file)):
        try:
            with open(os.path.join(group, swap_file), "w") as f:
                f.write("0" if swap_file == "memory.swap.max" else str(limit))
        except OSError:
            pass
    return True


def _execute(cfg: dict[str, Any], python: str, stdin_path: str, limits: SandboxLimits,
             groups: list[str]) -> SandboxResult:
    status_r, status_w = os.pipe()
    cfg["status_fd"] = status_w
    argv = [sys.executable, "-I", "-S", _INIT, *(f"{k}={v}" for k, v in cfg.items()),
            "--", python, "-I", "-S", "{prog}"]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
           "PYTHONHASHSEED": "0"}
    start = time.monotonic()
    try:
        with open(stdin_path, "rb") as stdin_f:
            proc = subprocess.Popen(argv, stdin=stdin_f, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, cwd=os.path.dirname(stdin_path), start_new_session=True,
                                    pass_fds=(status_w,))
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    out, err, status = bytearray(), bytearray(), bytearray()
    killed_reason = None
    deadline = start + limits.timeout_s
    sel = selectors.DefaultSelector()
    caps = {proc.stdout: limits.stdout_bytes, proc.stderr: limits.stderr_bytes}
    bufs = {proc.stdout: out, proc.stderr: err}
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    status_f = os.fdopen(status_r, "rb", buffering=0)
    sel.register(status_f, selectors.EVENT_READ)
    try:
        while sel.get_map() and killed_reason is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                killed_reason = "timeout"
                break
            for key, _ in sel.select(timeout=remaining):
                f = key.fileobj
                chunk = os.read(f.fileno(), 65536)  # type: ignore[union-attr]
                if not chunk:
                    sel.unregister(f)
                    continue
                if f is status_f:
                    status += chunk[:4096]
                    continue
                buf = bufs[f]
                room = caps[f] - len(buf)
                buf += chunk[: max(room, 0)]
                if len(chunk) > room:
                    killed_reason = "output_limit"
                    break
        if killed_reason is None:
            try:  # pipes closed; the process should be exiting
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed_reason = "timeout"
        if killed_reason is not None:
            _kill(proc, groups)
        proc.wait()
    finally:
        sel.close()
        status_f.close()
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()
    try:
        isolation = ast.literal_eval(status.decode()) if status else {}
    except (ValueError, SyntaxError):
        isolation = {"status": status.decode(errors="replace")}
    if "cgroup" not in cfg:
        isolation.setdefault("cgroup", False)
    else:
        isolation["cgroup_path"] = cfg["cgroup"]  # removed once the run's processes are all gone
    return SandboxResult(
        returncode=proc.returncode,
        stdout=out.decode("utf-8", errors="replace"),
        stderr=err.decode("utf-8", errors="replace"),
        timed_out=killed_reason == "timeout",
        killed_reason=killed_reason,
        duration_s=time.monotonic() - start,
        isolation=isolation,
    )


def _kill(proc: subprocess.Popen, groups: list[str]) -> None:
    """SIGKILL the run: its process group (before it is reaped, so the id is still ours) and,
    through its cgroups, everything else it started (setsid/daemonised children too)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for group in groups:
        _kill_cgroup(group)


def _cgroup_pids(cgroup: str) -> list[int]:
    return [int(p) for p in _read(os.path.join(cgroup, "cgroup.procs")).split()]


def _kill_cgroup(cgroup: str, timeout_s: float = 5.0) -> None:
    # Repeat: a process may fork between reading the list and the kill (pids.max bounds it).
    if os.path.exists(os.path.join(cgroup, "cgroup.kill")):  # cgroup v2 >= 5.14: one write kills all
        try:
            with open(os.path.join(cgroup, "cgroup.kill"), "w") as f:
                f.write("1")
        except OSError:
            pass
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        pids = _cgroup_pids(cgroup)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    logger.error("code sandbox: processes of %s survived SIGKILL: %s", cgroup, _cgroup_pids(cgroup))


def _remove_cgroup(cgroup: str) -> None:
    end = time.monotonic() + 2.0
    while True:
        try:
            os.rmdir(cgroup)  # succeeds only once empty; killed tasks leave asynchronously
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > end:
                logger.warning("code sandbox: could not remove cgroup %s", cgroup)
                return
            time.sleep(0.005)
