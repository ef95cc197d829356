"""Helpers for the flow-level reliability tests: tiny flow parameters and a child-process flow runner's result
parser (the fixtures live in conftest.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

TINY = "tinycoder-random"
TINY_OVERRIDES = {
    "calibrate": {"n_seqs": 4, "seq_len": 32},
    "quantize": {"group_size": 16, "n_seqs": 4, "seq_len": 32},
    "evaluate": {"seq_len": 32, "n_windows": 2, "humaneval_problems": 0, "allow_execution": False},
}
CHILD = ("import json, sys\nfrom flows.pipeline import lord_pipeline\n"
         "r = lord_pipeline(**json.loads(sys.argv[1]))\nprint('RESULT ' + json.dumps(r))\n")


def tiny_params(runs_dir: Path, **kw: Any) -> dict[str, Any]:
    return {"preset": "smoke", "model": TINY, "reduction": 0.005, "finetune": False,
            "overrides": TINY_OVERRIDES, "runs_dir": str(runs_dir), "experiment": "reliability", **kw}


def child_result(proc: subprocess.Popen, timeout: float = 300) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"flow child failed ({proc.returncode}):\n{err[-3000:]}"
    line = next(ln for ln in reversed(out.splitlines()) if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])
