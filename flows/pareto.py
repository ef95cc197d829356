"""Pareto fronts of a sweep (smaller and better at once) and their plots: size on disk vs held-out perplexity,
parameters vs HumanEval pass@1. A point is on a front when no other point is at least as good on both axes
and strictly better on one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.plots import _save, plt

# (x, y, y is better when higher, flag name, file)
FRONTS = (("size_mb", "ppl", False, "pareto_size_ppl", "pareto_size_vs_ppl.png"),
          ("n_params", "pass_at_1", True, "pareto_params_pass1", "pareto_params_vs_pass1.png"))
LABELS = {"size_mb": "size on disk (MB)", "ppl": "held-out code perplexity", "n_params": "parameters",
          "pass_at_1": "HumanEval pass@1"}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def front(rows: list[dict[str, Any]], x: str, y: str, higher_better: bool) -> list[int]:
    """Indices of rows on the (min x, min-or-max y) Pareto front; rows missing either value are skipped."""
    pts = [(i, float(r[x]), -float(r[y]) if higher_better else float(r[y]))
           for i, r in enumerate(rows) if _num(r.get(x)) and _num(r.get(y))]
    return [i for i, a, b in pts
            if not any(c <= a and d <= b and (c < a or d < b) for j, c, d in pts if j != i)]


def pareto_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with one boolean column per front."""
    out = [dict(r) for r in rows]
    for x, y, hb, flag, _ in FRONTS:
        on = set(front(out, x, y, hb))
        for i, r in enumerate(out):
            r[flag] = i in on
    return out


def write_pareto_plots(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for x, y, hb, _, name in FRONTS:
        idx = [i for i, r in enumerate(rows) if _num(r.get(x)) and _num(r.get(y))]
        if not idx:
            continue
        on = front(rows, x, y, hb)
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        ax.scatter([rows[i][x] for i in idx], [rows[i][y] for i in idx], color="tab:gray", label="grid point")
        line = sorted(on, key=lambda i: rows[i][x])
        ax.plot([rows[i][x] for i in line], [rows[i][y] for i in line], "o-", color="tab:red", label="Pareto front")
        for i in idx:
            ax.annotate(rows[i]["variant"], (rows[i][x], rows[i][y]), textcoords="offset points", xytext=(4, 3),
                        fontsize=7)
        if y == "ppl" and max(rows[i][y] for i in idx) > 10 * min(rows[i][y] for i in idx):
            ax.set_yscale("log")
        ax.set_xlabel(LABELS[x])
        ax.set_ylabel(LABELS[y] + (" (higher is better)" if hb else " (lower is better)"))
        ax.set_title(f"sweep: {LABELS[x]} vs {LABELS[y]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save(fig, out_dir / name))
    return paths
