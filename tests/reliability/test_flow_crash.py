"""Crash safety of the whole flow: SIGKILL a run while each stage is writing its artifact, rerun, and get
the same final metrics as an uninterrupted run, reusing every stage that had finished (issue 8, item 3).
A half-written artifact is never mistaken for a finished one (item 2)."""

from __future__ import annotations

import signal

import pytest
from _flowkit import tiny_params

from artifacts import is_complete
from flows.faults import KILL_ENV

ORDER = ["evaluate[dense]", "calibrate", "decompose", "evaluate[lord]", "quantize4", "evaluate[lord+gptq4]"]
# kill point (stage whose artifact is being written) -> stages finished before it, which must be reused
KILL_POINTS = {"calibrate": ["evaluate[dense]"], "decompose": ["evaluate[dense]", "calibrate"],
               "quantize": ["evaluate[dense]", "calibrate", "decompose", "evaluate[lord]"]}


@pytest.fixture(scope="module")
def reference(prefect_api, store, tmp_path_factory):
    from flows.pipeline import lord_pipeline

    return lord_pipeline(**tiny_params(tmp_path_factory.mktemp("ref")))


def test_sigkill_mid_write_then_rerun_matches_uninterrupted(reference, spawn_flow, tmp_path):
    """One child per kill point, all at once (they share nothing but the read-only model cache), then each
    runs dir is resumed in-process and compared with the uninterrupted reference."""
    from flows.pipeline import lord_pipeline

    procs = {stage: spawn_flow(tiny_params(tmp_path / stage), **{KILL_ENV: stage}) for stage in KILL_POINTS}
    for stage, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == -signal.SIGKILL, f"{stage}: {err[-2000:]}"
    for stage in KILL_POINTS:
        runs = tmp_path / stage
        # the killed stage left at most a hidden temp dir; every visible artifact dir is complete and verified
        visible = [d for d in runs.glob("*/*") if not d.name.startswith(".") and not d.parent.name.startswith(".")]
        assert visible and all(is_complete(d) for d in visible)
        assert not list((runs / stage).glob("[!.]*")), f"{stage} artifact published despite the kill"

        resumed = lord_pipeline(**tiny_params(runs))
        assert [s["label"] for s in resumed["stages"]] == ORDER
        reused = {s["label"] for s in resumed["stages"] if s["cached"] or s["reused"]}
        assert reused == set(KILL_POINTS[stage]), stage  # finished work reused; killed stage onward recomputed
        assert not list(runs.glob(f"{stage}/.*.tmp-*")), "stale temp dir of the killed writer left behind"
        for got, want in zip(resumed["rows"], reference["rows"], strict=True):
            assert got["variant"] == want["variant"]
            assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-6)
            assert got["n_params"] == want["n_params"] and got["size_mb"] == want["size_mb"]
