"""The sandbox contains hostile programs and reports each with a reason; the evaluator and its files survive.

The battery runs twice: with the in-process guard (defence in depth) and without it, so the kernel layers
(network namespace, dedicated uid, rlimits, process-group + uid sweep) are shown to hold on their own.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench.sandbox_attacks import ATTACKS, leftover_processes, run_attack_battery
from evaluation.errors import EvalError
from evaluation.sandbox import Sandbox, SandboxConfig
from sources.humaneval import N_PROBLEMS, load_humaneval

FAST = {"wall_seconds": 6.0, "cpu_seconds": 2, "workers": 2}
SECRET = "lord-fake-secret-7d1f0c"


@pytest.fixture
def decoy() -> Path:
    """A world-readable directory outside any sandbox dir, owned by the evaluator, with files in it."""
    d = Path(tempfile.mkdtemp(prefix="lord-decoy-"))
    d.chmod(0o755)
    for i in range(3):
        (d / f"precious{i}.txt").write_text(f"keep me {i}\n")
        (d / f"precious{i}.txt").chmod(0o644)
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


def test_execution_is_opt_in() -> None:
    with pytest.raises(EvalError, match="allow_execution"):
        Sandbox(SandboxConfig())


@pytest.mark.parametrize("field,value", [("wall_seconds", 0), ("cpu_seconds", 0), ("memory_mb", 8),
                                         ("workers", 0), ("max_processes", 0)])
def test_config_is_validated(field: str, value: float) -> None:
    with pytest.raises(EvalError, match=field):
        SandboxConfig(**{field: value})


def test_all_canonical_solutions_pass() -> None:
    problems = load_humaneval()
    assert len(problems) == N_PROBLEMS
    box = Sandbox(SandboxConfig(workers=2), allow_execution=True)
    results = box.run_many([p.program(p.canonical_solution) for p in problems], progress=False)
    failed = [(p.task_id, r.status, r.reason) for p, r in zip(problems, results, strict=True) if not r.passed]
    assert failed == []


def test_wrong_completions_fail_and_early_exit_is_not_success() -> None:
    problems = load_humaneval(limit=12)
    box = Sandbox(SandboxConfig(**FAST), allow_execution=True)
    programs = [p.program("    return None\n") for p in problems]
    programs += [p.program("    import os\n    os._exit(0)\n") for p in problems[:2]]
    programs += ["def f(:\n  pass\n"]
    results = box.run_many(programs, progress=False)
    assert all(r.status == "failed" for r in results), [(r.status, r.reason) for r in results]
    assert "before the tests finished" in results[12].reason
    assert "SyntaxError" in results[-1].reason


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "kernel-only"])
def test_adversarial_battery_is_contained(guard: bool) -> None:
    """Loop, fork bomb, session escape, 10 GB, kill parent, 1 GB stdout, big files, decoy deletion, secrets,
    sockets: every attack handled with a reason, decoy intact, no leftovers (sandbox_attacks.py)."""
    cfg = SandboxConfig(guard=guard, max_output_bytes=4096, **FAST)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    records = {r["attack"]: r for r in run_attack_battery(cfg)}
    assert set(records) == set(ATTACKS)
    failing = {name: (r["status"], r["reason"], r["checks"]) for name, r in records.items() if not r["contained"]}
    assert failing == {}
    # the evaluator did not buffer the gigabyte, and the kernel (not only the guard) stopped the worst ones
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 200 * 1024  # KiB
    big = records["stdout_1gb"]
    assert big["output_truncated"] and big["output_bytes"] > 4096
    assert records["memory_hog_10gb"]["reason"].startswith("MemoryError")
    assert records["infinite_loop"]["status"] == "timeout"
    if not guard:
        assert "Permission" in records["kill_parent"]["reason"]  # EPERM from the kernel: another uid
        assert "Permission" in records["overwrite_decoy"]["reason"]


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "kernel-only"])
def test_environment_secrets_do_not_leak(guard: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORD_FAKE_API_KEY", SECRET)
    code = (
        "import os\nprint(dict(os.environ))\n"
        "for path in (f'/proc/{os.getppid()}/environ', '/proc/1/environ', '/proc/self/environ'):\n"
        "    try:\n        print(open(path, 'rb').read())\n"
        "    except Exception as e:\n        print('blocked', path, type(e).__name__)\n"
    )
    r = Sandbox(SandboxConfig(guard=guard, **FAST), allow_execution=True).run(code)
    assert r.status == "passed", r.reason
    assert "blocked" in r.output  # the evaluator's environ is unreadable, not merely empty
    assert SECRET not in r.output and "LORD_FAKE_API_KEY" not in r.output


@pytest.mark.parametrize("guard", [True, False], ids=["guard", "kernel-only"])
def test_no_network(guard: bool) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    code = (
        f"import socket\nfor addr in (('127.0.0.1', {port}), ('1.1.1.1', 80), ('8.8.8.8', 53)):\n"
        "    s = socket.socket()\n    s.settimeout(2)\n    s.connect(addr)\n    print('CONNECTED', addr)\n"
    )
    box = Sandbox(SandboxConfig(guard=guard, **FAST), allow_execution=True)
    try:
        r = box.run(code)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert r.status == "failed", r.reason
    assert "CONNECTED" not in r.output
    # in a network namespace the kernel refuses (ENETUNREACH); without one the guard removed socket.socket
    assert ("Network is unreachable" in r.reason) if box.netns else ("TypeError" in r.reason)


def test_unprivileged_fallback_still_blocks_with_guard(decoy: Path) -> None:
    """Where root is not available (no uid drop, no netns), the guard alone blocks the same attacks."""
    cfg = SandboxConfig(drop_privileges=False, isolate_network=False, **FAST)
    box = Sandbox(cfg, allow_execution=True)
    assert not box.describe()["privilege_drop"] and box.describe()["network_blocked_by_guard"]
    attacks = [
        "import os\nos.kill(os.getppid(), 9)\n",
        "import socket\nsocket.create_connection(('127.0.0.1', 1))\n",
        f"import shutil\nshutil.rmtree({str(decoy)!r})\n",
        "import subprocess\nsubprocess.run(['true'])\n",
        "x = bytearray(10 * 2**30)\n",
    ]
    results = box.run_many(attacks, progress=False)
    assert [r.status for r in results] == ["failed"] * len(attacks), [r.reason for r in results]
    assert len(list(decoy.iterdir())) == 3


def test_killing_the_evaluator_leaves_no_orphans(tmp_path: Path) -> None:
    """SIGKILL an evaluator mid-execution: its sandboxed child dies with it (PR_SET_PDEATHSIG)."""
    script = tmp_path / "evaluator.py"
    script.write_text(
        "from evaluation.sandbox import Sandbox, SandboxConfig\n"
        "box = Sandbox(SandboxConfig(wall_seconds=120, cpu_seconds=100, uid_base=62000), allow_execution=True)\n"
        "box.run('import time\\nprint(\"started\", flush=True)\\ntime.sleep(1000)\\n')\n"
    )
    evaluator = subprocess.Popen([sys.executable, str(script)], cwd=Path(__file__).resolve().parents[1])
    cfg = SandboxConfig(uid_base=62000)
    deadline = time.monotonic() + 30
    while not leftover_processes(cfg) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftover_processes(cfg), "the sandboxed child never started"
    evaluator.kill()
    evaluator.wait()
    deadline = time.monotonic() + 5
    while leftover_processes(cfg) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftover_processes(cfg) == []
