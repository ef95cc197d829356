"""Paired HumanEval comparison (evaluation.paired): McNemar's exact test against scipy's binomial test, and the
per-problem bookkeeping from results rows and output dirs."""

from __future__ import annotations

import json

import pytest
from scipy.stats import binomtest

from evaluation.errors import EvalError
from evaluation.paired import (
    compare_outcomes,
    compare_passes,
    load_outcomes,
    mcnemar_exact,
    pass_rates_by_task,
)


@pytest.mark.parametrize(("gained", "lost"), [(0, 0), (0, 1), (4, 9), (9, 4), (0, 7), (3, 3), (20, 41)])
def test_mcnemar_matches_binomial_test(gained, lost):
    expected = 1.0 if gained + lost == 0 else binomtest(min(gained, lost), gained + lost, 0.5).pvalue
    assert mcnemar_exact(gained, lost) == pytest.approx(expected, rel=1e-9)


def test_mcnemar_refuses_negative_counts():
    with pytest.raises(EvalError, match="counts must be >= 0"):
        mcnemar_exact(-1, 3)


def _rows(outcomes: dict[str, str]) -> list[dict[str, object]]:
    return [{"task_id": t, "sample": 0, "status": s} for t, s in outcomes.items()]


def test_compare_passes_counts_discordant_problems_on_common_ids():
    dense = {"a": True, "b": True, "c": False, "d": True, "e": False}
    small = {"a": True, "b": False, "c": True, "d": False}  # no "e"
    c = compare_passes(dense, small)
    assert c["n_problems"] == 4 and c["n_passed_reference"] == 3 and c["n_passed"] == 2
    assert c["gained"] == ["c"] and c["lost"] == ["b", "d"]
    assert c["p_value"] == pytest.approx(1.0)  # 1 vs 2 of 3 discordant: 2 * 4/8 capped at 1


def test_no_common_problem_is_an_error():
    with pytest.raises(EvalError, match="share no HumanEval problem"):
        compare_passes({"a": True}, {"b": False})
    assert pass_rates_by_task(_rows({"a": "timeout"})) == {"a": 0.0}


def test_load_outcomes_reads_an_eval_dir_and_picks_the_test(tmp_path):
    he = tmp_path / "eval" / "humaneval"
    he.mkdir(parents=True)
    (he / "results.jsonl").write_text("\n".join(json.dumps(r) for r in _rows({"x": "passed", "y": "error"})) + "\n")
    assert load_outcomes(tmp_path / "eval") == {"x": 1.0, "y": 0.0}
    assert load_outcomes(he) == {"x": 1.0, "y": 0.0}
    assert load_outcomes(tmp_path / "missing") is None
    greedy = compare_outcomes({"x": 1.0, "y": 0.0}, {"x": 0.0, "y": 0.0})
    assert greedy["test"] == "mcnemar" and greedy["lost"] == ["x"] and greedy["n_worse"] == 1
    assert greedy["pass_at_1"] == 0.0 and greedy["pass_at_1_reference"] == 0.5
    sampled = compare_outcomes({"x": 1.0, "y": 0.0}, {"x": 0.5, "y": 0.0})
    assert sampled["test"] == "sign-flip" and sampled["n_worse"] == 1 and sampled["pass_at_1"] == 0.25


def test_sign_flip_is_mcnemar_on_one_sample_and_exact_when_small():
    from evaluation.paired import sign_flip_p

    # one sample a problem: differences are +-1, and the exact sign-flip test is McNemar's
    for gained, lost in [(1, 4), (4, 9), (0, 7), (3, 3)]:
        assert sign_flip_p([1.0] * gained + [-1.0] * lost + [0.0] * 20) == pytest.approx(mcnemar_exact(gained, lost))
    assert sign_flip_p([0.0, 0.0]) == 1.0
    # many differences: the seeded Monte Carlo agrees with the normal approximation of the sign-flip null
    import math

    diffs = [0.25] * 30 + [-0.25] * 14 + [0.5] * 3
    z = abs(sum(diffs)) / math.sqrt(sum(x * x for x in diffs))
    normal = math.erfc(z / math.sqrt(2))
    assert sign_flip_p(diffs) == pytest.approx(normal, abs=0.01)


def test_compare_rates_from_several_samples():
    from evaluation.paired import compare_rates

    def rows(rates):
        return [{"task_id": t, "sample": i, "status": "passed" if i < k else "failed"}
                for t, k in rates.items() for i in range(4)]

    ref = pass_rates_by_task(rows({"a": 4, "b": 2, "c": 0, "d": 1}))
    new = pass_rates_by_task(rows({"a": 3, "b": 2, "c": 1, "d": 0}))
    assert ref == {"a": 1.0, "b": 0.5, "c": 0.0, "d": 0.25}
    c = compare_rates(ref, new)
    assert c["pass_at_1_reference"] == pytest.approx(1.75 / 4) and c["pass_at_1"] == pytest.approx(1.5 / 4)
    assert c["n_better"] == 1 and c["n_worse"] == 2
    assert c["p_value"] == 1.0  # diffs -1/4, 1/4, -1/4: every one of the 8 sign patterns has |sum| >= 1/4
    worse = compare_rates(ref, pass_rates_by_task(rows({"a": 2, "b": 1, "c": 0, "d": 1})))
    assert worse["n_worse"] == 2 and worse["p_value"] == 0.5  # diffs -1/2, -1/4: |sum| >= 3/4 in 2 of 4 patterns
