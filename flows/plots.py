"""PNG plots logged to the parent MLflow run: ppl vs compression across the run's variants, stage wall time,
and (when the decompose artifact has a rank map) rank and error per layer group. matplotlib's Agg backend:
no display on servers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RANK_FILE = "rank_map.json"  # written by lord/stages.py:decompose_to_dir


def write_plots(rows: list[dict[str, Any]], records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [p for p in (_ppl_vs_compression(rows, out_dir), _stage_seconds(records, out_dir),
                         _rank_map(records, out_dir)) if p is not None]
    return paths


def _ppl_vs_compression(rows: list[dict[str, Any]], out_dir: Path) -> Path | None:
    pts = [(r["size_mb"], r["ppl"], r["variant"]) for r in rows
           if isinstance(r.get("ppl"), (int, float)) and isinstance(r.get("size_mb"), (int, float))]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    for x, y, name in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("model size on disk (MB)")
    ax.set_ylabel("held-out code perplexity")
    ax.set_title("perplexity vs compression")
    ax.grid(alpha=0.3)
    return _save(fig, out_dir / "ppl_vs_compression.png")


def _stage_seconds(records: list[dict[str, Any]], out_dir: Path) -> Path | None:
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(records) + 1.2))
    labels = [r["label"] + (" (cached)" if r["cached"] or r["reused"] else "") for r in records]
    ax.barh(labels, [float(r.get("seconds") or 0.0) for r in records])
    ax.invert_yaxis()
    ax.set_xlabel("seconds computed in this run")
    ax.set_title("stage time")
    return _save(fig, out_dir / "stage_seconds.png")


def _rank_map(records: list[dict[str, Any]], out_dir: Path) -> Path | None:
    rec = next((r for r in records if r["stage"] == "decompose"), None)
    if rec is None:
        return None
    path = Path(rec["dir"]) / RANK_FILE
    if not path.is_file():
        return None
    groups = json.loads(path.read_text())
    names = list(groups)
    # lord writes group -> {"rank" (None = kept dense), "m", "n", "rel_output_error", ...}
    kept = [1.0 if groups[g].get("rank") is None else groups[g]["rank"] / min(groups[g]["m"], groups[g]["n"])
            for g in names]
    errs = [float(groups[g].get("rel_output_error") or 0.0) for g in names]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    a1.bar(range(len(names)), kept)
    a1.set_ylabel("rank kept / min(m, n)")
    a1.set_title("LoRD rank plan per layer group (1.0 = left dense)")
    a2.bar(range(len(names)), errs, color="tab:red")
    a2.set_ylabel("relative output error")
    a2.set_xlabel("layer group (model order)")
    return _save(fig, out_dir / "rank_per_group.png")


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
