"""Two models on the same HumanEval problems: which problems one passes and the other fails, and whether the
difference is more than chance (exact McNemar test).

Why: pass@1 of a compressed model and of its dense reference are two numbers on the *same* problems, so their
difference is told by the discordant problems alone. 65 vs 70 of 164 is -3 points, but if 9 were lost and 4
gained that is p = 0.27 (two-sided), well inside the churn one greedy run shows; pass@1 alone cannot tell a user.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import EvalError


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: under no difference each discordant problem is a fair coin, so the
    smaller side is Binomial(gained + lost, 1/2); p = 2 P(X <= min), capped at 1 (1.0 with no discordant pair)."""
    if gained < 0 or lost < 0:
        raise EvalError(f"mcnemar_exact got gained={gained}, lost={lost}; counts must be >= 0")
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def passed_by_task(results: Iterable[Mapping[str, Any]]) -> dict[str, bool] | None:
    """task_id -> passed, from ``results.jsonl`` rows of a greedy run (one sample a problem); None when some
    problem has several samples (pass@1 is then a rate per problem, not a pass/fail pair to compare)."""
    out: dict[str, bool] = {}
    for r in results:
        task = r["task_id"]
        if task in out:
            return None
        out[task] = r["status"] == "passed"
    return out


def compare_passes(reference: Mapping[str, bool], other: Mapping[str, bool]) -> dict[str, Any]:
    """``other`` against ``reference`` on the problems both evaluated: counts, gained/lost ids and McNemar's p."""
    common = sorted(set(reference) & set(other))
    if not common:
        raise EvalError("the two runs share no HumanEval problem; evaluate the same problems (e.g. the same --limit)")
    gained = [t for t in common if other[t] and not reference[t]]
    lost = [t for t in common if reference[t] and not other[t]]
    return {"n_problems": len(common), "n_passed_reference": sum(reference[t] for t in common),
            "n_passed": sum(other[t] for t in common), "gained": gained, "lost": lost,
            "p_value": mcnemar_exact(len(gained), len(lost))}


def load_passes(eval_dir: Path) -> dict[str, bool] | None:
    """The per-problem outcome of an evaluation output dir (``lord eval`` / the evaluate stage, or a HumanEval
    dir itself); None when it has no greedy HumanEval results."""
    d = Path(eval_dir)
    d = d / "humaneval" if (d / "humaneval").is_dir() else d
    path = d / "results.jsonl"
    if not path.is_file():
        return None
    from .humaneval import load_results

    return passed_by_task(load_results(d))
