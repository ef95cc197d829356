"""``lord compare``: the pipeline's MLflow parent runs side by side (rows: variant metrics, columns: runs),
the same numbers the MLflow UI shows for those runs."""

from __future__ import annotations

from typing import Any

from flows.errors import FlowError
from flows.summary import format_table
from flows.tracking import check_reachable, tracking_uri

ROW_PARAMS = ("preset", "model", "stages", "bits", "decompose.reduction")


def compare_table(experiment: str, last: int = 4, run_ids: list[str] | None = None) -> str:
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise FlowError(f"experiment {experiment!r} not found at {uri}; run `lord run` first or pass "
                        "--experiment with an existing name.")
    if run_ids:
        runs = [client.get_run(r) for r in run_ids]
    else:
        if last < 1:
            raise FlowError(f"--last {last}: expected a positive number of runs.")
        runs = client.search_runs([exp.experiment_id], "tags.`lord.kind` = 'pipeline'",
                                  order_by=["attributes.start_time DESC"], max_results=last)
    if not runs:
        return f"no pipeline runs in experiment {experiment!r} at {uri}"
    return format_table(_rows(runs), ["field", *(_col(r) for r in runs)])


def _col(run: Any) -> str:
    return f"{run.info.run_name or run.info.run_id[:8]} ({run.info.run_id[:6]})"


def _rows(runs: list[Any]) -> list[dict[str, Any]]:
    fields: list[str] = ["status", *ROW_PARAMS]
    metric_names = sorted({k for r in runs for k in r.data.metrics})
    rows = []
    for f in fields + metric_names:
        row: dict[str, Any] = {"field": f}
        for r in runs:
            if f == "status":
                v: Any = r.info.status
            elif f in r.data.params:
                v = r.data.params[f]
            else:
                v = r.data.metrics.get(f)
            row[_col(r)] = v
        if f in metric_names or any(row[_col(r)] is not None for r in runs):
            rows.append(row)
    return rows
