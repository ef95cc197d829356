"""Rank arithmetic: parity, parameters removed, and the solvers the rank plans (lord/plans.py) are made of.

Definitions (reported for every plan):
* parity rank of an m x n group: ``m n / (m + n)``; at or above it a factorization stores more than ``W``, so a
  group is only factored at ``r <= ceil(parity) - 1`` (``max_factored_rank``).
* rank reduction of a factored group: ``1 - r / min(m, n)`` (the paper's axis).
* parameter reduction: parameters removed (``m n - r (m + n)`` per factored group; biases unchanged) divided by
  all parameters of the model (embeddings and head included, tied tensors counted once).

Solvers for a target of removed parameters (each hits the smallest removal >= the target):
* ``parity_fraction_ranks``: every group at the same fraction ``f`` of its parity rank, ``r = floor(f * parity)``,
  so every group gives up the same share of its own parameters; ``f`` found by bisection.
  ``uniform_rank_reduction`` instead gives every group ``r = round((1 - rho) min(m, n))``, dense where that is
  not below parity (the paper's uniform axis).
* ``equal_error_ranks``: every group at the smallest rank whose relative output error is <= ``tau`` (dense if
  that rank is not below parity); ``tau`` found by bisection.
* ``min_total_error_ranks``: minimise ``sum_g e_g(r_g)`` (``e_g`` = a group's error curve, possibly weighted)
  subject to the target, a multiple-choice knapsack solved greedily on each group's lower convex hull of
  (parameters removed, error): take the cheapest error per removed parameter first, across all groups.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from lord.errors import LordError
from lord.surgery import Group


def parity_rank(m: int, n: int) -> float:
    return m * n / (m + n)


def max_factored_rank(m: int, n: int) -> int:
    """Largest rank strictly below parity."""
    return math.ceil(parity_rank(m, n)) - 1


def params_removed(m: int, n: int, rank: int | None) -> int:
    return 0 if rank is None else m * n - rank * (m + n)


def removal_target(groups: list[Group], total_params: int, reduction: float | None, plan: str) -> float:
    """Parameters to remove for a whole-model ``reduction``, checked against what ``groups`` can give up."""
    if reduction is None or not 0 < reduction < 1:
        raise LordError(f"plan {plan!r} needs a parameter reduction in (0, 1), got {reduction}")
    target = reduction * total_params
    ceiling = sum(max(0, params_removed(g.m, g.n, 1)) for g in groups)
    if target > ceiling:
        raise LordError(f"a {reduction:.0%} parameter reduction needs {target:.3g} parameters removed, but "
                        f"the targeted groups hold at most {ceiling:.3g} removable; lower the reduction or "
                        "target more groups")
    return target


def plan_summary(groups: list[Group], ranks: Mapping[str, int | None], total_params: int,
                 linear_params: int | None = None) -> dict[str, float]:
    """Whole-model parameter reduction, the targeted layers' own reduction, the share of all factorable linear
    parameters removed (``linear_params``: every group's ``m n``, targeted or not; default the targeted ones; how
    most papers count) and the mean rank reduction."""
    removed = sum(params_removed(g.m, g.n, ranks.get(g.name)) for g in groups)
    layer_params = sum(g.m * g.n for g in groups)
    factored = [g for g in groups if ranks.get(g.name) is not None]
    rr = [1 - ranks[g.name] / min(g.m, g.n) for g in factored]
    return {
        "param_reduction": removed / total_params,
        "layer_param_reduction": removed / layer_params,
        "linear_param_reduction": removed / (linear_params or layer_params),
        "rank_reduction_mean": sum(rr) / len(rr) if rr else 0.0,
        "n_groups": len(groups),
        "n_groups_factored": len(factored),
        "params_removed": removed,
    }


def _removed(groups: list[Group], ranks: Mapping[str, int | None]) -> int:
    return sum(params_removed(g.m, g.n, ranks.get(g.name)) for g in groups)


def uniform_rank_reduction(groups: list[Group], rho: float) -> dict[str, int | None]:
    """Every group at ``r = round((1 - rho) min(m, n))`` (at least 1), dense where that is not below parity."""
    if not 0 < rho < 1:
        raise LordError(f"rank_reduction must be in (0, 1), got {rho}")
    out: dict[str, int | None] = {}
    for g in groups:
        r = max(1, round((1 - rho) * min(g.m, g.n)))
        out[g.name] = r if r <= max_factored_rank(g.m, g.n) else None
    return out


def parity_fraction_ranks(groups: list[Group], target: float,
                          depth: Mapping[str, float] | None = None) -> dict[str, int | None] | None:
    """Every group at ``r = floor(parity * (1 - c_g (1 - f)))`` (clipped to ``[1, max_factored_rank]``), with
    ``f`` the largest fraction (bisection) removing >= ``target``; ``c_g = depth[group]`` (default 1: the uniform
    plan; lord/search.py varies it per type; ``c_g = 0`` leaves the group dense). None if even ``f = 0`` falls
    short."""
    def ranks(f: float) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for g in groups:
            c = depth[g.name] if depth is not None else 1.0
            rmax = max_factored_rank(g.m, g.n)
            if c == 0 or rmax < 1:  # c = 0: the group stays dense (not factored at its parity rank)
                out[g.name] = None
                continue
            frac = 1.0 - c * (1.0 - f)
            out[g.name] = max(1, min(rmax, math.floor(frac * parity_rank(g.m, g.n))))
        return out

    if _removed(groups, ranks(0.0)) < target:
        return None
    lo, hi = 0.0, 1.0  # find the largest f whose removal still meets the target
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if _removed(groups, ranks(mid)) >= target:
            lo = mid
        else:
            hi = mid
    return ranks(lo)


def equal_error_ranks(groups: list[Group], target: float, curves: Mapping[str, torch.Tensor]) -> dict[str, int | None]:
    """Every group at the smallest rank with error <= ``tau``, the smallest ``tau`` meeting ``target``."""
    def ranks(tau: float) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for g in groups:
            r = max(1, int((curves[g.name] > tau).sum()))  # error curve is non-increasing in r
            out[g.name] = r if r <= max_factored_rank(g.m, g.n) else None
        return out

    lo, hi = 0.0, 1.0  # removal(hi) >= target (every group at rank 1); find the smallest such tau
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _removed(groups, ranks(mid)) >= target:
            hi = mid
        else:
            lo = mid
    return ranks(hi)


def min_total_error_ranks(groups: list[Group], target: float,
                          curves: Mapping[str, torch.Tensor]) -> dict[str, int | None]:
    """Least ``sum_g curves[g][r_g]`` removing >= ``target``: greedy on each group's lower convex hull."""
    segments = []  # (slope, group index, step, rank after the step, params removed by the step)
    for gi, g in enumerate(groups):
        curve = curves[g.name].tolist()
        rmax = min(max_factored_rank(g.m, g.n), len(curve) - 1)
        points = [(0, 0.0, None)] + [(params_removed(g.m, g.n, r), curve[r], r) for r in range(rmax, 0, -1)]
        hull = _lower_hull(points)
        for step, (a, b) in enumerate(zip(hull, hull[1:], strict=False)):
            segments.append(((b[1] - a[1]) / (b[0] - a[0]), gi, step, b[2], b[0] - a[0]))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    ranks: dict[str, int | None] = {g.name: None for g in groups}
    removed = 0
    for _slope, gi, _step, rank, delta in segments:
        if removed >= target:
            break
        ranks[groups[gi].name] = rank
        removed += delta
    return ranks


def _lower_hull(points: list[tuple[int, float, int | None]]) -> list[tuple[int, float, int | None]]:
    """Lower convex hull of points sorted by x (Andrew's monotone chain), first point kept."""
    hull: list[tuple[int, float, int | None]] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:  # hull[-1] is not below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def round_down_ranks(groups: list[Group], ranks: Mapping[str, int | None], multiple: int) -> dict[str, int | None]:
    """Every rank rounded down to a multiple of ``multiple`` (matmul kernels favour aligned inner dimensions);
    rounding down keeps each group below parity and removes at least as much. Ranks below ``multiple`` stay."""
    if multiple < 1:
        raise LordError(f"rank_multiple must be >= 1, got {multiple}")
    return {g.name: r if (r := ranks.get(g.name)) is None or r < multiple else r - r % multiple for g in groups}
