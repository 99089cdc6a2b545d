"""The first process inside a model sandbox's namespaces. Run by registry.confinement as root under
util-linux `unshare` (new mount, PID, network, IPC, UTS and cgroup namespaces, this process PID 1),
never imported by the platform, standard library only:

    unshare ... -- python -I -S registry/jail.py '<spec json>'

It builds a new root on a small read-only tmpfs holding only what the spec names (Python, its
libraries and site-packages read-only, the model's files read-only, scratch folders writable, /proc of
the new PID namespace and a few character devices), pivots into it and lets go of the old root, then
forks the payload: resource limits set, every group and capability dropped, an unprivileged uid, no
new privileges, a clean environment. It waits for the payload and exits with its status (128 + the
signal that ended it), and because it is PID 1, everything the payload started dies with it.
"""

import ctypes
import json
import os
import resource
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC = 32, 4096, 16384
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS = 38
SYS_PIVOT_ROOT = {"x86_64": 155}  # the generic syscall table's 41 elsewhere (aarch64)
# Exit codes of the jail itself (the payload's own codes pass through unchanged).
SETUP_FAILED = 125

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _c(text: str | None) -> bytes | None:
    return text.encode() if text is not None else None


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(_c(source), _c(target), _c(fstype), ctypes.c_ulong(flags), _c(data)),
           f"mount {source} on {target}")


def bind(source: str, target: str, flags: int) -> None:
    mount(source, target, None, MS_BIND | MS_REC)
    mount(None, target, None, MS_BIND | MS_REMOUNT | flags)


def place(root: str, path: str, writable: bool) -> None:
    """Make `path` appear at the same path inside `root`: symlinks as symlinks, the rest bound."""
    inside = root + path
    os.makedirs(os.path.dirname(inside), exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), inside)
        return
    if os.path.isdir(path):
        os.makedirs(inside, exist_ok=True)
    else:
        open(inside, "a").close()
    bind(path, inside, MS_NOSUID | MS_NODEV | (0 if writable else MS_RDONLY))


def build_root(spec: dict) -> None:
    root = spec["root"]
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    for path in spec["read_only"]:
        if os.path.lexists(path):
            place(root, path, writable=False)
    for path in spec["writable"]:
        place(root, path, writable=True)
    os.makedirs(root + "/dev")
    for device in spec["devices"]:
        open(root + device, "a").close()
        bind(device, root + device, MS_NOSUID | MS_NOEXEC)
    os.makedirs(root + "/dev/shm")  # POSIX semaphores and shared memory (joblib, torch), in memory, bounded
    mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64m,mode=1777")
    os.makedirs(root + "/proc")
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(root + "/etc", exist_ok=True)
    with open(root + "/etc/passwd", "w") as fh:  # some libraries ask who they are
        fh.write(f"sandbox:x:{spec['uid']}:{spec['gid']}:model sandbox:{spec['cwd']}:/nonexistent\n")
    with open(root + "/etc/group", "w") as fh:
        fh.write(f"sandbox:x:{spec['gid']}:\n")
    mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    # Into the new root; the old one is detached, so nothing of the host's filesystem stays reachable.
    os.chdir(root)
    _check(_libc.syscall(SYS_PIVOT_ROOT.get(os.uname().machine, 41), b".", b"."), "pivot_root")
    _check(_libc.umount2(b".", MNT_DETACH), "detaching the old root")
    os.chdir("/")


def drop_and_exec(spec: dict) -> None:
    """In the payload's process: limits, then an unprivileged identity, then the payload."""
    limits = spec["limits"]
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 5))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"], limits["memory_bytes"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.setgroups([])
    os.setresgid(spec["gid"], spec["gid"], spec["gid"])
    os.setresuid(spec["uid"], spec["uid"], spec["uid"])  # from root to a plain uid: every capability goes
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.chdir(spec["cwd"])
    os.execve(spec["argv"][0], spec["argv"], spec["env"])


def main() -> int:
    spec = json.loads(sys.argv[1])
    try:
        build_root(spec)
    except OSError as exc:
        print(f"sandbox setup failed: {exc}", file=sys.stderr, flush=True)
        return SETUP_FAILED
    pid = os.fork()
    if pid == 0:
        try:
            drop_and_exec(spec)
        except BaseException as exc:  # noqa: BLE001 - nothing may run on as root
            print(f"sandbox setup failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(SETUP_FAILED)
    # PID 1 of the namespace: reap whatever is orphaned to us until the payload itself ends.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: os.kill(pid, signal.SIGKILL))
    while True:
        reaped, status = os.wait()
        if reaped == pid:
            if os.WIFSIGNALED(status):
                return 128 + os.WTERMSIG(status)
            return os.WEXITSTATUS(status)


if __name__ == "__main__":
    sys.exit(main())
