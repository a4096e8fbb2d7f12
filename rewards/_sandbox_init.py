"""Sandbox init: sets up isolation as root, then execs the untrusted program.

Run by :mod:`rewards.sandbox` as ``python -I -S _sandbox_init.py key=value ... -- cmd ...``.
Standard library only (it runs in isolated mode, before anything else is imported), and it
is a separate script rather than a ``preexec_fn`` because ``preexec_fn`` is unsafe when the
host has threads (code_tests runs sandboxes from a thread pool).

Steps, each best-effort and reported on the status fd so the host knows what is in effect:
1. join the run's pids cgroup (every later process inherits it; the host kills them all);
2. new mount, PID, network, IPC and UTS namespaces (``unshare(2)``);
3. fork: the child is PID 1 of the new PID namespace, so when it exits or is killed the
   kernel kills every process left in the namespace, daemonised ones included; the parent
   stays outside, waits and passes the exit status on (it forks without a PID namespace too,
   so the program's parent is never the host process);
4. in the child: private mount propagation, a fresh ``/proc``, size-capped tmpfs over
   ``/tmp`` (the working directory), ``/var/tmp`` and ``/dev/shm`` so the program can
   neither see nor fill the host's temporary files;
5. rlimits, drop to an unprivileged uid, no_new_privs, parent-death SIGKILL, exec.
"""

import ctypes
import os
import resource
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
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
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    return libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0


def main(argv):
    sep = argv.index("--")
    cfg = dict(a.split("=", 1) for a in argv[:sep])
    cmd = argv[sep + 1 :]
    status = {}
    status_fd = int(cfg["status_fd"])
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core files from the init or the program

    if cfg.get("cgroup"):
        try:
            with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
            status["cgroup"] = True
        except OSError as exc:
            status["cgroup"] = "failed: %s" % exc

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
        _wait_and_exit(child)
    if "pid" in done:
        if mounts_ok:  # a /proc that shows only this namespace
            status["proc"] = _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)

    workdir = cfg["workdir"]
    if mounts_ok:
        size = int(cfg.get("tmpfs_bytes", 64 << 20))
        if _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=%d,mode=1777" % size):
            workdir = "/tmp"
            for extra in ("/var/tmp", "/dev/shm"):
                if os.path.isdir(extra):
                    _mount("tmpfs", extra, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=1777")
            status["private_tmp"] = True
        else:
            status["private_tmp"] = False
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
