"""The README's main command, measured: ``lord run --preset P`` in a fresh work dir (own runs dir and MLflow
store, ephemeral Prefect), its wall time against the preset's budget, every stage's seconds and the summary
rows, read back from the MLflow parent run's ``summary.json`` (what the UI shows).

Run: flock /tmp/heavy.lock .venv/bin/python bench/make_run.py [--preset default] [--work DIR] [-- run flags]
A second invocation on the same ``--work`` dir is the cache check: it must compute nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, write_results  # noqa: I001  (bench/ is on sys.path)

BUDGET_SECONDS = {"smoke": 10 * 60, "default": 20 * 60}  # issue 7: make run <= 20 min on 2 cores


def parent_summary(db: Path, experiment: str, run_id: str | None = None) -> tuple[str, dict]:
    """The newest finished parent run of ``experiment`` in the sqlite store (or ``run_id``) and its logged
    ``summary.json``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    if run_id is None:
        exp = client.get_experiment_by_name(experiment)
        runs = [] if exp is None else client.search_runs(
            [exp.experiment_id], "tags.lord.preset != '' and attributes.status = 'FINISHED'",
            order_by=["start_time DESC"], max_results=1)
        if not runs:
            raise SystemExit(f"{db}: no finished {experiment!r} run; run `lord run` first or pass its run id.")
        run_id = runs[0].info.run_id
    path = client.download_artifacts(run_id, "summary.json")
    return run_id, json.loads(Path(path).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lord-bench-make-run"))
    ap.add_argument("--name", default="make_run")
    ap.add_argument("run_args", nargs="*", help="extra `lord run` flags, after --")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    lord = Path(sys.executable).with_name("lord")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{args.work / 'mlflow.db'}"}
    t0 = time.perf_counter()
    subprocess.run([str(lord), "run", "--preset", args.preset, "--runs-dir", str(args.work / "runs"),
                    *args.run_args], cwd=args.work, env=env, check=True)
    wall = time.perf_counter() - t0
    run_id, summary = parent_summary(args.work / "mlflow.db", "lord-pipeline")
    stages = [{"stage": s["label"], "status": "cached" if s["cached"] else "reused" if s["reused"] else "computed",
               "seconds": round(float(s.get("seconds") or 0.0), 1)} for s in summary["stages"]]
    records = [{**{k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()},
                "model": summary.get("model", ""), "preset": args.preset} for row in summary["rows"]]
    budget = BUDGET_SECONDS.get(args.preset)
    write_results(args.name, {
        "command": f"lord run --preset {args.preset} {' '.join(args.run_args)}".strip(),
        "work_dir": str(args.work), "mlflow_parent_run": run_id,
        "ppl": "held-out windows of the preset's evaluate config", "pass_at_1": "greedy, first N HumanEval problems",
    }, records, wall_seconds=round(wall, 1), budget_seconds=budget,
        wall_over_budget_ratio=round(wall / budget, 3) if budget else None,
        stages=stages, stages_computed=sum(s["status"] == "computed" for s in stages))
    print(json.dumps({"wall_seconds": round(wall, 1), "stages": stages}, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(RESULTS.parent))
    main()
