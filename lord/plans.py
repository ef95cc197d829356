"""Rank plans as strategies: which rank each group gets, what a plan needs to decide it, and its report.

Every plan declares its inputs (``needs_curves``: each group's error curve, ``decompose.Factorization.error_curve``;
``needs_sensitivity``: the model and a calibration batch for a sensitivity pass, lord/sensitivity.py;
``needs_model_loss``: the model's loss on whole candidate plans, lord/search.py) and ``plan(ctx) -> PlanReport``.
The rank arithmetic lives in lord/ranks.py; which plan uses which solver and measurement lives here only.

Plans for a target parameter reduction ``p`` (lord/ranks.py for the definitions):
* ``uniform``: every group at the same fraction of its parity rank (or, with ``rank_reduction``, the paper's
  uniform ``1 - r / min(m, n)``).
* ``budget``: equal error: every group at the smallest rank whose relative output error is <= ``tau``.
* ``spectrum``: minimum total error ``sum_g e_g(r_g)``.
* ``auto``: minimum predicted loss ``sum_g w_g e_g(r_g)``, ``w_g`` each group's measured loss sensitivity
  (``ctx.weights`` if given, else a Fisher or probe pass on ``ctx.model``).
* ``search``: measured, not predicted: per-type multipliers on the uniform plan found by coordinate descent on
  the calibration loss of the whole cut model, with the ``auto`` plan as a rival; the lower loss wins.

Measured (bench/results/lord.json, smollm2-135m, dense ppl 10.50, 16 x 512-token held-out windows): normalised
output error alone does not predict the loss cost of a cut across groups; weighting it does. Held-out ppl at
10 / 20 / 30% parameter reduction: ``uniform`` 17.96 / 27.39 / 50.58; ``spectrum`` (unweighted) 19.84 /
40.96 / 124.6; ``auto`` with Fisher weights (one backward over 8 x 256 tokens, ~1 min) 13.21 /
19.69 / 41.07, i.e. 0.36 / 0.54 / 0.76 x uniform's ppl increase; ``auto`` with loss-probe weights
(``sensitivity="probe"``, 120 probes, 15 min on a loaded CPU) 20.92 / 50.30 / 249.9: single-group probe deltas are ~0.01
nats, at the level of their noise (some negative), and one point per group extrapolates badly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import nn

from lord.decompose import Factorization
from lord.errors import LordError
from lord.ranks import (
    equal_error_ranks,
    min_total_error_ranks,
    parity_fraction_ranks,
    plan_summary,
    removal_target,
    uniform_rank_reduction,
)
from lord.search import least_sensitive, least_sensitive_ranks, search_plan
from lord.sensitivity import Sensitivity, fisher_sensitivities, probe_sensitivities, weights_of
from lord.speed import is_slow
from lord.surgery import Group

Ranks = dict[str, int | None]


@dataclass(frozen=True)
class PlanContext:
    """What a plan may read; each plan checks the parts its ``needs_*`` flags name."""

    groups: list[Group]
    total_params: int
    reduction: float | None = None  # whole-model parameter reduction
    rank_reduction: float | None = None  # uniform only, instead of reduction
    curves: Mapping[str, torch.Tensor] | None = None  # group -> error for ranks 0..k
    weights: Mapping[str, float] | None = None  # auto: given w_g (no sensitivity pass)
    model: nn.Module | None = None  # sensitivity pass / loss evaluations (left as given)
    facts: Mapping[str, Factorization] | None = None
    sensitivity_ids: torch.Tensor | None = None  # [n_seqs, seq_len] calibration tokens
    validation_ids: torch.Tensor | None = None  # search: an independent batch re-scoring the finalists
    sensitivity: str = "fisher"  # or "probe" (lord/sensitivity.py)
    probe_fraction: float = 0.75
    progress: bool = True


@dataclass(frozen=True)
class PlanReport:
    """A plan's ranks (None = the group stays dense) and what it measured to choose them."""

    plan: str
    ranks: Ranks
    seconds: float
    summary: dict[str, float]  # ranks.plan_summary of ``ranks``
    sensitivity: Sensitivity | None = None  # auto and search
    search: dict[str, Any] | None = None  # search: lord.search.search_plan's report

    def metrics(self) -> dict[str, Any]:
        """The plan's entries of the decompose metrics (metrics.json, MLflow)."""
        out: dict[str, Any] = {}
        if self.sensitivity is not None:
            out["sensitivity_seconds"] = self.sensitivity.seconds
        if self.search is not None:
            s = self.search
            out.update(search_seconds=s["seconds"], search_evaluations=s["evaluations"], search_loss=s["loss"],
                       search_loss_uniform=s["loss_uniform"], search_chosen=s["chosen"])
        return out

    def to_json(self, timings: bool = True) -> dict[str, Any] | None:
        """``sensitivity.json``'s layout (docs/CONTRACTS.md): ``{group: {weight, ...}, "_meta": {...}}`` plus
        ``"_search"`` for the search plan; None for plans without a sensitivity pass. ``timings=False`` drops
        the ``seconds`` entries (a checkpoint's files must be bit-identical on a recompute)."""
        if self.sensitivity is None:
            return None
        out = self.sensitivity.to_json()
        if self.search is not None:
            out["_search"] = self.search
        if not timings:
            out = {k: ({kk: vv for kk, vv in v.items() if kk != "seconds"} if k.startswith("_") else v)
                   for k, v in out.items()}
        return out


class RankPlan:
    """One rank plan. Subclasses set the flags and ``_solve``; ``plan`` times it and builds the report."""

    name: ClassVar[str]
    needs_curves: ClassVar[bool] = True
    needs_sensitivity: ClassVar[bool] = False
    needs_model_loss: ClassVar[bool] = False

    def plan(self, ctx: PlanContext) -> PlanReport:
        t0 = time.perf_counter()
        ranks, sens, search = self._solve(ctx)
        return PlanReport(self.name, ranks, time.perf_counter() - t0,
                          plan_summary(ctx.groups, ranks, ctx.total_params), sens, search)

    def _solve(self, ctx: PlanContext) -> tuple[Ranks, Sensitivity | None, dict | None]:
        raise NotImplementedError

    def _target(self, ctx: PlanContext) -> float:
        return removal_target(ctx.groups, ctx.total_params, ctx.reduction, self.name)

    def _curves(self, ctx: PlanContext) -> Mapping[str, torch.Tensor]:
        if ctx.curves is None or any(g.name not in ctx.curves for g in ctx.groups):
            raise LordError(f"plan {self.name!r} needs the error curve of every group (from decompose.factorize)")
        return ctx.curves


class Uniform(RankPlan):
    name = "uniform"
    needs_curves = False

    def _solve(self, ctx: PlanContext) -> tuple[Ranks, None, None]:
        if ctx.rank_reduction is not None:
            return uniform_rank_reduction(ctx.groups, ctx.rank_reduction), None, None
        target = self._target(ctx)
        ranks = parity_fraction_ranks(ctx.groups, target)
        if ranks is None:  # unreachable after removal_target's ceiling check
            raise LordError(f"{target:.3g} parameters cannot be removed from the targeted groups")
        return ranks, None, None


class Budget(RankPlan):
    name = "budget"

    def _solve(self, ctx: PlanContext) -> tuple[Ranks, None, None]:
        target = self._target(ctx)
        return equal_error_ranks(ctx.groups, target, self._curves(ctx)), None, None


class Spectrum(RankPlan):
    name = "spectrum"

    def _solve(self, ctx: PlanContext) -> tuple[Ranks, None, None]:
        target = self._target(ctx)
        return min_total_error_ranks(ctx.groups, target, self._curves(ctx)), None, None


class Auto(RankPlan):
    name = "auto"
    needs_sensitivity = True

    def _solve(self, ctx: PlanContext) -> tuple[Ranks, Sensitivity | None, None]:
        target = self._target(ctx)
        curves = self._curves(ctx)
        sens = None
        weights = ctx.weights
        if weights is None:
            sens = _measure(self.name, ctx)
            weights = sens.weights
        bad = [g.name for g in ctx.groups if not (g.name in weights and math.isfinite(weights[g.name])
                                                   and weights[g.name] > 0)]
        if bad:
            raise LordError(f"plan 'auto' needs a finite positive weight for every group; missing or bad for "
                            f"{bad[:3]} ({len(bad)} groups); compute them with lord.sensitivity.probe_sensitivities")
        weighted = {g.name: curves[g.name] * float(weights[g.name]) for g in ctx.groups}
        return min_total_error_ranks(ctx.groups, target, weighted), sens, None


class Search(RankPlan):
    name = "search"
    needs_sensitivity = True  # for its rival, the auto plan
    needs_model_loss = True

    def _solve(self, ctx: PlanContext) -> tuple[Ranks, Sensitivity | None, dict]:
        if ctx.model is None or ctx.facts is None or ctx.sensitivity_ids is None:
            raise LordError("plan 'search' measures the model's loss for each candidate plan: it needs the model, "
                            "its factorizations and sensitivity_ids; use lord.decompose_model")
        auto, sens, _ = Auto()._solve(ctx)
        weights = ctx.weights if ctx.weights is not None else sens.weights
        target = self._target(ctx)
        candidates = {"auto": auto, **least_sensitive_ranks(ctx.groups, weights, target)}
        # the auto plan's curves over the least sensitive half only: at -10% of the trimmed 0.5B over all 96
        # groups 8.682 held-out vs 8.822 for the uniform plan over that half (bench/results/lord_share.json)
        if len(least_sensitive(ctx.groups, weights, 0.5)) < len(ctx.groups):
            try:
                label, sub = auto_over_share(replace(ctx, weights=weights), 0.5)
            except LordError:  # the half cannot remove the target
                pass
            else:
                candidates[label] = sub
        ranks, found = search_plan(ctx.model, ctx.groups, ctx.facts, ctx.sensitivity_ids, target,
                                   candidates=candidates, progress=ctx.progress,
                                   validation_ids=ctx.validation_ids)
        return ranks, sens, found


PLANS: dict[str, type[RankPlan]] = {p.name: p for p in (Uniform, Budget, Spectrum, Auto, Search)}


def plan_fast_groups(strategy: RankPlan, ctx: PlanContext) -> PlanReport:
    """``strategy``'s plan with every group that would run slower than dense (lord/speed.py) left dense and the
    target re-planned over the rest, until no factored group is slow.

    Why: near their parity rank a group's two matmuls read about the bytes of one and cost a call more, so it
    saves parameters but not time. On the vocabulary-trimmed 0.5B at the default preset's 2.5% the uniform plan
    puts all 48 attention groups there; leaving them dense and cutting the MLPs a little deeper gave held-out
    ppl 8.403 vs 8.382 (bench/results/speed_plan.json) with no slow group left. Cutting deeper never makes
    a group slower, so each round only removes groups; the loop ends in at most ``len(groups)`` rounds."""
    t0 = time.perf_counter()
    active, sens = list(ctx.groups), None
    while True:
        try:
            report = strategy.plan(ctx if len(active) == len(ctx.groups) else replace(ctx, groups=active))
        except LordError as e:
            raise LordError(f"with the {len(ctx.groups) - len(active)} groups that would run slower than dense "
                            f"left dense: {e}; or set skip_slow=False to factor them anyway") from e
        sens = sens or report.sensitivity
        slow = {g.name for g in active if is_slow(g.m, g.n, report.ranks.get(g.name), len(g.members))}
        if not slow:
            break
        active = [g for g in active if g.name not in slow]
        if not active:
            raise LordError(f"every group would run slower than dense at plan {strategy.name!r}'s ranks; set "
                            "skip_slow=False to factor them anyway")
        if sens is not None and ctx.weights is None:  # measured once on all groups, reused by the next rounds
            ctx = replace(ctx, weights=weights_of(sens))
    ranks = {g.name: report.ranks.get(g.name) for g in ctx.groups}
    return replace(report, ranks=ranks, seconds=time.perf_counter() - t0, sensitivity=sens,
                   summary=plan_summary(ctx.groups, ranks, ctx.total_params))


def get_plan(name: str) -> RankPlan:
    """The plan called ``name``; LordError naming the known ones otherwise."""
    if name not in PLANS:
        raise LordError(f"unknown rank plan {name!r}; expected one of {tuple(PLANS)}")
    return PLANS[name]()


def auto_over_share(ctx: PlanContext, fraction: float) -> tuple[str, Ranks]:
    """The ``auto`` plan over the least sensitive ``fraction`` of ``ctx.groups`` (by ``ctx.weights``; the rest stay
    dense) and its label. Why: a small cut is cheaper in fewer groups cut deeper (lord_share.json); raises
    LordError when that share cannot remove the target."""
    share = least_sensitive(ctx.groups, ctx.weights, fraction)
    sub, _, _ = Auto()._solve(replace(ctx, groups=share))
    return (f"auto over least-sensitive {len(share)}/{len(ctx.groups)}",
            {g.name: sub.get(g.name) for g in ctx.groups})


def rank_plan(groups: list[Group], total_params: int, plan: str, reduction: float | None = None,
              curves: Mapping[str, torch.Tensor] | None = None, rank_reduction: float | None = None,
              weights: Mapping[str, float] | None = None, skip_slow: bool = False) -> Ranks:
    """The ranks of a plan decided from curves alone (sweeps, benches): ``weights`` for ``auto``, unit weights
    (= ``spectrum``) without them; ``search`` measures the model and is refused here. ``skip_slow``: groups that
    would run slower than dense stay dense (``plan_fast_groups``)."""
    strategy = get_plan(plan)
    if strategy.needs_model_loss:
        raise LordError(f"plan {plan!r} measures the model's loss for each candidate plan: use "
                        "lord.decompose_model (or lord.search.search_plan), not rank_plan")
    if strategy.needs_sensitivity and weights is None:
        weights = {g.name: 1.0 for g in groups}
    ctx = PlanContext(groups, total_params, reduction, rank_reduction, curves, weights)
    return (plan_fast_groups(strategy, ctx) if skip_slow else strategy.plan(ctx)).ranks


def _measure(plan: str, ctx: PlanContext) -> Sensitivity:
    """The sensitivity pass (Fisher or probes) on ``ctx.model``; the model is left as given."""
    if ctx.model is None or ctx.facts is None:
        raise LordError(f"plan {plan!r} weighs error curves by measured sensitivity: pass weights, or the model "
                        "and its factorizations with sensitivity_ids")
    if ctx.sensitivity_ids is None:
        raise LordError(f"plan {plan!r} measures the model on calibration tokens and needs "
                        "sensitivity_ids (calibration token ids [n_seqs, seq_len]); pass them, or use plan "
                        "'spectrum' (unweighted) or 'uniform'")
    if ctx.sensitivity == "fisher":
        return fisher_sensitivities(ctx.model, ctx.groups, ctx.facts, ctx.sensitivity_ids, progress=ctx.progress)
    return probe_sensitivities(ctx.model, ctx.groups, ctx.facts, ctx.sensitivity_ids, ctx.probe_fraction,
                               ctx.progress)
