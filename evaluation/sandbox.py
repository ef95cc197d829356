"""Run untrusted programs (model-written code + HumanEval tests) in contained processes.

Layers, each enough on its own for the attacks it covers (the guard is defence in depth, not the wall):

- a fresh ``python -I -S`` process per program (never a fork of the evaluator), in its own session, so the
  whole process group is killed on timeout; leftovers that escaped the group are swept by uid;
- when root: a private network namespace (``unshare --net``: only a down loopback), a private mount
  namespace where the working dir and every world-writable dir are fresh size-capped tmpfs (writes never
  reach the host disk and vanish with the process), and a dedicated
  unprivileged uid per parallel slot (kernel-enforced: no writes outside the private dir, no signals to the
  evaluator, RLIMIT_NPROC against fork bombs, no reading ``/proc/<evaluator>/environ``);
- rlimits: CPU seconds, address space, file size, open files, processes, no core dumps;
- a scrubbed environment (the evaluator's secrets never reach the child), closed stdin, HOME and TMPDIR
  pointing at the private dir, output read with a byte cap (the rest drained and dropped);
- the child is SIGKILLed by the kernel if the evaluator dies (PR_SET_PDEATHSIG): no orphans after a crash;
- inside the child, ``reliability_guard``-style disabling of kill/fork/exec/remove/socket.

Execution is opt-in (``allow_execution=True``), like bigcode-evaluation-harness's ``--allow-code-execution``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from evaluation.errors import EvalError

CHILD = Path(__file__).with_name("sandbox_child.py")
STATUSES = ("passed", "failed", "timeout", "killed", "error")
LOCK_DIR = Path(tempfile.gettempdir()) / "lord-sandbox-locks"


@dataclass(frozen=True)
class SandboxConfig:
    """Limits of one sandboxed execution. Defaults suit HumanEval (stdlib-only, sub-second tests)."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 5
    memory_mb: int = 1024
    max_output_bytes: int = 64 * 1024
    max_file_mb: int = 16
    max_processes: int = 16
    max_open_files: int = 64
    workers: int = 2
    guard: bool = True
    isolate_network: bool = True
    drop_privileges: bool = True
    private_mounts: bool = True
    tmpfs_mb: int = 64
    uid_base: int = 61000
    uid_slots: int = 256

    def __post_init__(self) -> None:
        checks = [
            ("wall_seconds", self.wall_seconds > 0, "> 0"),
            ("cpu_seconds", isinstance(self.cpu_seconds, int) and self.cpu_seconds >= 1, "an int >= 1"),
            ("memory_mb", self.memory_mb >= 64, ">= 64 (the interpreter alone maps ~30 MB)"),
            ("max_output_bytes", self.max_output_bytes >= 0, ">= 0"),
            ("max_file_mb", self.max_file_mb >= 0, ">= 0"),
            ("max_processes", self.max_processes >= 1, ">= 1"),
            ("max_open_files", self.max_open_files >= 16, ">= 16"),
            ("workers", isinstance(self.workers, int) and self.workers >= 1, "an int >= 1"),
            ("uid_base", 1000 <= self.uid_base < 2**31 - self.uid_slots, "in [1000, 2^31 - uid_slots)"),
            ("uid_slots", self.uid_slots >= 1, ">= 1"),
            ("tmpfs_mb", isinstance(self.tmpfs_mb, int) and self.tmpfs_mb >= 4, "an int >= 4"),
        ]
        for field, ok, expected in checks:
            if not ok:
                raise EvalError(
                    f"SandboxConfig.{field}={getattr(self, field)!r} is invalid: expected {expected}; "
                    f"pass a value in range."
                )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program: ``status`` in STATUSES and a human-readable ``reason``."""

    status: str
    reason: str
    seconds: float
    returncode: int | None
    output: str
    output_bytes: int
    output_truncated: bool

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict:
        return asdict(self)


class Sandbox:
    """Executes programs under ``SandboxConfig`` limits; ``run`` for one, ``run_many`` in parallel."""

    def __init__(self, cfg: SandboxConfig | None = None, allow_execution: bool = False) -> None:
        if not allow_execution:
            raise EvalError(
                "Executing model-generated code was not allowed (allow_execution=False). It runs in a "
                "sandbox, but only opt in knowingly: pass allow_execution=True (CLI: --allow-code-execution)."
            )
        self.cfg = cfg or SandboxConfig()
        self.is_root = os.geteuid() == 0
        self.privileged = self.is_root and self.cfg.drop_privileges
        self.netns = self.cfg.isolate_network and self.is_root and _unshare_works("--net")
        self.mountns = self.cfg.private_mounts and self.privileged and _unshare_works("--mount")
        self.python = _interpreter(world_readable=self.privileged)
        self._uids = _UidPool(self.cfg.uid_base, self.cfg.uid_slots) if self.privileged else None

    def describe(self) -> dict:
        """What isolation is actually in force on this machine (for reports and logs)."""
        return {
            "privilege_drop": self.privileged,
            "network_namespace": self.netns,
            "private_tmpfs_mounts": self.mountns,
            "network_blocked_by_guard": self.cfg.guard and not self.netns,
            "guard": self.cfg.guard,
            "python": self.python,
            **self.cfg.to_dict(),
        }

    def run(self, program: str) -> ExecResult:
        if self._uids is None:
            return self._run(program, None)
        with self._uids.acquire() as uid:
            return self._run(program, uid)

    def run_many(self, programs: Sequence[str], progress: bool = True, desc: str = "sandbox") -> list[ExecResult]:
        """Run programs on ``cfg.workers`` threads (each drives one child process); results in input order."""
        with ThreadPoolExecutor(max_workers=self.cfg.workers) as pool:
            it = pool.map(self.run, programs)
            return list(tqdm(it, total=len(programs), desc=desc, disable=not progress))

    # -- one execution -------------------------------------------------------------------------------------
    def _run(self, program: str, uid: int | None) -> ExecResult:
        cfg = self.cfg
        workdir = Path(tempfile.mkdtemp(prefix="lord-sbx-"))
        read_fd, write_fd = os.pipe()
        proc = None
        t0 = time.perf_counter()
        try:
            (workdir / "program.py").write_text(program, encoding="utf-8")
            if uid is not None:
                os.chown(workdir, uid, uid)
                os.chown(workdir / "program.py", uid, uid)
            spec = {
                "program": str(workdir / "program.py"), "result_fd": write_fd, "uid": uid, "gid": uid,
                "cpu_seconds": cfg.cpu_seconds, "memory_bytes": cfg.memory_mb << 20,
                "file_bytes": cfg.max_file_mb << 20, "max_open_files": cfg.max_open_files,
                "max_processes": cfg.max_processes, "guard": cfg.guard, "block_network": not self.netns,
                "private_mounts": self.mountns, "workdir": str(workdir), "tmpfs_mb": cfg.tmpfs_mb,
                "parent_pid": os.getpid(),
            }
            cmd = [self.python, "-I", "-S", str(CHILD), json.dumps(spec)]
            namespaces = ["--net"] * self.netns + ["--mount", "--propagation", "private"] * self.mountns
            if namespaces:
                cmd = ["unshare", *namespaces, "--", *cmd]
            env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
                   "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
            try:
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    cwd=workdir, env=env, start_new_session=True, pass_fds=(write_fd,), close_fds=True,
                )
            except OSError as e:
                return ExecResult("error", f"could not start the sandbox process: {e}", 0.0, None, "", 0, False)
            os.close(write_fd)
            write_fd = -1
            out = _CappedReader(proc.stdout, cfg.max_output_bytes)
            res = _CappedReader(os.fdopen(read_fd, "rb"), 4000)
            read_fd = -1
            timed_out = False
            try:
                proc.wait(timeout=cfg.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc.pid)
            if uid is not None:
                _kill_uid(uid)
            if timed_out:
                proc.wait()
            out.join(5.0)
            res.join(5.0)
            seconds = time.perf_counter() - t0
            status, reason = _classify(proc.returncode, timed_out, res.text().strip(), out.text(), cfg)
            return ExecResult(status, reason, seconds, proc.returncode, out.text(), out.total, out.truncated)
        finally:
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
            if proc is not None and proc.poll() is None:
                _kill_group(proc.pid)
                proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)


def _classify(rc: int, timed_out: bool, result: str, output: str, cfg: SandboxConfig) -> tuple[str, str]:
    if timed_out:
        return "timeout", f"wall-clock limit of {cfg.wall_seconds:g} s exceeded; process group killed"
    if rc == 0 and result == "passed":
        return "passed", "all tests passed"
    if rc < 0:
        sig = signal.Signals(-rc).name if -rc in signal.valid_signals() else str(-rc)
        if -rc == signal.SIGXCPU:
            return "timeout", f"CPU-time limit of {cfg.cpu_seconds} s exceeded ({sig})"
        return "killed", f"killed by {sig}" + (" (CPU hard limit or out of memory)" if -rc == 9 else "")
    if result.startswith("failed:"):
        if "MemoryError" in result:
            result += f" (address-space limit {cfg.memory_mb} MB)"
        return "failed", result[len("failed: "):]
    last = output.strip().splitlines()[-1][:300] if output.strip() else "no output"
    return "failed", f"exited with status {rc} before the tests finished ({last})"


class _CappedReader:
    """Drain a pipe on a thread, keeping the first ``cap`` bytes (a child writing 1 GB cannot fill RAM)."""

    def __init__(self, stream, cap: int) -> None:
        self.stream, self.cap, self.total = stream, cap, 0
        self.chunks: list[bytes] = []
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        kept = 0
        with contextlib.suppress(OSError, ValueError):
            while block := self.stream.read1(1 << 16):
                self.total += len(block)
                if kept < self.cap:
                    self.chunks.append(block[: self.cap - kept])
                    kept += len(self.chunks[-1])
        with contextlib.suppress(OSError):
            self.stream.close()

    def join(self, seconds: float) -> None:
        self.thread.join(seconds)

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


class _UidPool:
    """One dedicated uid per concurrent execution, machine-wide (flock), so RLIMIT_NPROC and the uid sweep
    never touch another run's processes - also across evaluator processes running at the same time."""

    def __init__(self, base: int, slots: int) -> None:
        self.base, self.slots = base, slots
        self._lock = threading.Lock()
        LOCK_DIR.mkdir(mode=0o700, exist_ok=True)

    @contextlib.contextmanager
    def acquire(self) -> Iterator[int]:
        with self._lock:
            for uid in range(self.base, self.base + self.slots):
                fd = os.open(LOCK_DIR / f"{uid}.lock", os.O_CREAT | os.O_RDWR, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                break
            else:
                raise EvalError(f"all {self.slots} sandbox uids from {self.base} are busy; raise uid_slots.")
        try:
            _kill_uid(uid)  # a crashed earlier run may have left processes behind
            yield uid
        finally:
            os.close(fd)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _kill_uid(uid: int, rounds: int = 50) -> None:
    """SIGKILL every live process owned by ``uid`` (catches children that left the process group)."""
    for _ in range(rounds):
        alive = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                if entry.stat().st_uid != uid or _is_zombie(entry.path):
                    continue
                os.kill(int(entry.name), signal.SIGKILL)
                alive += 1
            except (FileNotFoundError, ProcessLookupError):
                continue
        if not alive:
            return
        time.sleep(0.01)


def _is_zombie(proc_dir: str) -> bool:
    try:
        with open(f"{proc_dir}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


@functools.cache
def _unshare_works(flag: str) -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", flag, "--", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.cache
def _interpreter(world_readable: bool) -> str:
    """A Python whose stdlib an unprivileged uid can import (``sys.executable`` may live under a 0700 home)."""
    candidates = [sys.executable, shutil.which("python3"), "/usr/bin/python3", "/usr/local/bin/python3"]
    if not world_readable:
        return sys.executable
    for exe in dict.fromkeys(c for c in candidates if c):
        try:
            stdlib = subprocess.run(
                [exe, "-I", "-S", "-c", "import sysconfig; print(sysconfig.get_paths()['stdlib'])"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if _others_can_read(Path(os.path.realpath(exe))) and _others_can_read(Path(stdlib)):
            return exe
    raise EvalError(
        f"no Python interpreter readable by an unprivileged user among {candidates}; install python3 "
        f"system-wide or pass SandboxConfig(drop_privileges=False) (weaker isolation)."
    )


def _others_can_read(path: Path) -> bool:
    path = path.resolve()
    if not path.exists() or not os.stat(path).st_mode & 0o004:
        return False
    return all(os.stat(p).st_mode & 0o001 for p in path.parents)
