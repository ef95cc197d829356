"""Issue 16 on the real tiny GGUF model: a 4-point sweep on a 2-worker local Dask cluster with the shared
stages computed once; gated retraining into the MLflow Model Registry when the corpus changes; a fast
``lord --help``; a SIGKILLed run's parent marked KILLED."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

TINY = "tinycoder-random"
TINY_OVERRIDES = {
    "calibrate": {"n_seqs": 4, "seq_len": 32},
    "quantize": {"group_size": 16, "n_seqs": 4, "seq_len": 32},
    "evaluate": {"seq_len": 32, "n_windows": 2, "humaneval_problems": 0, "allow_execution": False},
}
ROOT = Path(__file__).resolve().parents[1]


def _computed(stages):
    return [s["label"] for s in stages if not s["cached"] and not s["reused"]]


def test_sweep_runs_four_points_on_two_dask_workers_sharing_stages(prefect_api, store, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.sweep import lord_sweep

    kw = {"preset": "smoke", "model": TINY, "reductions": [0.003, 0.006], "plans": ["uniform"], "bits": [4, 8],
          "overrides": TINY_OVERRIDES, "n_workers": 2, "runs_dir": str(tmp_path / "runs"),
          "experiment": "test-sweep"}
    first = lord_sweep(**kw)
    assert _computed(first["shared_stages"]) == ["evaluate[dense]", "calibrate[dense]"]
    points = {p["name"]: p for p in first["points"]}
    assert set(points) == {"r0.003-uniform-b4", "r0.003-uniform-b8", "r0.006-uniform-b4", "r0.006-uniform-b8"}
    assert not any("error" in p for p in points.values())
    assert len({p["worker_pid"] for p in points.values()} - {os.getpid()}) == 2  # both Dask worker processes
    # each decomposition is computed by one point and reused by the other point with the same reduction
    for r in ("0.003", "0.006"):
        dec = [points[f"r{r}-uniform-b{b}"]["stages"][0] for b in (4, 8)]
        assert dec[0]["dir"] == dec[1]["dir"] and sorted(d["reused"] or d["cached"] for d in dec) == [False, True]
    runs = tmp_path / "runs"
    assert len(list((runs / "calibrate").glob("[!.]*"))) == 1 and len(list((runs / "decompose").glob("[!.]*"))) == 2
    assert len(list((runs / "quantize").glob("[!.]*"))) == 4 and len(list((runs / "evaluate").glob("[!.]*"))) == 5
    rows = {r["variant"]: r for r in first["rows"]}
    assert rows["r0.006-uniform-b4"]["n_params"] < rows["r0.003-uniform-b4"]["n_params"] < rows["dense"]["n_params"]
    assert any(r["pareto_size_ppl"] for r in rows.values())

    client = MlflowClient(tracking_uri=store)
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["executor"] == "dask-local:2"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`lord.kind` = 'point'")
    assert {c.info.run_name for c in children} == set(points)
    assert all("ppl" in c.data.metrics for c in children)
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/pareto_size_vs_ppl.png", "plots/pareto_params_vs_pass1.png"} <= files or \
        "plots/pareto_size_vs_ppl.png" in files  # pass@1 plot only when HumanEval ran
    assert "sweep.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    second = lord_sweep(**{**kw, "n_workers": 0})  # serially in-process: every stage a cache hit
    assert _computed(second["shared_stages"]) == []
    assert all(_computed(p["stages"]) == [] for p in second["points"])
    assert [r["ppl"] for r in second["rows"]] == [r["ppl"] for r in first["rows"]]


def _corpus(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    std = Path(sysconfig.get_paths()["stdlib"])
    for n in names:
        shutil.copy(std / n, root / n)
    return root


CORPUS_A = ["bisect.py", "colorsys.py", "keyword.py", "fnmatch.py", "glob.py", "heapq.py", "shlex.py",
            "textwrap.py", "string.py", "copy.py", "stat.py", "numbers.py"]


def test_retrain_registers_versions_and_gates_the_champion(prefect_api, store, tmp_path):
    from flows.registry import list_models, promote
    from flows.retrain import lord_retrain

    corpus = _corpus(tmp_path / "corpus", CORPUS_A)
    kw = {"preset": "smoke", "model": TINY, "reduction": 0.005, "finetune": False, "corpus": str(corpus),
          "overrides": TINY_OVERRIDES, "runs_dir": str(tmp_path / "runs"), "experiment": "test-retrain",
          "registered_model": "lord-tiny-test"}
    first = lord_retrain(**kw)
    assert first["version"] == 1 and first["promoted"] and first["reason"] == "no champion yet"
    dec_keys = {s["key"] for s in first["pipeline"]["stages"] if s["stage"] == "decompose"}

    (corpus / "bisect.py").write_text((corpus / "bisect.py").read_text() + "\n\ndef extra(x):\n    return x * 2\n")
    _corpus(corpus, ["calendar.py", "base64.py"])
    second = lord_retrain(**kw, max_ppl_ratio=0.01)  # a gate no model passes: stays a challenger
    assert all(not s["cached"] for s in second["pipeline"]["stages"])  # the corpus feeds every stage here
    assert dec_keys.isdisjoint(s["key"] for s in second["pipeline"]["stages"])
    assert second["version"] == 2 and not second["promoted"] and second["champion"] == 1
    assert "ppl" in second["reason"] and "x 0.01" in second["reason"]
    assert second["champion_metrics"]["ppl"] != first["metrics"]["ppl"]  # champion re-measured on the new split
    rows = {r["version"]: r for r in list_models("lord-tiny-test")}
    assert rows[1]["aliases"] == "champion" and rows[2]["aliases"] == "challenger"
    assert rows[2]["gate"] == "challenger" and "x 0.01" in rows[2]["reason"]

    third = lord_retrain(**kw, max_ppl_ratio=100.0, min_pass_at_1_delta=-1.0)  # same inputs: cache, no new version
    assert all(s["cached"] for s in third["pipeline"]["stages"])
    # same v2 artifact, gated again: a lenient ratio still needs an improvement (lower ppl) to move the alias
    assert third["version"] == 2 and third["promoted"] == (third["metrics"]["ppl"] < third["champion_metrics"]["ppl"])
    assert promote("lord-tiny-test", "1") == "lord-tiny-test: alias 'champion' v" + \
        ("2" if third["promoted"] else "1") + " -> v1"
    assert {r["version"]: r["aliases"] for r in list_models("lord-tiny-test")}[1].startswith("champion")


def test_gate_decisions():
    from flows.registry import GateConfig, gate

    cfg = GateConfig()
    assert gate({"ppl": 9.0}, None, cfg) == (True, "no champion yet")
    assert gate({"ppl": 9.0, "pass_at_1": 0.5}, {"ppl": 10.0, "pass_at_1": 0.5}, cfg)[0]
    assert not gate({"ppl": 11.0, "pass_at_1": 0.6}, {"ppl": 10.0, "pass_at_1": 0.5}, cfg)[0]
    assert gate({"ppl": 11.0, "pass_at_1": 0.6}, {"ppl": 10.0, "pass_at_1": 0.5}, GateConfig(max_ppl_ratio=1.2))[0]
    ok, why = gate({"ppl": 9.0, "pass_at_1": 0.4}, {"ppl": 10.0, "pass_at_1": 0.5}, cfg)
    assert not ok and "pass@1 0.4 < champion 0.5" in why
    ok, why = gate({"ppl": 10.0, "pass_at_1": 0.5}, {"ppl": 10.0, "pass_at_1": 0.5}, cfg)
    assert not ok and "no improvement" in why


def test_cli_help_is_fast_and_imports_no_torch():
    from flows.cli import DTYPE_CHOICES
    from sources.compute import DTYPE_CHOICES as REAL

    assert DTYPE_CHOICES == REAL
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import sys, io, contextlib\nfrom flows.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    try:\n        main(['--help'])\n    except SystemExit:\n"
            "        pass\nassert 'sweep' in buf.getvalue() and 'quantize' in buf.getvalue()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'prefect', 'mlflow') if m in sys.modules))")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    assert time.perf_counter() - t0 < 5.0
    sub = subprocess.run([sys.executable, "-m", "flows.cli", "quantize", "--help"], env=env, capture_output=True,
                         text=True, check=True)  # a library subcommand still gets its full parser
    assert "--group-size" in sub.stdout


def test_sigkilled_run_is_marked_killed_by_the_next_run(store, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.tracking import Tracker

    code = ("import os, signal\nfrom flows.tracking import Tracker\nt = Tracker('test-killed')\n"
            "rid = t.start_parent('doomed', {}, {})\nprint(rid, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": store}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == -9
    run_id = out.stdout.strip()
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(run_id).info.status == "RUNNING"
    live = Tracker("test-killed")
    live.start_parent("alive", {}, {})  # the next run of the experiment reaps the dead one, not itself
    assert client.get_run(run_id).info.status == "KILLED"
    assert "killed" in client.get_run(run_id).data.tags["lord.killed_reason"]
    assert live.reap_killed() == [] and client.get_run(live.parent_id).info.status == "RUNNING"
    live.end_parent()
