"""Model-level LoRD: factor every targeted group from its statistics under a rank plan, in place.

Split so a sweep reuses the expensive part: ``factorize_groups`` (one eigenproblem per group and method)
once, then ``apply_ranks`` on a fresh copy of the dense model for each plan.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from lord.config import DecomposeConfig
from lord.decompose import Factorization, factorize
from lord.errors import LordError
from lord.plans import PlanContext, PlanReport, get_plan, plan_fast_groups
from lord.ranks import plan_summary
from lord.sequential import sequential_decompose
from lord.speed import is_slow, modelled_time_ratio
from lord.stats import GroupStats
from lord.surgery import Group, factor_group, find_groups, stacked_weight


@dataclass
class DecomposeReport:
    groups: dict  # group -> {"members", "rank" (None = dense), "m", "n", "rel_output_error", "rank_reduction"}
    metrics: dict
    plan: PlanReport | None = None  # decompose_model: the rank plan's report (sensitivity, search details)


def count_params(model: nn.Module) -> int:
    """All parameters, tied tensors counted once."""
    return sum(p.numel() for p in model.parameters())


def factorize_groups(model: nn.Module, groups: list[Group], stats: Mapping[str, GroupStats],
                     methods: tuple[str, ...], damping: float = 0.01,
                     progress: bool = True) -> dict[str, dict[str, Factorization]]:
    """``{method: {group: Factorization}}`` for every group, sharing each group's work across methods."""
    out: dict[str, dict[str, Factorization]] = {m: {} for m in methods}
    for g in tqdm(groups, desc="factorize", disable=not progress):
        if g.name not in stats:
            raise LordError(f"no statistics for group {g.name}; collect them with the same targets")
        w, _ = stacked_weight(model, g)
        s = stats[g.name]
        for method, f in factorize(w, s.gram, methods, damping, s.side, s.input_trace).items():
            out[method][g.name] = f
    return out


def linear_params(model: nn.Module) -> int:
    """Parameters of every factorable linear group of the (dense) model, ``sum m n``: the denominator of
    ``linear_param_reduction``."""
    return sum(g.m * g.n for g in find_groups(model))


def apply_ranks(model: nn.Module, groups: list[Group], facts: Mapping[str, Factorization],
                ranks: Mapping[str, int | None], total_params: int,
                linear_total: int | None = None, swap: bool = True) -> DecomposeReport:
    """Swap every group with a rank for LowRankLinear (in place) and report errors and reductions.

    ``linear_total``: all factorable linear parameters (``linear_params`` of the dense model; default: the
    targeted groups'). ``swap=False``: the groups are already factored (sequential calibration); only report
    (``rel_output_error`` is then the one-shot factors' error on the dense statistics)."""
    report = {}
    for g in groups:
        r = ranks.get(g.name)
        f = facts[g.name]
        err = float(f.error_curve()[r]) if r is not None else 0.0
        if r is not None and swap:
            w, _ = stacked_weight(model, g)
            up, down = f.factors(w, r)
            factor_group(model, g, up, down)
        report[g.name] = {
            "members": list(g.members), "rank": r, "m": g.m, "n": g.n,
            "rel_output_error": err ** 0.5,
            "rank_reduction": (1 - r / min(g.m, g.n)) if r is not None else 0.0,
            "modelled_time_ratio": round(modelled_time_ratio(g.m, g.n, r, len(g.members)), 4),
            "slow": is_slow(g.m, g.n, r, len(g.members)),  # saves parameters, not time (lord/speed.py)
        }
    metrics = plan_summary(groups, ranks, total_params, linear_total)
    errs = [v["rel_output_error"] for v in report.values() if v["rank"] is not None]
    metrics["rel_output_error_mean"] = sum(errs) / len(errs) if errs else 0.0
    metrics["n_groups_slow"] = sum(v["slow"] for v in report.values())
    metrics["params_total_dense"] = total_params
    metrics["params_total_factored"] = count_params(model)
    return DecomposeReport(report, metrics)


def decompose_model(model: nn.Module, stats: Mapping[str, GroupStats], cfg: DecomposeConfig,
                    progress: bool = True, sensitivity_ids: torch.Tensor | None = None,
                    validation_ids: torch.Tensor | None = None,
                    calibration_ids: torch.Tensor | None = None) -> DecomposeReport:
    """Factor ``model`` in place: statistics -> per-group factorization -> rank plan -> module swap.

    Plans ``auto`` and ``search`` also need ``sensitivity_ids`` ([n_seqs, seq_len] calibration tokens) for their
    sensitivity pass and loss evaluations (``search``: optionally ``validation_ids``, lord/plans.py);
    ``calibration="sequential"`` needs ``calibration_ids`` (the tokens of ``stats``) for its layer-by-layer walk.
    """
    if cfg.calibration == "sequential" and calibration_ids is None:
        raise LordError("calibration 'sequential' walks the model on calibration tokens: pass calibration_ids "
                        "(the [n_seqs, seq_len] ids the statistics were collected on), or use 'parallel'")
    t0 = time.perf_counter()
    groups = find_groups(model, cfg.targets, cfg.ignore)
    total = count_params(model)
    linear_total = linear_params(model)
    facts = factorize_groups(model, groups, stats, (cfg.method,), cfg.damping, progress)[cfg.method]
    curves = {name: f.error_curve() for name, f in facts.items()}
    ctx = PlanContext(groups, total, cfg.reduction, cfg.rank_reduction, curves, model=model, facts=facts,
                      sensitivity_ids=sensitivity_ids, validation_ids=validation_ids, sensitivity=cfg.sensitivity,
                      probe_fraction=cfg.probe_fraction, progress=progress)
    strategy = get_plan(cfg.plan)
    planned = plan_fast_groups(strategy, ctx) if cfg.skip_slow else strategy.plan(ctx)
    ranks = planned.ranks
    seq = None
    if cfg.calibration == "sequential":
        seq = sequential_decompose(model, groups, ranks, calibration_ids, cfg.sequential_mode, progress=progress)
    report = apply_ranks(model, groups, facts, ranks, total, linear_total, swap=seq is None)
    report.metrics["calibration"] = cfg.calibration
    if seq is not None:
        for name, info in seq.groups.items():
            report.groups[name]["sequential"] = info
        report.metrics.update(sequential_mode=cfg.sequential_mode, sequential_seconds=seq.seconds,
                              sequential_chosen=seq.chosen_counts())
    report.plan = planned
    report.metrics["decompose_seconds"] = time.perf_counter() - t0
    report.metrics.update(planned.metrics())
    return report
