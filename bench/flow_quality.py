"""Record a finished ``lord run`` in bench/results/quality.json: one quality record per evaluated variant (stage =
the variant's name, e.g. ``vocab+gptq4``), read back from the run's MLflow store (the parent's ``summary.json``
and each evaluation's metrics.json), so a flow run and the benchmarks share one table.

    .venv/bin/python bench/flow_quality.py --db /tmp/lord-bench-make-run/mlflow.db [--run-id ID] [--plan uniform]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench.common import merge_records  # noqa: E402
from bench.make_run import parent_summary  # noqa: E402


def records_of(summary: dict, plan: str, skip: set[str], model: str) -> list[dict]:
    """Quality records of a run summary's variants (HumanEval counts from each evaluation's metrics.json)."""
    evals = {s["label"][len("evaluate["):-1]: s for s in summary["stages"] if s["label"].startswith("evaluate[")}
    dense = next(r for r in summary["rows"] if r["variant"] == "dense")
    out = []
    for row in summary["rows"]:
        if row["variant"] in skip or row.get("ppl") is None:
            continue
        metrics_file = Path(evals[row["variant"]]["dir"]) / "metrics.json"
        m = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        out.append({"model": summary.get("model") or model, "stage": row["variant"],
                    "plan": "dense" if row["variant"] == "dense" else plan if "lord" in row["variant"] else "none",
                    "param_reduction": round(row.get("param_reduction") or 0.0, 4), "linear_param_reduction": None,
                    "params": row.get("n_params"), "ppl": row["ppl"], "ppl_dense": dense["ppl"],
                    "ppl_increase": row.get("ppl_increase"), "pass_at_1": row.get("pass_at_1"),
                    "n_problems": m.get("n_problems", 0), "n_passed": m.get("n_passed"), "size_mb": row.get("size_mb"),
                    "seconds": evals[row["variant"]].get("seconds"), "source": "lord run (flow)"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", type=Path, required=True, help="the run's MLflow sqlite file")
    ap.add_argument("--run-id", help="the MLflow parent run (default: the newest finished lord-pipeline run)")
    ap.add_argument("--plan", default="uniform", help="the decompose plan of the run (recorded)")
    ap.add_argument("--model", default="qwen2.5-coder-0.5b", help="recorded when the run's summary names none "
                    "(runs before summary.json carried the model)")
    ap.add_argument("--skip", nargs="*", default=["dense"], help="variants not to record (dense: already there)")
    args = ap.parse_args()
    run_id, summary = parent_summary(args.db, "lord-pipeline", args.run_id)
    recs = records_of(summary, args.plan, set(args.skip), args.model)
    for r in recs:
        print(r)
    merge_records("quality", recs, {"flow_runs": "stage = the lord run variant; ppl on the preset's held-out windows "
                                                  "(8 x 512 stdlib held-out), pass_at_1 greedy on its first n_problems"})
    print("recorded", len(recs), "variants of MLflow run", run_id)


if __name__ == "__main__":
    main()
