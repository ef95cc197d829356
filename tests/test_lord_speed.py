"""Rank rounding for matmul-friendly shapes and the time model that flags groups saving no time."""

from __future__ import annotations

import pytest

import lord
from lord import LordError
from lord.plans import rank_plan
from lord.ranks import max_factored_rank, params_removed, round_down_ranks
from lord.speed import is_slow, modelled_time_ratio


def test_round_down_keeps_parity_and_removes_at_least_as_much(tiny_qwen2):
    groups = lord.find_groups(tiny_qwen2)
    total = sum(p.numel() for p in tiny_qwen2.parameters())
    ranks = rank_plan(groups, total, "uniform", reduction=0.1)
    rounded = round_down_ranks(groups, ranks, 16)
    for g in groups:
        r, q = ranks[g.name], rounded[g.name]
        assert (r is None) == (q is None)
        if r is None:
            continue
        assert q <= r <= max_factored_rank(g.m, g.n)
        assert q == r if r < 16 else (q % 16 == 0 and r - q < 16)
        assert params_removed(g.m, g.n, q) >= params_removed(g.m, g.n, r)
    assert any(rounded[g.name] != ranks[g.name] for g in groups)
    assert round_down_ranks(groups, ranks, 1) == ranks
    with pytest.raises(LordError, match="rank_multiple"):
        round_down_ranks(groups, ranks, 0)


def test_time_model_flags_groups_just_below_parity():
    m, n = 9728, 896  # the 0.5B's gate_up group (2 members)
    assert modelled_time_ratio(m, n, None, 2) == 1.0 and not is_slow(m, n, None, 2)
    near = max_factored_rank(m, n)  # saves a few thousand parameters, costs one more matmul call
    assert modelled_time_ratio(m, n, near, 2) > 1.0 and is_slow(m, n, near, 2)
    half = near // 2
    assert modelled_time_ratio(m, n, half, 2) == pytest.approx(
        (half * (m + n) + 3 * 32_768) / (m * n + 2 * 32_768))
    assert not is_slow(m, n, half, 2)


def test_rank_map_reports_the_flag(tiny_qwen2, calib_ids):
    groups = lord.find_groups(tiny_qwen2)
    stats = lord.collect_stats(tiny_qwen2, groups, calib_ids, progress=False)
    facts = lord.factorize_groups(tiny_qwen2, groups, stats, ("lord",), progress=False)["lord"]
    total = sum(p.numel() for p in tiny_qwen2.parameters())
    ranks = {g.name: max_factored_rank(g.m, g.n) for g in groups}  # tiny groups: one call costs more than this saves
    report = lord.apply_ranks(tiny_qwen2, groups, facts, ranks, total)
    assert all(v["slow"] and v["modelled_time_ratio"] > 1 for v in report.groups.values())
    assert report.metrics["n_groups_slow"] == len(groups)
