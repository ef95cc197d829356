"""The one results envelope every benchmark writes (shared/BENCH.md), plus small timing helpers."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from artifacts import write_json_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": cpu,
        "python": platform.python_version(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def write_results(name: str, protocol: dict[str, Any], records: list[dict[str, Any]], **extra: Any) -> Path:
    """Write bench/results/<name>.json atomically in the shared envelope and return its path."""
    doc = {
        "benchmark": name,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "environment": environment(),
        "protocol": protocol,
        "records": records,
        **extra,
    }
    path = RESULTS / f"{name}.json"
    write_json_atomic(path, doc)
    print(f"wrote {path}")
    return path


def median_seconds(fn: Callable[[], Any], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# The held-out perplexity protocol every benchmark uses, so figures compare across files. 16 x 512 tokens
# keeps one ppl point of the 0.5B model near a minute on 2 cores.
PPL_PROTOCOL = {"seq_len": 512, "n_windows": 16, "batch_size": 4}


QUALITY_KEY = ("model", "stage", "plan", "param_reduction")


def merge_records(name: str, records: list[dict[str, Any]], protocol: dict[str, Any] | None = None,
                  key: tuple[str, ...] = QUALITY_KEY) -> Path:
    """Merge ``records`` into bench/results/<name>.json, a file several benchmarks share (quality.json):
    a new record replaces an old one with the same ``key`` (param_reduction compared to 4 decimals), the
    others are kept, and each benchmark's protocol is kept under its own entry."""
    import json

    def ident(r: dict[str, Any]) -> tuple:
        return tuple(round(r[k], 4) if isinstance(r.get(k), float) else r.get(k) for k in key)

    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    new_ids = {ident(r) for r in records}
    kept = [r for r in old.get("records", []) if ident(r) not in new_ids]
    merged_protocol = {**old.get("protocol", {}), **(protocol or {})}
    extra = {k: v for k, v in old.items() if k not in ("benchmark", "created", "environment", "protocol", "records")}
    return write_results(name, merged_protocol, kept + records, **extra)


def one_shot_factors(model: Any, tok: Any, files: list[Path], n_seqs: int, seq_len: int = 512) -> tuple[list, dict, Any]:
    """Every group's LoRD factorization from the dense statistics of ``n_seqs`` calibration windows (seed 0):
    ``(groups, facts, ids)``, what the quality benches cut their plans from."""
    import lord
    from sources import calibration_batches

    ids = calibration_batches(tok, files, n_seqs=n_seqs, seq_len=seq_len, seed=0)
    groups = lord.find_groups(model)
    stats = lord.collect_stats(model, groups, ids, batch_size=4, progress=False)
    facts = lord.factorize_groups(model, groups, stats, ("lord",), progress=False)["lord"]
    return groups, facts, ids
