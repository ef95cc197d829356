"""The evaluation stage on a saved model dir: metrics written atomically, config validated."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from evaluation import EvalConfig, EvalError, evaluate_to_dir
from sources import resolve_model_dir


def _save_tiny(tmp_path, model):
    tok = AutoTokenizer.from_pretrained(resolve_model_dir("tinycoder-random"))
    model.resize_token_embeddings(len(tok))
    d = tmp_path / "model"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_ppl_only_evaluation_writes_metrics(tmp_path, tiny_llama):
    d = _save_tiny(tmp_path, tiny_llama)
    cfg = EvalConfig(seq_len=32, n_windows=4, batch_size=2)
    m = evaluate_to_dir(str(d), cfg, tmp_path / "eval")
    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["ppl"] == pytest.approx(m["ppl"]) and m["ppl"] > 1
    assert m["params"] == sum(p.numel() for p in tiny_llama.parameters())  # the tied head counted once
    assert m["tied_embeddings"] is True
    assert m["size_mb"] > 0 and (tmp_path / "eval" / "MANIFEST.json").is_file()


def test_humaneval_requires_opt_in():
    with pytest.raises(EvalError, match="allow_execution"):
        EvalConfig(humaneval_problems=5)
    with pytest.raises(EvalError, match="humaneval_problems"):
        EvalConfig(humaneval_problems=500, allow_execution=True)
    with pytest.raises(EvalError, match="seq_len"):
        EvalConfig(seq_len=1)


def test_quantized_model_keeps_its_parameter_count(tmp_path, tiny_qwen2):
    """Packed GPTQ weights are buffers: the parameter count (and so param_reduction) must not drop with bits."""
    from evaluation.evaluate import logical_params
    from quant import QuantConfig, quantize_to_dir

    d = _save_tiny(tmp_path, tiny_qwen2)
    dense = sum(p.numel() for p in tiny_qwen2.parameters())
    quantize_to_dir(str(d), QuantConfig(bits=4, group_size=32, n_seqs=4, seq_len=32), tmp_path / "q")
    m = evaluate_to_dir(str(tmp_path / "q"), EvalConfig(seq_len=32, n_windows=2, batch_size=2), tmp_path / "eval")
    assert m["params"] == dense == logical_params(tiny_qwen2)
