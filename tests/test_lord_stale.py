"""Stale calibration statistics (collected on other weights of the same architecture) are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import lord
from sources import resolve_model_dir


def _save(model: torch.nn.Module, path):
    tok = AutoTokenizer.from_pretrained(resolve_model_dir("tinycoder-random"))
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_stats_from_other_weights_are_refused(tmp_path, tiny_llama):
    a = _save(tiny_llama, tmp_path / "a")
    with torch.no_grad():
        tiny_llama.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # same architecture, other weights
    b = _save(tiny_llama, tmp_path / "b")
    lord.collect_stats_to_file(a, tmp_path / "stats", lord.CalibConfig(n_seqs=2, seq_len=16))
    cfg = lord.DecomposeConfig(method="lord", plan="uniform", reduction=0.01)
    with pytest.raises(lord.LordError, match="stale.*fingerprint"):
        lord.decompose_to_dir(b, tmp_path / "stats", cfg, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    lord.decompose_to_dir(a, tmp_path / "stats", cfg, tmp_path / "ckpt")  # the matching model is accepted
    assert (tmp_path / "ckpt" / "MANIFEST.json").is_file()
