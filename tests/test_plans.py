"""Rank plans as strategies (lord/plans.py): what each needs, the registry's errors, ranks unchanged from the
pre-strategy code, and a typed report with no magic keys among the groups."""

from __future__ import annotations

import pytest
import torch

import lord
from lord import LordError
from lord.plans import PLANS, PlanContext, PlanReport, get_plan, rank_plan

SHAPES = [(24, 16), (16, 24), (32, 8), (12, 12), (40, 20)]
WEIGHTS = (0.5, 2.0, 1.0, 4.0, 0.25)

# Computed with lord.ranks.rank_plan at main f34a9c7 (before plans were strategies) on _synthetic() at a 20%
# reduction; group order as SHAPES.
LEGACY = {
    "uniform": [5, 5, 3, 3, 8],
    "budget": [8, 8, 4, 5, 4],
    "spectrum": [6, None, 4, None, 3],
    "auto": [6, None, 4, None, 3],  # no weights: unit weights, = spectrum
    "auto_weighted": [6, None, None, None, 2],
    "uniform_rank_reduction_0.6": [6, 6, 3, 5, 8],
}


def _synthetic() -> tuple[list[lord.Group], dict[str, torch.Tensor], int]:
    """Hand-made groups with error curves from geometric spectra of different decay (non-increasing 1 -> 0)."""
    groups = [lord.Group(f"g{i}", (f"g{i}.w",), n, (m,)) for i, (m, n) in enumerate(SHAPES)]
    gen = torch.Generator().manual_seed(7)
    curves = {}
    for g in groups:
        k = torch.arange(min(g.m, g.n), dtype=torch.float64)
        cap = torch.exp(-k * (0.1 + 0.5 * torch.rand(1, generator=gen, dtype=torch.float64)))
        curves[g.name] = 1 - torch.cat([torch.zeros(1, dtype=torch.float64), cap.cumsum(0) / cap.sum()])
    return groups, curves, 2 * sum(g.m * g.n for g in groups)


def test_each_plan_declares_what_it_needs():
    flags = {name: (p.needs_curves, p.needs_sensitivity, p.needs_model_loss) for name, p in PLANS.items()}
    assert flags == {
        "uniform": (False, False, False),
        "budget": (True, False, False),
        "spectrum": (True, False, False),
        "auto": (True, True, False),
        "search": (True, True, True),
    }
    assert all(get_plan(name).name == name for name in PLANS)


def test_unknown_plan_is_refused_with_the_known_names():
    with pytest.raises(LordError, match=r"unknown rank plan 'nope'.*uniform.*search"):
        get_plan("nope")
    with pytest.raises(LordError, match="unknown rank plan"):
        rank_plan([], 1, "nope", 0.1)
    with pytest.raises(LordError, match=r"plan 'nope' is unknown.*'uniform'"):
        lord.DecomposeConfig(plan="nope")


def test_ranks_equal_the_pre_strategy_code():
    groups, curves, total = _synthetic()
    names = [g.name for g in groups]
    weights = dict(zip(names, WEIGHTS, strict=True))
    ctx = dict(groups=groups, total_params=total, reduction=0.2, curves=curves)
    for plan in ("uniform", "budget", "spectrum"):
        report = get_plan(plan).plan(PlanContext(**ctx))
        assert [report.ranks[n] for n in names] == LEGACY[plan], plan
        assert rank_plan(groups, total, plan, 0.2, curves) == report.ranks
    auto = get_plan("auto").plan(PlanContext(**ctx, weights=weights))
    assert [auto.ranks[n] for n in names] == LEGACY["auto_weighted"]
    assert rank_plan(groups, total, "auto", 0.2, curves, weights=weights) == auto.ranks
    assert [rank_plan(groups, total, "auto", 0.2, curves)[n] for n in names] == LEGACY["auto"]
    rr = get_plan("uniform").plan(PlanContext(groups, total, rank_reduction=0.6))
    assert [rr.ranks[n] for n in names] == LEGACY["uniform_rank_reduction_0.6"]


def test_report_is_typed_and_holds_groups_only():
    groups, curves, total = _synthetic()
    report = get_plan("budget").plan(PlanContext(groups, total, 0.2, curves=curves))
    assert isinstance(report, PlanReport) and report.plan == "budget"
    assert set(report.ranks) == {g.name for g in groups}
    assert report.summary == lord.plan_summary(groups, report.ranks, total)
    assert report.summary["param_reduction"] >= 0.2 and report.seconds >= 0
    assert report.sensitivity is None and report.search is None
    assert report.metrics() == {} and report.to_json() is None  # no sensitivity.json for curve-only plans


def test_plans_check_their_inputs():
    groups, curves, total = _synthetic()
    with pytest.raises(LordError, match="error curve"):
        get_plan("spectrum").plan(PlanContext(groups, total, 0.2))
    with pytest.raises(LordError, match="removable"):
        get_plan("uniform").plan(PlanContext(groups, total, 0.95))
    with pytest.raises(LordError, match="sensitivity"):  # auto without weights and without a model to measure
        get_plan("auto").plan(PlanContext(groups, total, 0.2, curves=curves))
    with pytest.raises(LordError, match="decompose_model"):
        get_plan("search").plan(PlanContext(groups, total, 0.2, curves=curves))
    with pytest.raises(LordError, match="decompose_model"):
        rank_plan(groups, total, "search", 0.2, curves)


def _model_ctx(model, ids, **kw) -> PlanContext:
    groups = lord.find_groups(model)
    stats = lord.collect_stats(model, groups, ids, progress=False)
    facts = lord.factorize_groups(model, groups, stats, ("lord",), progress=False)["lord"]
    return PlanContext(groups, lord.count_params(model), 0.1, curves={k: f.error_curve() for k, f in facts.items()},
                       model=model, facts=facts, progress=False, **kw)


def test_auto_measures_sensitivity_and_reports_it_apart_from_the_groups(tiny_llama, calib_ids):
    with pytest.raises(LordError, match="sensitivity_ids"):
        get_plan("auto").plan(_model_ctx(tiny_llama, calib_ids))
    ctx = _model_ctx(tiny_llama, calib_ids, sensitivity_ids=calib_ids[:4])
    report = get_plan("auto").plan(ctx)
    sens = report.sensitivity
    assert sens is not None and sens.meta["method"] == "fisher"
    assert set(sens.groups) == set(report.ranks) == {g.name for g in ctx.groups}  # no _meta among the groups
    # the same ranks as the curves-only path given the measured weights
    assert rank_plan(ctx.groups, ctx.total_params, "auto", 0.1, ctx.curves, weights=sens.weights) == report.ranks
    assert report.metrics() == {"sensitivity_seconds": sens.seconds}
    on_disk = report.to_json(timings=False)  # sensitivity.json: the layout checkpoints have always had
    assert set(on_disk) == {"_meta", *sens.groups} and "seconds" not in on_disk["_meta"]
    assert report.to_json()["_meta"]["seconds"] == sens.seconds


def test_search_reports_its_choice_in_typed_fields(tiny_llama, calib_ids):
    ctx = _model_ctx(tiny_llama, calib_ids, sensitivity_ids=calib_ids[:4], validation_ids=calib_ids[4:])
    report = get_plan("search").plan(ctx)
    assert set(report.ranks) == {g.name for g in ctx.groups}
    tried = {"uniform", "types"} | {h["candidate"] for h in report.search["history"] if "candidate" in h}
    assert report.search["chosen"] in tried and report.sensitivity is not None
    assert report.search["validation_loss"][report.search["chosen"]] == min(report.search["validation_loss"].values())
    assert set(report.metrics()) == {"sensitivity_seconds", "search_seconds", "search_evaluations", "search_loss",
                                     "search_loss_uniform", "search_chosen"}
    assert report.to_json()["_search"] == report.search
