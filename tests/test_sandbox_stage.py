"""The attack battery through the evaluation *stage* (``humaneval_to_dir``), not only the sandbox library.

Hostile completions are planted in the stage's resumable work file, as if a model had written them; the stage
then executes them like any other completion. Each must be reported with a reason, the decoy files and the
evaluator must survive, and the evaluator's secret must appear nowhere in the artifact.
"""

from __future__ import annotations

import json
import socket
import tempfile
from pathlib import Path

import pytest

from bench.sandbox_attacks import decoy_parent
from evaluation.generate import GenerationConfig, append_jsonl, read_jsonl
from evaluation.humaneval import HumanEvalConfig, humaneval_to_dir, resume_key
from evaluation.sandbox import SandboxConfig
from sources.humaneval import load_humaneval

SECRET = "lord-stage-secret-93b2e1"
MODEL = "tinycoder-random"


def _body(code: str) -> str:
    return "\n" + "".join(f"    {line}\n" for line in code.strip("\n").splitlines())


def test_attack_battery_through_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORD_FAKE_TOKEN", SECRET)
    decoy = Path(tempfile.mkdtemp(prefix="lord-decoy-", dir=decoy_parent()))  # visible inside the sandbox
    decoy.chmod(0o755)
    (decoy / "keep.txt").write_text("keep\n")
    (decoy / "keep.txt").chmod(0o644)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    attacks = {
        "infinite_loop": ("while True:\n    pass", {"timeout"}),
        "fork_bomb": ("import os\nwhile True:\n    os.fork()", {"failed", "timeout", "killed"}),
        "memory_hog": ("x = bytearray(10 * 2**30)", {"failed"}),
        "rm_rf": (f"import os, shutil\nos.system('rm -rf {decoy} ~')\nshutil.rmtree({str(decoy)!r})", {"failed"}),
        "kill_parent": ("import os\nos.kill(os.getppid(), 9)", {"failed"}),
        "stdout_1gb": ("import sys\nfor _ in range(1024):\n    sys.stdout.write('x' * (1 << 20))\nreturn None",
                       {"failed", "timeout"}),
        "read_secrets": ("import os\nprint(dict(os.environ))\nprint(open(f'/proc/{os.getppid()}/environ').read())",
                         {"failed"}),
        "socket": (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('CONNECTED')",
                   {"failed"}),
    }
    problems = load_humaneval(limit=len(attacks))
    cfg = HumanEvalConfig(limit=len(attacks), allow_execution=True,
                          generation=GenerationConfig(max_new_tokens=4, batch_size=4),
                          sandbox=SandboxConfig(wall_seconds=6.0, cpu_seconds=2, workers=2, max_output_bytes=4096))
    out = tmp_path / "eval"
    work = out.with_name(f".{out.name}.partial")
    work.mkdir()
    (work / "key.json").write_text(json.dumps(resume_key(MODEL, cfg)))
    append_jsonl(work / "completions.jsonl", [
        {"task_id": p.task_id, "sample": 0, "completion": _body(code), "n_new_tokens": 1, "finish": "stop",
         "seconds": 0.1} for p, (code, _) in zip(problems, attacks.values(), strict=True)
    ])
    try:
        metrics = humaneval_to_dir(MODEL, cfg, out, progress=False)
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    results = read_jsonl(out / "results.jsonl")
    for (name, (_, allowed)), r in zip(attacks.items(), results, strict=True):
        assert r["status"] in allowed and r["reason"], (name, r["status"], r["reason"])
    assert metrics["n_passed"] == 0 and metrics["pass_at_1"] == 0.0
    assert (decoy / "keep.txt").read_text() == "keep\n"
    for f in out.iterdir():
        text = f.read_text(errors="replace")
        assert SECRET not in text and "LORD_FAKE_TOKEN" not in text, f.name
    assert all("CONNECTED" not in r["output"] for r in results)
    (decoy / "keep.txt").unlink()
    decoy.rmdir()
