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


def pass_rates_by_task(results: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """task_id -> share of its samples that passed (pass@1 of the problem, unbiased for any n)."""
    counts: dict[str, list[int]] = {}
    for r in results:
        c = counts.setdefault(r["task_id"], [0, 0])
        c[0] += r["status"] == "passed"
        c[1] += 1
    return {t: k / n for t, (k, n) in counts.items()}


def sign_flip_p(diffs: list[float], n_draws: int = 20000, seed: int = 0) -> float:
    """Two-sided paired permutation p-value of ``mean(diffs) != 0``: under no difference each problem's
    difference is as likely negated, so flip signs at random and count means at least as far from 0 (exact
    enumeration up to 16 non-zero differences, else ``n_draws`` seeded draws, with the +1 correction)."""
    import torch

    d = torch.tensor([x for x in diffs if x != 0.0], dtype=torch.float64)
    if d.numel() == 0:
        return 1.0
    observed = float(d.sum().abs()) - 1e-12
    if d.numel() <= 16:
        signs = ((torch.arange(2 ** d.numel()).unsqueeze(1) >> torch.arange(d.numel())) & 1) * 2 - 1
        return float(((signs.double() @ d).abs() >= observed).double().mean())
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n_draws, d.numel()), generator=g).double() * 2 - 1
    return (int(((signs @ d).abs() >= observed).sum()) + 1) / (n_draws + 1)


def compare_rates(reference: Mapping[str, float], other: Mapping[str, float]) -> dict[str, Any]:
    """``other`` against ``reference`` with several samples a problem: mean pass@1 of each on the common problems,
    how many problems each does better on, and the sign-flip p of the mean per-problem difference."""
    common = sorted(set(reference) & set(other))
    if not common:
        raise EvalError("the two runs share no HumanEval problem; evaluate the same problems (e.g. the same --limit)")
    diffs = [other[t] - reference[t] for t in common]
    return {"n_problems": len(common), "pass_at_1_reference": sum(reference[t] for t in common) / len(common),
            "pass_at_1": sum(other[t] for t in common) / len(common), "n_better": sum(x > 0 for x in diffs),
            "n_worse": sum(x < 0 for x in diffs), "p_value": sign_flip_p(diffs)}


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


def load_outcomes(eval_dir: Path) -> dict[str, float] | None:
    """Per-problem pass@1 of an evaluation output dir (``lord eval`` / the evaluate stage, or a HumanEval dir
    itself): 0/1 for a greedy run, the passing share of its samples otherwise; None without HumanEval results."""
    d = Path(eval_dir)
    d = d / "humaneval" if (d / "humaneval").is_dir() else d
    if not (d / "results.jsonl").is_file():
        return None
    from .humaneval import load_results

    return pass_rates_by_task(load_results(d))


def compare_outcomes(reference: Mapping[str, float], other: Mapping[str, float]) -> dict[str, Any]:
    """McNemar's test when both are greedy (every outcome 0 or 1), else the sign-flip test of the rates; the
    same keys either way: ``n_worse`` / ``n_better`` problems and ``p_value``."""
    if all(v in (0.0, 1.0) for v in (*reference.values(), *other.values())):
        c = compare_passes({t: v == 1.0 for t, v in reference.items()}, {t: v == 1.0 for t, v in other.items()})
        n = c["n_problems"]
        return {**c, "n_worse": len(c["lost"]), "n_better": len(c["gained"]), "pass_at_1": c["n_passed"] / n,
                "pass_at_1_reference": c["n_passed_reference"] / n, "test": "mcnemar"}
    return {**compare_rates(reference, other), "test": "sign-flip"}
