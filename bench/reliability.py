"""Reliability report: kill points (SIGKILL mid-stage, rerun, compare), bad inputs at every edge (the
message each gets), corrupt artifacts, sandbox attacks. Writes bench/results/reliability.json.

Run: .venv/bin/python bench/reliability.py [--skip-kill]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the hub-id case must fail at once here, not retry
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
from common import write_results  # noqa: E402

KILL_POINTS = ("calibrate", "decompose", "quantize")


def bad_inputs(work: Path) -> list[dict[str, Any]]:
    """Every case must fail with one clear error before compute; records the type and the message."""
    from evaluation import EvalConfig, Sandbox, SandboxConfig
    from finetune.config import FinetuneConfig
    from finetune.data import load_instructions
    from flows.cli import main as cli
    from lord.config import DecomposeConfig
    from quant.config import QuantConfig
    from sources import code_split, load_model

    empty = work / "empty.jsonl"
    empty.write_text("")
    bad_json = work / "bad.jsonl"
    bad_json.write_text('{"instruction": "x", "output": "y"}\nnot json\n')
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("unknown embedded model", lambda: load_model("starcoder-99b")),
        ("missing model path", lambda: load_model("./no/such/model")),
        ("hub id offline", lambda: load_model("bigcode/starcoder")),
        ("not a gguf file", lambda: load_model(str(empty))),
        ("reduction outside (0,1)", lambda: DecomposeConfig(reduction=1.5)),
        ("unknown decomposition method", lambda: DecomposeConfig(method="pca")),
        ("unknown rank plan", lambda: DecomposeConfig(plan="magic")),
        ("bits not supported", lambda: QuantConfig(bits=5)),
        ("negative damping", lambda: QuantConfig(damp_percent=-1)),
        ("finetune empty data file", lambda: load_instructions(empty)),
        ("finetune malformed data file", lambda: load_instructions(bad_json)),
        ("finetune steps 0", lambda: FinetuneConfig(steps=0)),
        ("heldout corpus missing", lambda: code_split(work / "nowhere")),
        ("perplexity seq_len 1", lambda: EvalConfig(seq_len=1)),
        ("HumanEval without opt-in", lambda: EvalConfig(humaneval_problems=3)),
        ("sandbox without opt-in", lambda: Sandbox(SandboxConfig()).run("print(1)")),
        ("CLI: reduction 1.5", lambda: _cli(cli, ["run", "--reduction", "1.5"])),
        ("CLI: bits 5", lambda: _cli(cli, ["run", "--bits", "5"])),
        ("CLI: unknown preset", lambda: _cli(cli, ["run", "--preset", "huge"])),
        ("CLI: bad --set", lambda: _cli(cli, ["run", "--preset", "smoke", "--set", "decompose.nosuchfield=1",
                                              "--no-evaluate"])),
    ]
    out = []
    for label, fn in cases:
        try:
            fn()
            out.append({"input": label, "rejected": False, "error": None, "message": "accepted (BUG)"})
        except SystemExit as e:
            out.append({"input": label, "rejected": e.code not in (0, None), "error": "SystemExit",
                        "message": str(getattr(e, "stderr", "")) or f"exit {e.code}"})
        except Exception as e:  # noqa: BLE001 - recording exactly what the user sees
            out.append({"input": label, "rejected": True, "error": type(e).__name__, "message": str(e)[:300]})
    return out


def _cli(cli: Callable[[list[str]], int], argv: list[str]) -> None:
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        try:
            code = cli(argv)
        except SystemExit as e:
            code = e.code
    if code not in (0, None):
        err = SystemExit(code)
        err.stderr = buf.getvalue().strip().splitlines()[-1] if buf.getvalue().strip() else ""
        raise err


def corrupt_artifacts(work: Path) -> list[dict[str, Any]]:
    """A finished artifact dir with one byte flipped / one file truncated must be refused by checksum."""
    from artifacts import ArtifactError, atomic_dir, verify_manifest

    out = []
    for how in ("flip a byte", "truncate"):
        d = work / f"artifact-{how.replace(' ', '-')}"
        with atomic_dir(d) as tmp:
            (tmp / "model.safetensors").write_bytes(os.urandom(4096))
        p = d / "model.safetensors"
        data = bytearray(p.read_bytes())
        if how == "flip a byte":
            data[100] ^= 0xFF
            p.write_bytes(bytes(data))
        else:
            p.write_bytes(bytes(data[:1000]))
        try:
            verify_manifest(d)
            out.append({"input": f"artifact: {how}", "rejected": False, "message": "accepted (BUG)"})
        except ArtifactError as e:
            out.append({"input": f"artifact: {how}", "rejected": True, "error": "ArtifactError", "message": str(e)})
    return out


def kill_points(work: Path) -> list[dict[str, Any]]:
    """SIGKILL the flow while each stage writes its artifact; rerun; compare with an uninterrupted run."""
    from _flowkit import CHILD, tiny_params

    from bench.harness import shared_prefect_harness, temp_mlflow_store
    from flows.faults import KILL_ENV
    from flows.pipeline import lord_pipeline

    records = []
    (work / "mlflow").mkdir(parents=True, exist_ok=True)
    with shared_prefect_harness() as api, temp_mlflow_store(work / "mlflow") as store:
        reference = lord_pipeline(**tiny_params(work / "reference"))
        for stage in KILL_POINTS:
            runs = work / f"kill-{stage}"
            env = {**os.environ, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": store, "OMP_NUM_THREADS": "1",
                   KILL_ENV: stage}
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(tiny_params(runs))], env=env,
                                  capture_output=True, text=True, timeout=600)
            killed = proc.returncode == -signal.SIGKILL
            resumed = lord_pipeline(**tiny_params(runs))
            reused = sorted(s["label"] for s in resumed["stages"] if s["cached"] or s["reused"])
            same = all(abs(a["ppl"] - b["ppl"]) <= 1e-6 * b["ppl"] and a["n_params"] == b["n_params"]
                       for a, b in zip(resumed["rows"], reference["rows"], strict=True))
            records.append({"kill_point": stage, "killed": killed, "resumed_matches_uninterrupted": same,
                            "stages_reused": reused, "seconds": round(time.perf_counter() - t0, 1)})
            print(records[-1])
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skip-kill", action="store_true", help="skip the kill-point runs (a few minutes)")
    args = ap.parse_args()
    from bench.sandbox_attacks import run_attack_battery

    with tempfile.TemporaryDirectory(prefix="lord-reliability-") as tmp:
        work = Path(tmp)
        inputs = bad_inputs(work) + corrupt_artifacts(work)
        for r in inputs:
            print(f"{'ok ' if r['rejected'] else 'BUG'} {r['input']}: {r.get('error')}: {r['message'][:160]}")
        attacks = run_attack_battery()
        for a in attacks:
            print(f"{'contained' if a['contained'] else 'ESCAPED'} {a['attack']}: {a['status']} ({a['reason']})")
        kills = [] if args.skip_kill else kill_points(work)
    summary = {
        "bad_inputs_tried": len(inputs), "bad_inputs_rejected": sum(r["rejected"] for r in inputs),
        "sandbox_attacks_tried": len(attacks), "sandbox_attacks_contained": sum(a["contained"] for a in attacks),
        "kill_points_tried": len(kills), "resumes_matched": sum(k["resumed_matches_uninterrupted"] for k in kills),
    }
    print(summary)
    records = ([{"variant": "summary", **summary}] + [{"variant": "kill_point", **k} for k in kills]
               + [{"variant": "bad_input", **r} for r in inputs]
               + [{"variant": "sandbox_attack", **{k: v for k, v in a.items() if k != "checks"}} for a in attacks])
    write_results("reliability", {"flow": "tinycoder-random, tiny stage settings (tests/reliability/_flowkit.py)",
                                  "kill": "SIGKILL while the stage writes its artifact (flows.faults)"}, records)


if __name__ == "__main__":
    main()
