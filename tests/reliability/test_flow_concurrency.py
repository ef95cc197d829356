"""Concurrent flow runs sharing one runs dir and one MLflow store (issue 8, item 4): runs with different
parameters do not corrupt each other; runs with the same parameters never compute a stage twice (the
per-artifact lock makes the later one wait and reuse)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from _flowkit import child_result, tiny_params

from artifacts import is_complete


def test_three_concurrent_runs_share_work_and_stay_separate(spawn_flow, store, tmp_path):
    from mlflow.tracking import MlflowClient

    procs = [spawn_flow(tiny_params(tmp_path, reduction=r)) for r in (0.005, 0.005, 0.003)]
    a, b, c = (child_result(p) for p in procs)

    computed = Counter((s["stage"], s["key"]) for r in (a, b, c) for s in r["stages"]
                       if not (s["cached"] or s["reused"]))
    assert computed and max(computed.values()) == 1, computed  # no stage computed twice
    keys = {(s["stage"], s["key"]) for r in (a, b, c) for s in r["stages"]}
    assert set(computed) == keys  # ... and every distinct stage exactly once
    # different reduction: same dense eval + calibration (shared), different decomposition
    key = {r["mlflow_run_id"]: {s["label"]: s["key"] for s in r["stages"]} for r in (a, c)}
    ka, kc = key[a["mlflow_run_id"]], key[c["mlflow_run_id"]]
    assert ka["calibrate"] == kc["calibrate"] and ka["decompose"] != kc["decompose"]
    assert a["rows"] == b["rows"] and a["rows"] != c["rows"]
    for r in (a, b, c):
        assert all(is_complete(Path(s["dir"])) for s in r["stages"])

    client = MlflowClient(tracking_uri=store)
    for r in (a, b, c):
        parent = client.get_run(r["mlflow_run_id"])
        kids = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{r['mlflow_run_id']}'")
        assert parent.info.status == "FINISHED" and len(kids) == 6
        assert parent.data.params["decompose.reduction"] == str(tiny_params(tmp_path)["reduction"]
                                                               if r is not c else 0.003)
        dec = next(k for k in kids if k.info.run_name == "decompose")
        assert dec.data.tags["lord.artifact_key"] == {s["label"]: s["key"] for s in r["stages"]}["decompose"]
