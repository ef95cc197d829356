"""The ``lord-sweep`` flow: a grid over reduction x plan x bits x vocab as one Prefect flow whose grid points
run on a Dask cluster (prefect-dask's ``DaskTaskRunner``).

Shared stages (the dense evaluation, vocabulary trimming, calibration of each base) run once in the flow
process through the same content-keyed stage cache as ``lord-pipeline`` (flows/tasks.py); every point then
runs decompose -> quantize -> evaluate on a Dask worker, again through that cache, so two points with the same
(reduction, plan) share one decomposition (the second waits on the artifact lock and reuses it) and a rerun
of the sweep is all cache hits. Workers only need the runs dir (shared storage on a multi-machine cluster)
and the Prefect API; all MLflow logging happens here in the driver: one parent run, one nested run per point
(and per shared stage), the table and Pareto plots as artifacts.

``n_workers=0`` runs the points one after another in the flow process (the serial baseline).
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.errors import FlowError
from flows.pareto import pareto_rows, write_pareto_plots
from flows.pipeline import _Runner, _stage_configs
from flows.presets import SUPPORTED_BITS, resolve_spec
from flows.stages import STATS_FILE
from flows.summary import ROW_METRICS
from flows.tasks import submit_stage
from flows.tracking import Tracker

POINT_STAGES = ("decompose", "quantize", "evaluate")


@dataclass(frozen=True)
class SweepPoint:
    reduction: float
    plan: str
    bits: int | None  # None: no quantization (the float LoRD model)
    vocab: bool

    @property
    def name(self) -> str:
        return (f"r{self.reduction:g}-{self.plan}-{'fp' if self.bits is None else f'b{self.bits}'}"
                f"{'-vocab' if self.vocab else ''}")

    def params(self) -> dict[str, Any]:
        return {"reduction": self.reduction, "plan": self.plan, "bits": self.bits or 0, "vocab": self.vocab}


def grid(reductions: list[float], plans: list[str], bits: list[int | None],
         vocab: list[bool]) -> list[SweepPoint]:
    """The cartesian grid, validated (values are re-validated by each stage config when built)."""
    axes = {"reductions": reductions, "plans": plans, "bits": bits, "vocab": vocab}
    empty = [k for k, v in axes.items() if not v]
    if empty:
        raise FlowError(f"sweep axes {empty} are empty; give at least one value each, e.g. --reductions 0.1 0.2.")
    bad = [b for b in bits if b is not None and b not in SUPPORTED_BITS]
    if bad:
        raise FlowError(f"bits={bits}: {bad} not supported; expected values in {list(SUPPORTED_BITS)} "
                        "(0 = no quantization).")
    points = [SweepPoint(float(r), p, b, bool(v)) for r, p, b, v in itertools.product(reductions, plans, bits, vocab)]
    if len(set(points)) != len(points):
        raise FlowError(f"sweep axes {axes} hold duplicate values; give each value once.")
    return points


def dask_runner(address: str | None, n_workers: int, threads_per_worker: int = 1) -> Any:
    """An existing scheduler (``address``, e.g. ``tcp://scheduler:8786``) or a local cluster of ``n_workers``
    processes with one thread each (and OMP/MKL threads to match, so two workers do not oversubscribe)."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    env = {k: str(threads_per_worker) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": n_workers, "threads_per_worker": threads_per_worker, "processes": True,
        "host": "127.0.0.1", "dashboard_address": None, "memory_limit": 0, "env": env})


def _run_stage(stage: str, cfg: dict[str, Any], inputs: dict[str, str], runs_dir: Path,
               label: str) -> dict[str, Any]:
    state, key, out = submit_stage(stage, cfg, inputs, runs_dir, label)
    result = state.result()  # raises the stage's own error on failure
    return {"stage": stage, "label": label, "key": key, "dir": str(out), "cached": state.name == "Cached",
            "reused": bool(result.get("reused")), "seconds": result.get("seconds", 0.0),
            "metrics": result.get("metrics", {})}


@task(name="sweep-point", task_run_name="{name}")
def sweep_point(name: str, cfgs: dict[str, dict[str, Any]], base: str, stats: str, bits: int | None,
                runs_dir: str) -> dict[str, Any]:
    """One grid point on whichever worker Dask picked: decompose (-> refine) -> quantize -> evaluate
    (cache-keyed)."""
    t0 = time.perf_counter()
    root = Path(runs_dir)
    recs = [_run_stage("decompose", cfgs["decompose"], {"model": base, "stats": stats}, root,
                       f"{name}/decompose")]
    model = recs[-1]["dir"]
    if "refine" in cfgs:  # the preset (or an override) turned block-wise refinement of the factors on
        recs.append(_run_stage("refine", cfgs["refine"], {"model": model}, root, f"{name}/refine"))
        model = recs[-1]["dir"]
    if bits is not None:
        recs.append(_run_stage("quantize", cfgs[f"quantize{bits}"], {"model": model}, root, f"{name}/quantize{bits}"))
        model = recs[-1]["dir"]
    recs.append(_run_stage("evaluate", cfgs["evaluate"], {"model": model}, root, f"{name}/evaluate"))
    return {"name": name, "model": model, "stages": recs, "metrics": recs[-1]["metrics"],
            "seconds": round(time.perf_counter() - t0, 3), "worker_pid": os.getpid()}


@flow(name="lord-sweep-points")
def sweep_points(jobs: list[dict[str, Any]], runs_dir: str) -> list[dict[str, Any]]:
    """The fan-out: one ``sweep_point`` task per grid point on this flow's task runner (Dask or serial).
    A failed point is reported in its record, not raised, so the other points still finish."""
    futures = [sweep_point.submit(runs_dir=runs_dir, **job) for job in jobs]
    out = []
    for job, fut in zip(jobs, futures, strict=True):
        state = fut.wait() or fut.state
        try:
            out.append(fut.result())
        except BaseException as e:  # noqa: BLE001 - logged per point by the driver
            out.append({"name": job["name"], "error": f"{type(e).__name__}: {e}", "state": str(state)})
    return out


@flow(name="lord-sweep", log_prints=True)
def lord_sweep(
    preset: str = "smoke",
    model: str | None = None,
    reductions: list[float] | None = None,
    plans: list[str] | None = None,
    bits: list[int] | None = None,
    vocab: list[bool] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    n_workers: int = 2,
    dask_address: str | None = None,
    runs_dir: str = "runs",
    experiment: str = "lord-sweep",
) -> dict[str, Any]:
    """Run the grid; returns the MLflow parent run id, per-point rows, the Pareto fronts and timings.

    ``bits`` 0 means "no quantization" for that point. ``n_workers`` local Dask workers (1 thread each) unless
    ``dask_address`` names a running scheduler; ``n_workers=0`` runs the points serially in this process.
    """
    points = grid(reductions or [0.1], plans or ["uniform"], [b or None for b in (bits or [4])],
                  vocab or [False])
    if n_workers < 0:
        raise FlowError(f"n_workers={n_workers}: expected >= 1 Dask workers, or 0 to run points serially.")
    specs = {p: resolve_spec(preset, model, p.reduction, [p.bits] if p.bits else [],
                             {"vocab": p.vocab, "quantize": p.bits is not None, "finetune": False},
                             _merge(overrides, {"decompose": {"plan": p.plan}})) for p in points}
    cfgs = {p: _stage_configs(s) for p, s in specs.items()}  # every config validated before any compute
    tracker = Tracker(experiment)
    root = Path(runs_dir).resolve()
    t0 = time.perf_counter()
    first = specs[points[0]]
    shared = _Runner(first, cfgs[points[0]], root, tracker)
    executor = "serial" if n_workers == 0 else (f"dask:{dask_address}" if dask_address else f"dask-local:{n_workers}")
    try:
        tracker.start_parent(
            run_name=str(flow_run.get_name() or "lord-sweep"),
            params={"preset": preset, "model": first.model, "n_points": len(points), "executor": executor,
                    "reductions": ",".join(f"{r:g}" for r in sorted({p.reduction for p in points})),
                    "plans": ",".join(sorted({p.plan for p in points})),
                    "bits": ",".join(str(b) for b in sorted({p.bits or 0 for p in points})),
                    "vocab": ",".join(sorted({str(p.vocab).lower() for p in points}))},
            tags={"lord.kind": "sweep", "prefect.flow_run_id": str(flow_run.get_id()),
                  "prefect.deployment": str(deployment.get_name() or ""), "lord.model": first.model})
        jobs = _shared_stages(points, specs, cfgs, shared)
        shared_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        runner = ThreadPoolTaskRunner(max_workers=1) if n_workers == 0 else dask_runner(dask_address, n_workers)
        results = sweep_points.with_options(task_runner=runner)(jobs=jobs, runs_dir=str(root))
        points_seconds = time.perf_counter() - t1
        summary = _log_points(tracker, shared, results, {p.name: p for p in points})
        summary.update({"executor": executor, "shared_seconds": round(shared_seconds, 3),
                        "points_seconds": round(points_seconds, 3),
                        "wall_seconds": round(time.perf_counter() - t0, 3), "shared_stages": shared.records})
        tracker.log_parent_metrics({k: float(summary[k]) for k in ("shared_seconds", "points_seconds", "wall_seconds")})
        failed = [r for r in results if "error" in r]
        if failed:
            raise FlowError(f"{len(failed)} of {len(points)} sweep points failed: "
                            + "; ".join(f"{r['name']}: {r['error']}" for r in failed))
    except BaseException:
        tracker.end_parent(failed=True)
        raise
    tracker.end_parent()
    return summary


def _merge(a: dict[str, dict[str, Any]] | None, b: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in (a or {}).items()}
    for k, v in b.items():
        out.setdefault(k, {}).update(v)
    return out


def _shared_stages(points: list[SweepPoint], specs: dict, cfgs: dict, shared: _Runner) -> list[dict[str, Any]]:
    """Dense evaluation, vocab trimming and calibration once per distinct base, here in the driver; returns
    one job (the point's configs, its base model and statistics) per grid point."""
    shared._final = "dense"  # the dense baseline gets the full evaluation config, like every point's final model
    shared._evaluate("dense", specs[points[0]].model, {})
    bases: dict[bool, tuple[str, str]] = {}
    jobs = []
    for p in points:
        c = cfgs[p]
        if p.vocab not in bases:
            base = specs[p].model
            if p.vocab:
                shared.cfgs = {**shared.cfgs, "vocab": c["vocab"]}
                base = shared._stage("vocab", "vocab", {"model": base})["dir"]
                shared._evaluate("vocab", base, c["vocab"])
            shared.cfgs = {**shared.cfgs, "calibrate": c["calibrate"]}
            stats = shared._stage("calibrate", "calibrate", {"model": base}, label=f"calibrate[{base_name(p)}]")
            bases[p.vocab] = (base, str(Path(stats["dir"]) / STATS_FILE))
        base, stats = bases[p.vocab]
        jobs.append({"name": p.name, "cfgs": c, "base": base, "stats": stats, "bits": p.bits})
    return jobs


def base_name(p: SweepPoint) -> str:
    return "vocab" if p.vocab else "dense"


def _log_points(tracker: Tracker, shared: _Runner, results: list[dict[str, Any]],
                points: dict[str, SweepPoint]) -> dict[str, Any]:
    dense = next((v["metrics"] for v in shared.variants if v["variant"] == "dense"), {})
    dense_ppl, dense_params = dense.get(ROW_METRICS["ppl"]), dense.get(ROW_METRICS["n_params"])
    rows = [{"variant": "dense", "reduction": 0.0, "plan": "-", "bits": 0, "vocab": False,
             "n_params": dense_params, "size_mb": dense.get(ROW_METRICS["size_mb"]), "ppl": dense_ppl,
             "pass_at_1": dense.get(ROW_METRICS["pass_at_1"]), "ppl_increase": 0.0, "param_reduction": 0.0}]
    for res in results:
        p = points[res["name"]]
        m = res.get("metrics", {})
        row = {"variant": p.name, **p.params(), **{col: m.get(key) for col, key in ROW_METRICS.items()},
               "seconds": res.get("seconds"),
               "stages_computed": sum(not s["cached"] and not s["reused"] for s in res.get("stages", [])),
               "worker_pid": res.get("worker_pid")}
        if isinstance(row["ppl"], (int, float)) and dense_ppl:
            row["ppl_increase"] = row["ppl"] / dense_ppl - 1.0
        if isinstance(row["n_params"], (int, float)) and dense_params:
            row["param_reduction"] = 1.0 - row["n_params"] / dense_params
        final = res["stages"][-1] if res.get("stages") else None
        result = None if final is None else {**final, "metrics": {**m, "point_seconds": res.get("seconds", 0.0)},
                                             "dir": res["model"]}
        tracker.log_stage("point", p.name, p.params(), result,
                          cached=bool(res.get("stages")) and row["stages_computed"] == 0,
                          tags={"lord.kind": "point", "lord.point": p.name,
                                "lord.stages": ",".join(s["label"] for s in res.get("stages", []))},
                          error=res.get("error"))
        row["error"] = res.get("error")
        rows.append(row)
    rows = pareto_rows(rows)
    tracker.log_parent_json("sweep.json", {"rows": rows, "points": results, "shared": shared.records})
    for png in write_pareto_plots(rows, shared.runs_dir / ".plots" / str(tracker.parent_id)):
        tracker.log_parent_file(png, "plots")
    table = [{k: v for k, v in r.items() if k not in ("worker_pid", "error")} for r in rows]
    create_table_artifact(key="lord-sweep", table=table, description="lord-sweep: one row per grid point")
    return {"mlflow_run_id": tracker.parent_id, "experiment_id": tracker.experiment_id, "tracking_uri": tracker.uri,
            "rows": rows, "points": results}
