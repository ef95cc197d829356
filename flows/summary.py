"""The summary table of a run (one row per evaluated model variant) and plain-text table formatting, shared
by ``lord run`` (from the flow's return value) and ``lord compare`` (from MLflow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The config fields worth a column: the ones that change between variants and explain their numbers.
KEY_PARAMS = ("keep", "coverage", "reduction", "rank_reduction", "method", "plan", "bits", "group_size", "outlier_threshold",
              "steps", "lora_r", "lr")
# summary column -> the metric the evaluation stage writes (evaluation/evaluate.py)
ROW_METRICS = {"size_mb": "size_mb", "n_params": "params", "ppl": "ppl", "pass_at_1": "pass_at_1"}


def short_params(cfg: dict[str, Any]) -> str:
    return " ".join(f"{k}={cfg[k]}" for k in KEY_PARAMS if k in cfg and cfg[k] is not None) or "-"


def adapter_base_mb(model: str) -> float:
    """An adapter artifact is deployed with its frozen base: the base's weight bytes (MB), else 0."""
    from finetune import FinetuneError
    from finetune.checkpoint import resolve_base
    from sources.artifact import read_artifact_meta

    p = Path(model)
    info = read_artifact_meta(p) if p.is_dir() else None
    if info is None or info["kind"] != "adapter":
        return 0.0
    try:
        base = resolve_base(p, info)
    except FinetuneError:  # the base moved away: nothing to count
        return 0.0
    if not isinstance(base, Path):
        return 0.0
    return sum(f.stat().st_size for f in base.rglob("*") if f.suffix in {".safetensors", ".bin"}) / 2**20


def summary_rows(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    dense_ppl = None
    for v in variants:
        m = v.get("metrics", {})
        row = {"variant": v["variant"], "params": short_params(v.get("params", {})),
               **{col: m.get(key) for col, key in ROW_METRICS.items()}}
        base_mb = adapter_base_mb(v.get("model", ""))
        if base_mb and isinstance(row["size_mb"], (int, float)):
            row["size_mb"] = round(row["size_mb"] + base_mb, 2)  # what a user deploys: base + adapter
        if v["variant"] == "dense":
            dense_ppl = row["ppl"]
        if isinstance(row["ppl"], (int, float)) and isinstance(dense_ppl, (int, float)) and dense_ppl:
            row["ppl_increase"] = row["ppl"] / dense_ppl - 1.0
        rows.append(row)
    dense_params = next((r["n_params"] for r in rows if r["variant"] == "dense"), None)
    for r in rows:
        if isinstance(r.get("n_params"), (int, float)) and isinstance(dense_params, (int, float)) and dense_params:
            r["param_reduction"] = 1.0 - r["n_params"] / dense_params
    _paired_humaneval(variants, rows)
    return rows


def _paired_humaneval(variants: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Each variant's HumanEval against dense on the problems both ran: problems it does worse / better on
    (``he_lost`` / ``he_gained``) and the paired test's p (``he_p``), so a pass@1 gap reads as churn or as a loss
    (evaluation.paired)."""
    from evaluation.paired import compare_outcomes, load_outcomes

    outcomes = [load_outcomes(Path(v["eval_dir"])) if v.get("eval_dir") else None for v in variants]
    dense = next((o for v, o in zip(variants, outcomes, strict=True) if v["variant"] == "dense"), None)
    if not dense:
        return
    for v, o, row in zip(variants, outcomes, rows, strict=True):
        if v["variant"] == "dense" or not o or not set(o) & set(dense):
            continue
        c = compare_outcomes(dense, o)
        row.update(he_lost=c["n_worse"], he_gained=c["n_better"], he_p=round(c["p_value"], 4))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def format_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Left-aligned plain-text table; missing values print as '-'."""
    if not rows:
        return "(no rows)"
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(row) for row in cells)])
