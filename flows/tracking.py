"""MLflow tracking for the flow: one parent run per flow run, one nested run per stage.

Uses ``MlflowClient`` with explicit run ids (no fluent active-run stack), so concurrent flow runs in one
process or many never write into each other's runs. Default store: ``sqlite:///mlflow.db`` with artifacts in
``./mlartifacts``; ``MLFLOW_TRACKING_URI`` overrides (e.g. the server ``lord serve`` starts). A tracking
server that does not answer is reported before any compute starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flows.errors import FlowError

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

DEFAULT_EXPERIMENT = "lord-pipeline"
# Small, human-readable artifact files are copied to MLflow; weights stay in the runs dir and are referenced.
LOGGED_SUFFIXES = {".json", ".jsonl", ".csv", ".txt", ".md", ".png", ".yaml"}
MAX_LOGGED_BYTES = 5 << 20
SKIP_FILES = {"MANIFEST.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
              "special_tokens_map.json", "generation_config.json", "added_tokens.json"}


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path('mlflow.db').resolve()}"


def check_reachable(uri: str, timeout_seconds: float = 5.0) -> None:
    """Fail fast with a fix, not an hour into the run: HTTP stores must answer /health, file stores be writable."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_seconds) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except (OSError, urllib.error.URLError) as e:
            raise FlowError(
                f"MLflow tracking server MLFLOW_TRACKING_URI={uri} is unreachable ({e}); expected a running "
                "server: start one with `lord serve`, or unset MLFLOW_TRACKING_URI to use ./mlflow.db."
            ) from e
        return
    if uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///"):]).parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise FlowError(f"MLflow store {uri}: directory {parent} is missing or not writable; "
                            "create it or set MLFLOW_TRACKING_URI to a writable location.")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{name}."))
        else:
            out[name] = v
    return out


@contextlib.contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a sqlite store across processes: two runs creating the same fresh mlflow.db
    race in its alembic migrations ("table _alembic_tmp_experiments already exists"; measured here)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///"):])
    with open(db.with_name(f".{db.name}.init.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def mlflow_key(name: str) -> str:
    """MLflow keys allow alphanumerics and ``_-. :/``; variant names like ``lord+gptq4`` use ``+``."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", name)


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in _flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _process_start(pid: int) -> str | None:
    """Start time (clock ticks since boot) of ``pid`` from /proc, or None when no such process exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def owner_tags() -> dict[str, str]:
    """Which process owns a parent run (read back by ``Tracker.reap_killed``)."""
    pid = os.getpid()
    return {"lord.host": socket.gethostname(), "lord.pid": str(pid), "lord.pid_start": _process_start(pid) or ""}


class Tracker:
    """The MLflow side of one flow run."""

    def __init__(self, experiment: str = DEFAULT_EXPERIMENT, uri: str | None = None) -> None:
        self.uri = uri or tracking_uri()
        check_reachable(self.uri)
        with _sqlite_init_lock(self.uri):
            self.client = MlflowClient(tracking_uri=self.uri)
            self.experiment_id = self._experiment(experiment)  # first use creates/migrates the store
        self.parent_id: str | None = None

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # artifacts beside the db; a server chooses its own root
            location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        try:
            # the MLflow 3 UI opens "model training" experiments on the runs table, not the GenAI overview
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={"mlflow.experimentKind": "custom_model_development"})
        except mlflow.exceptions.MlflowException:  # created concurrently by another run
            return self.client.get_experiment_by_name(name).experiment_id

    def start_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        self.reap_killed()
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={"lord.kind": "pipeline", **owner_tags(), **tags})
        self.parent_id = run.info.run_id
        self._log(self.parent_id, params=params)
        return self.parent_id

    def reap_killed(self) -> list[str]:
        """Mark KILLED the parent runs of this experiment still RUNNING whose process is gone (a SIGKILL or
        power cut never lets the flow end its run). Only runs started on this host are judged: their PID and
        its start time (so a reused PID is not mistaken for the owner) are in the run's tags."""
        killed = []
        runs = self.client.search_runs([self.experiment_id], "attributes.status = 'RUNNING'", max_results=500)
        for r in runs:
            t = r.data.tags
            if "mlflow.parentRunId" in t or t.get("lord.host") != socket.gethostname() or not t.get("lord.pid"):
                continue
            if _process_start(int(t["lord.pid"])) == t.get("lord.pid_start"):
                continue  # its process is still running
            self.client.set_tag(r.info.run_id, "lord.killed_reason",
                                f"process {t['lord.pid']} on {t['lord.host']} ended without closing the run "
                                "(killed); marked by a later run")
            self.client.set_terminated(r.info.run_id, status="KILLED")
            killed.append(r.info.run_id)
        return killed

    def log_stage(self, stage: str, label: str, cfg: dict[str, Any], result: dict[str, Any] | None,
                  cached: bool, tags: dict[str, str], error: str | None = None) -> str:
        """A nested run for one stage: config as params, metrics, small artifact files, and a reference to
        the checkpoint dir (path + manifest hash) rather than a copy of the weights."""
        run = self.client.create_run(
            self.experiment_id, run_name=label,
            tags={"mlflow.parentRunId": self.parent_id or "", "lord.kind": "stage", "lord.stage": stage,
                  "cached": str(cached).lower(), **tags},
        )
        run_id = run.info.run_id
        metrics = numeric_metrics({k: v for k, v in result["metrics"].items() if k != "curve"}) if result else {}
        if result:
            metrics["stage_seconds"] = float(result.get("seconds", 0.0))
        self._log(run_id, params=cfg, metrics=metrics,
                  tags={"lord.artifact_dir": result["dir"], "lord.artifact_key": result["key"]} if result else {})
        if result:
            self._log_curves(run_id, result["metrics"].get("curve"))
            self._log_dir_files(run_id, Path(result["dir"]))
        if error:
            self.client.set_tag(run_id, "lord.error", error[:4000])
        self.client.set_terminated(run_id, status="FAILED" if error else "FINISHED")
        return run_id

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        self._log(self.parent_id, metrics=metrics)

    def log_parent_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.parent_id, str(path), artifact_path)

    def log_parent_json(self, name: str, obj: Any) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            self.client.log_artifact(self.parent_id, str(p))

    def end_parent(self, failed: bool = False) -> None:
        if self.parent_id:
            self.client.set_terminated(self.parent_id, status="FAILED" if failed else "FINISHED")

    def _log(self, run_id: str, params: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
             tags: dict[str, str] | None = None) -> None:
        """Batched (metrics cost ~25 ms each against a server one by one), in chunks under MLflow's per-call
        limits (100 params, 1000 metrics); keys sanitised to MLflow's allowed characters."""
        ps = [Param(mlflow_key(k), str(v)[:6000]) for k, v in _flatten(params or {}).items()]
        ms = [Metric(mlflow_key(k), v, 0, 0) for k, v in (metrics or {}).items()]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(ps), len(ms), len(ts), 1), 100):
            self.client.log_batch(run_id, metrics=ms[i:i + 100], params=ps[i:i + 100], tags=ts[i:i + 100])

    def _log_curves(self, run_id: str, curves: Any) -> None:
        """Per-step series from a stage's metrics (``curve``: name -> list over steps 1..n, or {step: value})
        as MLflow metric histories, so the UI draws them as curves (e.g. the finetune loss per step)."""
        if not isinstance(curves, dict):
            return
        now = int(time.time() * 1000)
        ms = []
        for name, series in curves.items():
            points = series.items() if isinstance(series, dict) else enumerate(series, start=1)
            ms += [Metric(mlflow_key(f"curve.{name}"), float(v), now, int(step)) for step, v in points
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(run_id, metrics=ms[i:i + 1000])

    def _log_dir_files(self, run_id: str, directory: Path) -> None:
        if not directory.is_dir():
            return
        for p in sorted(directory.rglob("*")):
            if (p.is_file() and p.suffix in LOGGED_SUFFIXES and p.name not in SKIP_FILES
                    and p.stat().st_size <= MAX_LOGGED_BYTES):
                rel_parent = p.parent.relative_to(directory)
                self.client.log_artifact(run_id, str(p), None if str(rel_parent) == "." else str(rel_parent))
        manifest = directory / "MANIFEST.json"
        if manifest.is_file():
            entries = json.loads(manifest.read_text())
            ref = {"dir": str(directory.resolve()), "files": len(entries),
                   "bytes": sum(e["bytes"] for e in entries.values())}
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / "checkpoint_ref.json"
                p.write_text(json.dumps(ref, indent=2))
                self.client.log_artifact(run_id, str(p))
