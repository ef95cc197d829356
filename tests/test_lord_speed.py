"""Rank rounding for matmul-friendly shapes and the time model that flags groups saving no time."""

from __future__ import annotations

import pytest

import lord
from lord import LordError
from lord.plans import rank_plan
from lord.ranks import max_factored_rank, params_removed, round_down_ranks
from lord.speed import is_slow, modelled_time_ratio
from lord.surgery import Group


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


def _qwen05b_groups(layers: int = 2) -> list[Group]:
    """Groups with the real 0.5B's shapes (no weights needed: the uniform plan is pure rank arithmetic)."""
    out = []
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [Group(f"{p}.qkv", (f"{p}.q", f"{p}.k", f"{p}.v"), 896, (896, 128, 128), i, "qkv"),
                Group(f"{p}.o", (f"{p}.o",), 896, (896,), i, "o"),
                Group(f"{p}.gate_up", (f"{p}.gate", f"{p}.up"), 896, (4864, 4864), i, "gate_up"),
                Group(f"{p}.down", (f"{p}.down",), 4864, (896,), i, "down")]
    return out


def _slow(groups: list[Group], ranks: dict) -> set[str]:
    return {g.name for g in groups if is_slow(g.m, g.n, ranks[g.name], len(g.members))}


def test_skip_slow_leaves_near_parity_groups_dense_and_still_meets_the_target():
    groups = _qwen05b_groups()
    total = sum(g.m * g.n for g in groups) + 5440 * 896  # linears 86% of the total, as in the trimmed 0.5B
    target = 0.025 * total
    plain = rank_plan(groups, total, "uniform", reduction=0.025)
    slow = _slow(groups, plain)
    assert slow == {g.name for g in groups if g.kind in ("qkv", "o")}  # the preset point's measured pattern
    fast = rank_plan(groups, total, "uniform", reduction=0.025, skip_slow=True)
    assert not _slow(groups, fast)
    assert all(fast[name] is None for name in slow)
    assert sum(params_removed(g.m, g.n, fast[g.name]) for g in groups) >= target
    # the freed share goes to the groups that can pay: each is cut at least as deep as before
    assert all(fast[g.name] <= plain[g.name] for g in groups if g.name not in slow)
    # at a deep cut nothing is near parity: the option changes nothing
    assert rank_plan(groups, total, "uniform", reduction=0.2, skip_slow=True) == \
        rank_plan(groups, total, "uniform", reduction=0.2)


def test_skip_slow_on_groups_too_small_to_ever_pay_is_a_clear_error(tiny_qwen2, calib_ids):
    groups = lord.find_groups(tiny_qwen2)  # one matmul call costs more than any of these groups' weights
    total = sum(p.numel() for p in tiny_qwen2.parameters())
    with pytest.raises(LordError, match="slower than dense.*skip_slow=False"):
        rank_plan(groups, total, "uniform", reduction=0.05, skip_slow=True)
    stats = lord.collect_stats(tiny_qwen2, groups, calib_ids, progress=False)
    cfg = lord.DecomposeConfig(plan="uniform", reduction=0.05, skip_slow=True)
    with pytest.raises(LordError, match="slower than dense"):  # before any module is swapped
        lord.decompose_model(tiny_qwen2, stats, cfg, progress=False)
    assert not lord.factored_modules(tiny_qwen2)
    with pytest.raises(LordError, match="skip_slow must be"):
        lord.DecomposeConfig(skip_slow="yes")
