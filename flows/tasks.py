"""The Prefect task every stage runs through: cache keyed on inputs, persisted JSON results, an artifact
completeness check, and a per-artifact file lock.

Three layers keep resume honest:
1. Prefect's cache (key = ``flows.stages.stage_key``: config hash + input content hashes) skips a task whose
   result was persisted by an earlier run.
2. The flow refreshes that cache entry when the artifact it points to is missing or fails its checksum
   manifest (``artifacts.is_complete``), so a deleted or corrupt artifact is recomputed, never trusted.
3. Inside the task, an exclusive lock on ``<runs>/<stage>/.<key>.lock`` serialises two runs that need the
   same artifact: the second waits, finds it complete and reuses it (no stage computed twice at once).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task
from prefect.states import State

from artifacts import is_complete
from flows.errors import FlowError
from flows.stages import artifact_dir, content_hash, run_stage, stage_key

RESULTS_SUBDIR = ".prefect-results"


def _transient(task: Any, task_run: Any, state: State) -> bool:
    """Retry only what a retry can fix (I/O hiccups), not deterministic failures like a bad config."""
    try:
        state.result()
    except (OSError, TimeoutError, ConnectionError):
        return True
    except BaseException:
        return False
    return False


@contextlib.contextmanager
def artifact_lock(out_dir: Path) -> Iterator[None]:
    """Exclusive flock beside the artifact dir; the kernel drops it if the holder dies (even on SIGKILL)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_temps(out_dir: Path) -> None:
    """Temp dirs of a writer killed mid-stage (atomic_dir names them ``.<name>.tmp-*``); safe to delete
    because every writer of this artifact holds its lock, which we now hold."""
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


@task(persist_result=True, result_serializer="json", retries=1, retry_delay_seconds=2,
      retry_condition_fn=_transient)
def stage_task(stage: str, cfg: dict[str, Any], inputs: dict[str, str], key: str, out_dir: str) -> dict[str, Any]:
    """Run one stage into ``out_dir`` (or reuse it if a finished copy is already there)."""
    out = Path(out_dir)
    with artifact_lock(out):
        if is_complete(out):
            metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
            return {"stage": stage, "key": key, "dir": out_dir, "metrics": metrics, "seconds": 0.0,
                    "reused": True}
        _remove_stale_temps(out)
        if out.exists():  # a finished-looking dir that failed its manifest: corrupt, recompute it
            shutil.rmtree(out)
        t0 = time.perf_counter()
        metrics = run_stage(stage, cfg, inputs, out)
        seconds = time.perf_counter() - t0
        if not is_complete(out):
            raise FlowError(f"stage {stage!r} returned but {out} is not a complete artifact (no valid MANIFEST.json); "
                            "the stage function must write its output with artifacts.atomic_dir.")
    return {"stage": stage, "key": key, "dir": out_dir, "metrics": _jsonable(metrics),
            "seconds": round(seconds, 3), "reused": False}


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(metrics, default=str))


def submit_stage(stage: str, cfg: dict[str, Any], inputs: dict[str, str], runs_dir: Path,
                 label: str) -> tuple[State, str, Path]:
    """Run ``stage`` through Prefect with its input-derived cache key; returns (final state, key, dir).

    Refreshing the cache when the artifact is incomplete is what makes a deleted or corrupted artifact
    recompute instead of returning a persisted result that points at nothing.
    """
    key = stage_key(stage, cfg, {name: content_hash(path) for name, path in sorted(inputs.items())})
    out = artifact_dir(runs_dir, stage, key)
    configured = stage_task.with_options(
        name=f"{stage}",
        task_run_name=f"{label}",
        cache_key_fn=lambda *_: f"{stage}-{key}",
        refresh_cache=not is_complete(out),
        result_storage=Path(runs_dir).resolve() / RESULTS_SUBDIR,
    )
    state = configured(stage, cfg, inputs, key, str(out), return_state=True)
    return state, key, out
