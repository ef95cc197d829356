"""LoRD on the real fast model (smollm2-135m): optimality against both baselines on every group, and the
stage entry points end to end (stats file -> checkpoint dir -> both loaders agree)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

import lord
from sources import load_model

MODEL = os.environ.get("LORD_REAL_MODEL", "smollm2-135m")  # e.g. tinycoder-random for a quick dry run
REDUCTION = float(os.environ.get("LORD_REAL_REDUCTION", "0.05"))  # tinycoder-random: 0.002 (32k-vocab embedding)


@pytest.fixture(scope="module")
def stats_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("stats")
    metrics = lord.collect_stats_to_file(MODEL, out, lord.CalibConfig(n_seqs=8, seq_len=128))
    assert metrics["n_tokens"] == 8 * 128 and len(metrics["calibration_hash"]) == 64
    return out / "stats.safetensors"


@pytest.mark.slow
def test_lord_error_never_above_svd_or_whitening_on_any_group(stats_path):
    model, _ = load_model(MODEL)
    groups = lord.find_groups(model)
    stats, meta = lord.load_stats(stats_path)
    assert meta["model"] == MODEL and len(stats) == len(groups) == 4 * model.config.num_hidden_layers
    facts = lord.factorize_groups(model, groups, stats, lord.METHODS, progress=False)
    for g in groups:
        ours = facts["lord"][g.name].error_curve()
        for other in ("svd", "whiten"):
            theirs = facts[other][g.name].error_curve()
            assert bool((ours <= theirs + 1e-5).all()), (g.name, other)
        half = lord.max_factored_rank(g.m, g.n) // 2
        assert float(ours[half]) < float(facts["svd"][g.name].error_curve()[half]), g.name


@pytest.mark.slow
def test_decompose_to_dir_loads_back_equal_in_both_loaders(stats_path, tmp_path):
    cfg = lord.DecomposeConfig(method="lord", plan="auto", reduction=REDUCTION)
    metrics = lord.decompose_to_dir(MODEL, stats_path, cfg, tmp_path / "ckpt")
    assert REDUCTION <= metrics["param_reduction"] < REDUCTION + 0.01 and metrics["n_groups_factored"] > 0
    assert json.loads((tmp_path / "ckpt" / "lord_artifact.json").read_text())["kind"] == "lord"
    ours, tok = load_model(tmp_path / "ckpt")  # sources dispatches to lord.checkpoint:load_factored
    assert lord.factored_modules(ours) and tok is not None
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", trust_remote_code=True).eval()
    ids = tok("def fibonacci(n):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, hf(ids).logits)
    assert lord.count_params(ours) == metrics["params_total_factored"]
