"""A battery of hostile programs and the checks that each one was contained (tests, bench/reliability.py).

Each attack is what a model could write into a HumanEval completion. Containment means: the status is one
of the expected ones with a reason, the decoy files outside the sandbox are intact, the evaluator's secret
does not appear in the captured output, nothing connected to the evaluator's listening socket, no process
of a sandbox uid is left, and nothing was written to the host's world-writable dirs.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from evaluation.sandbox import Sandbox, SandboxConfig

SECRET_ENV, SECRET = "LORD_BATTERY_FAKE_SECRET", "lord-battery-secret-5e0c2a"
MARKER = "lord-escape-marker"
SHARED_DIRS = ("/tmp", "/var/tmp", "/dev/shm")

# name -> (program, statuses that count as handled). {decoy} and {port} are filled in at run time.
ATTACKS: dict[str, tuple[str, set[str]]] = {
    "infinite_loop": ("while True:\n    pass\n", {"timeout"}),
    "sleep_forever": ("import time\ntime.sleep(1000)\n", {"timeout"}),
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                  {"timeout", "failed", "killed"}),
    "escape_session": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1000)\n",
                       {"failed", "passed"}),
    "memory_hog_10gb": ("x = bytearray(10 * 2**30)\n", {"failed"}),
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", {"failed"}),
    "stdout_1gb": ("import sys\nchunk = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(chunk)\n",
                   {"passed", "timeout"}),
    "write_big_file": ("with open('big', 'wb') as f:\n    f.write(b'x' * (64 << 20))\n", {"failed", "killed"}),
    "write_world_writable": (
        f"for d in {SHARED_DIRS!r}:\n    open(d + '/{MARKER}', 'w').write('x')\n",
        {"passed", "failed"},  # with private tmpfs mounts the write lands in a throwaway mount
    ),
    "rm_rf_decoy": ("import os, shutil\nos.system('rm -rf {decoy} ~')\nshutil.rmtree('{decoy}')\n", {"failed"}),
    "overwrite_decoy": ("open('{decoy}/precious0.txt', 'w').write('pwned')\n", {"failed"}),
    "unlink_decoy": ("import os\nos.unlink('{decoy}/precious1.txt')\n", {"failed"}),
    "read_env_secrets": (
        "import os\nprint(dict(os.environ))\nprint(open(f'/proc/{{os.getppid()}}/environ', 'rb').read())\n",
        {"failed", "passed"},
    ),
    "socket_localhost": ("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                         "print('CONNECTED')\n", {"failed"}),
    "socket_external": ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)\n"
                        "print('CONNECTED')\n", {"failed"}),
}


def run_attack_battery(cfg: SandboxConfig | None = None) -> list[dict[str, Any]]:
    """Run every attack (in parallel, ``cfg.workers``) and check containment; one record per attack."""
    cfg = cfg or SandboxConfig(wall_seconds=6.0, cpu_seconds=2, max_output_bytes=4096)
    box = Sandbox(cfg, allow_execution=True)
    decoy = Path(tempfile.mkdtemp(prefix="lord-decoy-", dir=decoy_parent()))
    decoy.chmod(0o755)
    for i in range(3):
        (decoy / f"precious{i}.txt").write_text(f"keep me {i}\n")
        (decoy / f"precious{i}.txt").chmod(0o644)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    old_secret = os.environ.get(SECRET_ENV)
    os.environ[SECRET_ENV] = SECRET
    try:
        programs = {name: code.format(decoy=decoy, port=server.getsockname()[1])
                    for name, (code, _) in ATTACKS.items()}
        results = box.run_many(list(programs.values()), progress=False, desc="attacks")
        connected = _accepted(server)
        decoy_ok = sorted(p.name for p in decoy.iterdir()) == [f"precious{i}.txt" for i in range(3)] and all(
            (decoy / f"precious{i}.txt").read_text() == f"keep me {i}\n" for i in range(3))
        leftovers = leftover_processes(cfg) if box.privileged else []
        escaped = [d for d in SHARED_DIRS if Path(d, MARKER).exists()]
    finally:
        server.close()
        if old_secret is None:
            os.environ.pop(SECRET_ENV, None)
        else:
            os.environ[SECRET_ENV] = old_secret
        for p in decoy.iterdir():
            p.unlink()
        decoy.rmdir()
        for d in SHARED_DIRS:
            with contextlib.suppress(OSError):
                Path(d, MARKER).unlink()
    records = []
    for (name, (_, allowed)), r in zip(ATTACKS.items(), results, strict=True):
        checks = {
            "status_expected": r.status in allowed and bool(r.reason),
            "decoy_intact": decoy_ok,
            "secret_hidden": SECRET not in r.output and SECRET_ENV not in r.output,
            "no_connection": connected == 0 and "CONNECTED" not in r.output,
            "no_leftover_processes": not leftovers,
            "no_host_writes": not escaped or name != "write_world_writable",
        }
        records.append({"attack": name, "status": r.status, "reason": r.reason, "seconds": round(r.seconds, 3),
                        "output_bytes": r.output_bytes, "output_truncated": r.output_truncated,
                        "contained": all(checks.values()), "checks": checks})
    return records


def decoy_parent() -> str:
    """A world-traversable dir that the sandbox still sees (its /tmp is a private tmpfs, which would hide
    a decoy there and test nothing)."""
    for d in ("/srv", "/opt", "/mnt", "/var/lib"):
        if os.path.isdir(d) and os.access(d, os.W_OK) and os.stat(d).st_mode & 0o005 == 0o005:
            return d
    return tempfile.gettempdir()


def leftover_processes(cfg: SandboxConfig) -> list[int]:
    """Live (non-zombie) processes owned by any sandbox uid."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if cfg.uid_base <= entry.stat().st_uid < cfg.uid_base + cfg.uid_slots:
                state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state not in ("Z", "X"):
                    pids.append(int(entry.name))
        except (FileNotFoundError, IndexError):
            continue
    return pids


def _accepted(server: socket.socket, seconds: float = 0.2) -> int:
    n, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            conn, _ = server.accept()
            conn.close()
            n += 1
        except BlockingIOError:
            time.sleep(0.02)
    return n
