"""The lord-pipeline flow end to end on the real tiny GGUF model (tinycoder-random: the real load path, 2
layers) against a temporary Prefect server and a throwaway MLflow sqlite store: completes, tracks parent +
nested runs, a rerun is all cache hits, a failed stage resumes there, a corrupt artifact is recomputed, an
unreachable tracking server fails before compute."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from flows import FlowError
from flows.faults import FAIL_ENV

TINY = "tinycoder-random"
# Sized for a 2-layer hidden-16 model with a 32k vocab: embeddings dominate, so reduction is tiny.
TINY_OVERRIDES = {
    "calibrate": {"n_seqs": 4, "seq_len": 32},
    "quantize": {"group_size": 16, "n_seqs": 4, "seq_len": 32},
    "evaluate": {"seq_len": 32, "n_windows": 2, "humaneval_problems": 0, "allow_execution": False},
}
FLOW_STAGES = ["evaluate[dense]", "calibrate", "decompose", "evaluate[lord]", "quantize4", "evaluate[lord+gptq4]"]


def _run(runs_dir: Path, **kw):
    from flows.pipeline import lord_pipeline

    params = {"preset": "smoke", "model": TINY, "reduction": 0.005, "finetune": False,
              "overrides": TINY_OVERRIDES, "runs_dir": str(runs_dir), "experiment": "test-flow"}
    params.update(kw)
    return lord_pipeline(**params)


def _mlflow_children(uri: str, parent_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  order_by=["attributes.start_time ASC"])
    return client, parent, children


@pytest.fixture(scope="module")
def first_and_second(prefect_api, store, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    first = _run(runs)
    stamps = {s["label"]: _stamp(Path(s["dir"])) for s in first["stages"]}
    second = _run(runs)
    return runs, first, second, stamps


def _stamp(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


def test_flow_completes_and_tracks_parent_and_nested_runs(first_and_second, store):
    _, first, _, _ = first_and_second
    assert [s["label"] for s in first["stages"]] == FLOW_STAGES
    assert not any(s["cached"] or s["reused"] for s in first["stages"])
    rows = {r["variant"]: r for r in first["rows"]}
    assert set(rows) == {"dense", "lord", "lord+gptq4"}
    assert rows["lord"]["n_params"] < rows["dense"]["n_params"]  # decomposition removed parameters
    assert rows["lord+gptq4"]["size_mb"] < rows["lord"]["size_mb"]  # 4-bit packing shrank the file
    assert all(r["ppl"] > 1 for r in rows.values())

    client, parent, children = _mlflow_children(store, first["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model"] == TINY
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as c:  # both ways: Prefect flow run <-> MLflow parent run
        fr = c.read_flow_run(parent.data.tags["prefect.flow_run_id"])
    assert f"mlflow:{first['mlflow_run_id']}" in fr.tags
    assert parent.data.metrics["lord.ppl"] == pytest.approx(rows["lord"]["ppl"])
    assert parent.data.metrics["stages_computed"] == len(FLOW_STAGES)
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/ppl_vs_compression.png", "plots/rank_per_group.png", "plots/stage_seconds.png"} <= plots
    assert [c.info.run_name for c in children] == FLOW_STAGES
    by_name = {c.info.run_name: c for c in children}
    dec = by_name["decompose"]
    assert dec.data.params["reduction"] == "0.005" and dec.data.params["method"] == "lord"
    assert dec.data.tags["cached"] == "false" and dec.data.metrics["stage_seconds"] > 0
    assert "params_total_factored" in dec.data.metrics
    dec_files = {a.path for a in client.list_artifacts(dec.info.run_id)}
    assert {"rank_map.json", "checkpoint_ref.json", "metrics.json"} <= dec_files
    ev = by_name["evaluate[lord]"]
    assert ev.data.metrics["ppl"] == pytest.approx(rows["lord"]["ppl"])


def test_identical_rerun_hits_the_cache_and_recomputes_nothing(first_and_second, store):
    _, first, second, stamps = first_and_second
    assert [s["label"] for s in second["stages"]] == FLOW_STAGES
    assert all(s["cached"] for s in second["stages"]), [(s["label"], s["cached"]) for s in second["stages"]]
    for s in second["stages"]:  # not one file rewritten: same inode, same mtime
        assert _stamp(Path(s["dir"])) == stamps[s["label"]], s["label"]
    assert second["rows"] == first["rows"]
    _, parent, children = _mlflow_children(store, second["mlflow_run_id"])
    assert parent.data.metrics["stages_computed"] == 0
    assert parent.data.metrics["stages_cached"] == len(FLOW_STAGES)
    assert {c.data.tags["cached"] for c in children} == {"true"}
    assert children[0].data.metrics  # a cache hit still logs its (cached) metrics to the new run


def test_failed_quantize_resumes_at_quantize(prefect_api, store, tmp_path, monkeypatch):
    monkeypatch.setenv(FAIL_ENV, "quantize")
    with pytest.raises(FlowError, match="fault injected"):
        _run(tmp_path, evaluate=False)
    assert list((tmp_path / "decompose").glob("[!.]*")) and not list((tmp_path / "quantize").glob("[!.]*"))
    monkeypatch.delenv(FAIL_ENV)
    resumed = _run(tmp_path, evaluate=False)
    status = {s["label"]: s["cached"] or s["reused"] for s in resumed["stages"]}
    assert status == {"calibrate": True, "decompose": True, "quantize4": False}


def test_corrupt_artifact_is_recomputed_and_downstream_keys_stay(first_and_second, prefect_api, store):
    runs, first, _, _ = first_and_second
    dec = next(s for s in first["stages"] if s["label"] == "decompose")
    weights = next(p for p in Path(dec["dir"]).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated
    third = _run(runs)
    status = {s["label"]: (s["cached"] or s["reused"]) for s in third["stages"]}
    assert status["decompose"] is False  # the checksum manifest caught it: recomputed, not trusted
    # the recomputed checkpoint is bit-identical, so every downstream key (content-addressed) still hits
    assert status["quantize4"] and status["evaluate[lord]"] and status["calibrate"]
    assert third["rows"] == first["rows"]


def test_unreachable_tracking_server_fails_before_compute(prefect_api, tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(FlowError, match="unreachable.*lord serve"):
        _run(tmp_path / "runs")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("kw, match", [
    ({"preset": "huge"}, "preset='huge' is unknown"),
    ({"reduction": 1.5}, r"reduction=1.5: expected .* \(0, 1\)"),
    ({"bits": [5]}, r"bits=\[5\]: \[5\] not supported"),
    ({"calibrate": False}, "decompose needs|LoRD needs the calibration"),
    ({"overrides": {"decompose": {"rank": 3}}}, "valid fields of DecomposeConfig"),
    ({"overrides": {"quantize": {"group_size": 0}}}, "group_size=0"),
])
def test_bad_parameters_fail_with_a_fix_before_compute(prefect_api, store, tmp_path, kw, match):
    with pytest.raises(Exception, match=match):
        _run(tmp_path / "runs", **kw)
    assert not (tmp_path / "runs").exists()


def test_cli_rejects_bad_input_with_argparse_messages(capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as e:
        main(["run", "--preset", "nope"])
    assert e.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["run", "--reduction", "1.2"])
    assert "outside (0, 1)" in capsys.readouterr().err
    assert main(["quantize", "--model", TINY, "--out", "/nonexistent/x", "--set", "group_size"]) == 2
    assert "expected FIELD=VALUE" in capsys.readouterr().err


def test_cli_compare_prints_runs_side_by_side(first_and_second, store, capsys):
    from flows.cli import main

    _, first, second, _ = first_and_second
    assert main(["compare", "--experiment", "test-flow", "--runs", first["mlflow_run_id"],
                 second["mlflow_run_id"]]) == 0
    out = capsys.readouterr().out
    assert "lord.ppl" in out and "stages_computed" in out and first["mlflow_run_id"][:6] in out
    ppl = f"{first['rows'][1]['ppl']:.4g}"
    assert out.count(ppl) >= 2  # both runs show the same (cached) number


def test_prefect_yaml_declares_default_and_weekly_retrain():
    import yaml

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in doc["deployments"]}
    assert {"default", "retrain", "lord-sweep"} <= set(deps)
    assert deps["default"]["entrypoint"] == "flows/pipeline.py:lord_pipeline"
    assert deps["retrain"]["entrypoint"] == "flows/retrain.py:lord_retrain"
    assert deps["lord-sweep"]["entrypoint"] == "flows/sweep.py:lord_sweep"
    assert deps["retrain"]["schedules"][0]["cron"] == "0 3 * * 0"
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=deps["retrain"]["schedules"][0]["cron"], timezone="UTC")  # valid cron



def test_cli_quantize_flags_and_eval_opt_in(tmp_path):
    """`lord quantize` takes the issue's flags; `lord eval --humaneval` refuses without the opt-in."""
    import json as _json

    from flows.cli import main

    out = tmp_path / "q"
    assert main(["quantize", "--model", TINY, "--out", str(out), "--group-size", "16", "--outliers", "0.2",
                 "--act-order"]) == 0
    qcfg = _json.loads((out / "quantize_config.json").read_text())
    assert qcfg["group_size"] == 16 and qcfg["desc_act"] is True and qcfg["bits"] == 4
    assert _json.loads((out / "metrics.json").read_text())["outlier_fraction"] > 0
    assert main(["eval", "--model", TINY, "--out", str(tmp_path / "e"), "--humaneval", "--limit", "1"]) == 2
    assert not (tmp_path / "e").exists()


def test_retrain_corpus_may_be_a_mix_and_an_unknown_root_fails_before_any_stage(tmp_path):
    from flows.retrain import CORPUS_FIELDS, user_overrides

    ov = user_overrides("stdlib,pkg:numpy", None, None)
    assert {ov[stage][fld] for stage, fld in CORPUS_FIELDS.items()} == {"stdlib,pkg:numpy"}
    with pytest.raises(FlowError, match="no_such_pkg_xyz.*not installed"):
        user_overrides("stdlib,pkg:no_such_pkg_xyz", None, None)
    with pytest.raises(FlowError, match="does not exist"):
        user_overrides(str(tmp_path / "missing"), None, None)
