"""Error-compensating factors (lord/regression.py) on tiny tensors: the moments give the direct errors, every
candidate is exact at full rank on clean inputs, the ridge refit tends to least squares, and the selection is
never worse than the one-shot (parallel) factors on the held-out split."""

from __future__ import annotations

import pytest
import torch

from lord.errors import LordError
from lord.regression import PairMoments, candidate_names, compensate, dense_target_error, fit_candidate


def _pair(n_tokens: int, d: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    t = torch.randn(n_tokens, d, generator=g, dtype=torch.float64) @ mix.T
    # compressed inputs: the dense ones through a slightly wrong map, plus noise (an upstream cut's error)
    drift = torch.eye(d, dtype=torch.float64) + 0.1 * torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    return t, t @ drift.T + noise * t.std() * torch.randn(n_tokens, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shape", [(12, 20), (30, 10)])  # wide and tall groups
def test_moment_error_matches_direct_error(shape):
    m, d = shape
    t, t_c = _pair(200, d, 0.1)
    w = torch.randn(m, d, dtype=torch.float64)
    mom = PairMoments.of(t, t_c)
    for name in candidate_names():
        up, down = fit_candidate(w, mom, 4, name)
        direct = ((t @ w.T - t_c @ (up @ down).T) ** 2).sum() / ((t @ w.T) ** 2).sum()
        assert dense_target_error(w, mom, up, down) == pytest.approx(float(direct), rel=1e-4, abs=1e-6), name


@pytest.mark.parametrize("shape", [(12, 20), (30, 10)])
def test_exact_at_full_rank_when_inputs_are_clean(shape):
    m, d = shape
    t, _ = _pair(200, d, 0.0)
    w = torch.randn(m, d, dtype=torch.float64)
    mom = PairMoments.of(t, t)
    for name in candidate_names():
        up, down = fit_candidate(w, mom, min(m, d), name)
        assert torch.allclose(up @ down, w, atol=1e-6), name


def test_small_ridge_tends_to_least_squares_and_beats_projection_at_full_rank():
    t, t_c = _pair(400, 10, 0.2)
    w = torch.randn(6, 10, dtype=torch.float64)
    mom = PairMoments.of(t, t_c)
    lstsq = torch.linalg.lstsq(t_c, t @ w.T).solution.T  # min ||T w^T - T' A^T||, unconstrained
    up, down = fit_candidate(w, mom, 6, "ridge-1e-09")
    assert torch.allclose(up @ down, lstsq, atol=1e-5)
    assert dense_target_error(w, mom, up, down) < dense_target_error(w, mom, *fit_candidate(w, mom, 6, "stats"))


def test_selection_never_worse_than_parallel_on_the_held_out_split():
    t, t_c = _pair(600, 16, 0.3)
    w = torch.randn(24, 16, dtype=torch.float64)
    fit, val = PairMoments.of(t[:400], t_c[:400]), PairMoments.of(t[400:], t_c[400:])
    comp = compensate(w, fit, val, rank=5)
    assert comp.val_error[comp.chosen] <= comp.val_error["parallel"]
    assert comp.val_error[comp.chosen] < comp.val_error["stats"]  # a real upstream error: compensation helps
    assert comp.up.shape == (24, 5) and comp.down.shape == (5, 16)
    only = compensate(w, fit, val, rank=5, allowed=("stats",))
    assert only.chosen == "stats" and set(only.val_error) == {"stats"}


def test_bad_inputs_are_named():
    w = torch.randn(4, 6)
    mom = PairMoments.of(torch.randn(20, 6), torch.randn(20, 6))
    with pytest.raises(LordError, match="rank 9"):
        fit_candidate(w, mom, 9, "stats")
    with pytest.raises(LordError, match="candidate"):
        fit_candidate(w, mom, 2, "magic")
    with pytest.raises(LordError, match="one shape"):
        PairMoments.of(torch.randn(20, 6), torch.randn(20, 5))
