"""HumanEval sizing in the presets: >= 40 problems for dense and the final variant by default, all 164 for them
in ``full`` with the variants in between on a smaller set."""

from __future__ import annotations

import pytest

from flows.errors import FlowError
from flows.presets import PipelineSpec, resolve_spec


def test_default_preset_runs_humaneval_on_at_least_40_problems_where_it_counts() -> None:
    from flows.pipeline import _stage_configs

    cfgs = _stage_configs(resolve_spec("default"))
    assert cfgs["evaluate"]["humaneval_problems"] >= 40  # dense and the final variant
    assert cfgs["evaluate_intermediate"]["humaneval_problems"] == 0  # perplexity only in between


def test_full_preset_gives_164_to_the_ends_and_40_in_between() -> None:
    from flows.pipeline import _stage_configs

    cfgs = _stage_configs(resolve_spec("full"))
    assert cfgs["evaluate"]["humaneval_problems"] == 164
    assert cfgs["evaluate_intermediate"]["humaneval_problems"] == 40
    assert {k: v for k, v in cfgs["evaluate"].items() if k != "humaneval_problems"} == \
        {k: v for k, v in cfgs["evaluate_intermediate"].items() if k != "humaneval_problems"}
    assert "evaluate_intermediate" not in _stage_configs(resolve_spec("smoke"))


def test_bad_intermediate_size_is_refused() -> None:
    with pytest.raises(FlowError, match="humaneval_intermediate"):
        PipelineSpec(model="m", enabled=("evaluate",), bits=(4,), humaneval_intermediate=200)
