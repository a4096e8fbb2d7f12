"""Sandbox init: sets up isolation as root, then execs the untrusted program.

Run by :mod:`rewards.sandbox` as ``python -I -S _sandbox_init.py key=value ... -- cmd ...``.
Standard library only (it runs in isolated mode, before anything else is imported), and it
is a separate script rather than a ``preexec_fn`` because ``preexec_fn`` is unsafe when the
host has threads (code_tests runs sandboxes from a thread pool).

Steps, each best-effort and reported on the status fd so the host knows what is in effect:
1. join the run's cgroups: pids (every later process inherits it; the host kills them all) and,
   where there is one, memory (``memory_bytes`` caps the whole run, not just each process);
2. new mount, PID, network, IPC and UTS namespaces (``unshare(2)``);
3. fork: the child is PID 1 of the new PID namespace, so when it exits or is killed the
   kernel kills every process left in the namespace, daemonised ones included; the parent
   stays outside, waits and passes the exit status on (it forks without a PID namespace too,
   so the program's parent is never the host process);
4. in the child: private mount propagation, a fresh ``/proc``, size-capped tmpfs over
   ``/tmp`` (the working directory) and over every other world-writable directory it could
   reach (``/var/tmp``, ``/dev/shm``, ``/run/lock`` = ``/var/lock``, ``/dev/mqueue``, ...: a
   fixed list plus a scan of ``/``, ``/run``, ``/var``, ``/dev`` and every mount point), then
   every other mount made read-only, so the program can neither see nor fill the host's
   temporary files nor leave files behind (or pass them to another run) anywhere;
5. rlimits, drop to an unprivileged uid, no_new_privs, parent-death SIGKILL, exec.
"""

import ctypes
import os
import re
import resource
import signal
import stat
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
MS_REC, MS_PRIVATE = 16384, 1 << 18
# Per-mount options as /proc/self/mountinfo spells them -> the flags a bind remount must keep.
_KEEP_FLAGS = {b"nosuid": MS_NOSUID, b"nodev": MS_NODEV, b"noexec": MS_NOEXEC, b"noatime": 1024,
               b"nodiratime": 2048, b"relatime": 1 << 21, b"strictatime": 1 << 24, b"nosymfollow": 256}
# Where world-writable directories usually are; each is checked, and more are found by a scan.
_WRITABLE_CANDIDATES = ("/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/dev/mqueue", "/run/shm",
                        "/var/crash", "/var/lib/php/sessions")
_SCAN_DIRS = ("/", "/run", "/var", "/dev")
_TMP_FS = {b"tmpfs", b"ramfs", b"mqueue", b"hugetlbfs"}  # mount points of these types are checked too
_REMOTE_FS = {b"nfs", b"nfs4", b"cifs", b"smb3", b"smbfs", b"ceph", b"glusterfs", b"lustre", b"9p", b"afs",
              b"autofs", b"sshfs", b"davfs", b"gpfs", b"beegfs", b"virtiofs"}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

_NS_FLAGS = {"mount": CLONE_NEWNS, "pid": CLONE_NEWPID, "net": CLONE_NEWNET, "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS}
_RLIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "as": resource.RLIMIT_AS,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "nproc": resource.RLIMIT_NPROC,
}

libc = ctypes.CDLL(None, use_errno=True)


def _unshare(flags):
    return libc.unshare(ctypes.c_int(flags)) == 0


def _mount(source, target, fstype, flags, data):
    enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    return libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0


def _mountinfo():
    """(mount point, per-mount options, filesystem type) of every mount in this namespace, bytes."""
    out = []
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 6:
                    point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), fields[4])
                    rest = fields[fields.index(b"-", 6) + 1:] if b"-" in fields[6:] else []
                    out.append((point, fields[5].split(b","), rest[0] if rest else b""))
    except OSError:
        pass
    return out


def _under(path, roots):
    return any(path == r or path.startswith(r.rstrip(b"/") + b"/") for r in roots)


def _world_writable_dirs(mounts):
    """Directories anyone may create files in (sticky /tmp-like ones included): the usual
    places, every entry of ``_SCAN_DIRS`` and every tmpfs-like mount point; symlinks resolved,
    deduplicated. Remote, FUSE and automount filesystems are not looked at (a hung server
    would hang the run); the read-only remount covers them."""
    skip = [m for m, _, t in mounts if t in _REMOTE_FS or t.startswith(b"fuse")] + [b"/proc", b"/sys"]
    paths = [m for m, _, t in mounts if t in _TMP_FS]
    for d in _SCAN_DIRS:
        try:
            with os.scandir(d.encode()) as it:
                paths += [e.path for e in it if not _under(e.path, skip) and e.is_dir(follow_symlinks=True)]
        except OSError:
            pass
    found, seen = [], set()
    candidates = [(p.encode(), True) for p in _WRITABLE_CANDIDATES] + [(p, False) for p in paths]
    for p, usual in candidates:
        try:
            real = os.path.realpath(p)
            if not usual and _under(real, skip):
                continue
            st = os.stat(real)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_IWOTH and real not in seen:
            seen.add(real)
            found.append(real)
    return sorted(found, key=len)  # a parent before its children


def _private_dirs(cfg, status):
    """tmpfs over /tmp (the working directory) and every other world-writable directory, then
    the rest of the filesystem read-only. Returns the working directory (None: no private /tmp)."""
    size = int(cfg.get("tmpfs_bytes", 64 << 20))
    mounts = _mountinfo()
    extra = [d for d in _world_writable_dirs(mounts) if d != b"/tmp"]
    if not _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=%d,mode=1777" % size):
        status["private_tmp"] = False
        return None
    status["private_tmp"] = True
    private = [b"/tmp"]
    for d in extra:
        if _under(d, private):  # already inside a private one
            continue
        if _mount(b"tmpfs", d, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=1777"):
            private.append(d)
        else:  # left to the read-only remount below
            status.setdefault("private_dirs_failed", []).append(d.decode(errors="replace"))
    status["private_dirs"] = [d.decode(errors="replace") for d in private[1:]]
    # Everything else read-only: world-writable places the scan missed, files of uid nobody, ...
    # (a bind remount changes only this namespace's view; flags the mount had are kept).
    failed = []
    for point, opts, _ in _mountinfo():
        if _under(point, private) or _under(point, (b"/proc",)) or b"ro" in opts:
            continue
        keep = 0
        for o in opts:
            keep |= _KEEP_FLAGS.get(o, 0)
        if not _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None) and os.path.exists(point):
            failed.append(point)
    status["read_only_fs"] = True if not failed else "failed: %s" % b", ".join(failed[:5]).decode(errors="replace")
    return "/tmp"


def main(argv):
    sep = argv.index("--")
    cfg = dict(a.split("=", 1) for a in argv[:sep])
    cmd = argv[sep + 1 :]
    status = {}
    status_fd = int(cfg["status_fd"])
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files from the init or the program

    for key, name in (("cgroup", "cgroup"), ("memcg", "memory_cgroup")):
        if cfg.get(key):  # memcg: a cgroup v1 memory group (v2: the one cgroup has both)
            try:
                with open(os.path.join(cfg[key], "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
                status[name] = True
            except OSError as exc:
                status[name] = "failed: %s" % exc

    with open(cfg["prog"], "rb") as f:
        program = f.read()

    wanted = [n for n in cfg.get("unshare", "").split(",") if n]
    done = set()
    if wanted and _unshare(sum(_NS_FLAGS[n] for n in wanted)):
        done = set(wanted)
    else:  # the kernel may refuse one kind (e.g. no CONFIG_NET_NS); take what it allows
        for n in wanted:
            if _unshare(_NS_FLAGS[n]):
                done.add(n)
    for n in wanted:
        status["ns_" + n] = n in done

    # Mounts only after propagation is private, or they would leak back to the host.
    mounts_ok = "mount" in done and _mount(None, "/", None, MS_REC | MS_PRIVATE, None)

    # Always fork, even without a PID namespace, so the program's parent is this init and
    # not the host process (``os.kill(os.getppid(), 9)`` must not reach the host).
    child = os.fork()
    if child:
        os.close(status_fd)
        try:  # at the memory limit the OOM killer should pick the program, not this waiter
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("-1000")
        except OSError:
            pass
        _wait_and_exit(child)
    if "pid" in done:
        if mounts_ok:  # a /proc that shows only this namespace
            status["proc"] = _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)

    workdir = cfg["workdir"]
    if mounts_ok:
        workdir = _private_dirs(cfg, status) or workdir
    else:
        status["private_tmp"] = False
    status["workdir"] = workdir

    uid, gid = int(cfg.get("uid", -1)), int(cfg.get("gid", -1))
    prog_path = os.path.join(workdir, "prog.py")
    with open(prog_path, "wb") as f:
        f.write(program)
    if uid >= 0:
        os.chown(workdir, uid, gid)
        os.chown(prog_path, uid, gid)
    os.chmod(workdir, 0o700)

    for name, res in _RLIMITS.items():
        if name in cfg:
            value = int(cfg[name])
            try:
                resource.setrlimit(res, (value, value + 1 if name == "cpu" else value))
            except (ValueError, OSError) as exc:
                status["rlimit_" + name] = "failed: %s" % exc

    if uid >= 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    status["uid"] = os.getuid()
    status["no_new_privs"] = libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    # Set after the uid change (which clears it): if the waiting parent dies, so do we.
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    os.chdir(workdir)
    os.write(status_fd, repr(status).encode())
    os.close(status_fd)
    env = dict(os.environ, HOME=workdir, TMPDIR=workdir)
    cmd = [prog_path if a == "{prog}" else a for a in cmd]
    try:
        os.execve(cmd[0], cmd, env)
    except OSError as exc:
        os.write(2, ("sandbox: cannot exec %s: %s\n" % (cmd[0], exc)).encode())
        os._exit(126)


def _wait_and_exit(child):
    def forward(signum, frame):
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            _, st = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    os._exit(128 + os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st))


if __name__ == "__main__":
    main(sys.argv[1:])
