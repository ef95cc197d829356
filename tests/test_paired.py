"""Paired HumanEval comparison (evaluation.paired): McNemar's exact test against scipy's binomial test, and the
per-problem bookkeeping from results rows and output dirs."""

from __future__ import annotations

import json

import pytest
from scipy.stats import binomtest

from evaluation.errors import EvalError
from evaluation.paired import compare_passes, load_passes, mcnemar_exact, passed_by_task


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
    dense = passed_by_task(_rows({"a": "passed", "b": "passed", "c": "failed", "d": "passed", "e": "failed"}))
    small = passed_by_task(_rows({"a": "passed", "b": "timeout", "c": "passed", "d": "failed"}))  # no "e"
    c = compare_passes(dense, small)
    assert c["n_problems"] == 4 and c["n_passed_reference"] == 3 and c["n_passed"] == 2
    assert c["gained"] == ["c"] and c["lost"] == ["b", "d"]
    assert c["p_value"] == pytest.approx(1.0)  # 1 vs 2 of 3 discordant: 2 * 4/8 capped at 1


def test_several_samples_or_no_overlap_are_not_paired(tmp_path):
    multi = [{"task_id": "a", "sample": i, "status": "passed"} for i in range(2)]
    assert passed_by_task(multi) is None
    with pytest.raises(EvalError, match="share no HumanEval problem"):
        compare_passes({"a": True}, {"b": False})


def test_load_passes_reads_an_eval_dir(tmp_path):
    he = tmp_path / "eval" / "humaneval"
    he.mkdir(parents=True)
    (he / "results.jsonl").write_text("\n".join(json.dumps(r) for r in _rows({"x": "passed", "y": "error"})) + "\n")
    assert load_passes(tmp_path / "eval") == {"x": True, "y": False}
    assert load_passes(he) == {"x": True, "y": False}
    assert load_passes(tmp_path / "missing") is None
