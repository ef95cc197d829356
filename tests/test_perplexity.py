"""Perplexity protocol: matches a hand computation, stride semantics, batching invariance, validation."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from evaluation import EvalError, PerplexityConfig, perplexity
from sources import code_split, resolve_model_dir


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_dir("tinycoder-random"))


@pytest.fixture(scope="module")
def files():
    return code_split().heldout[:3]


def _model(vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def test_matches_a_hand_computation(tok, files):
    model = _model(len(tok))
    res = perplexity(model, tok, files, seq_len=16, n_windows=3, batch_size=2, progress=False)
    from sources.corpus import token_stream

    stream = token_stream(tok, files, max_tokens=48)
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(3):
            w = stream[i * 16:(i + 1) * 16].unsqueeze(0)
            logits = model(w).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, w[0, 1:], reduction="sum").item()
            n += 15
    assert res.n_tokens == n
    assert res.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert res.bits_per_byte > 0 and res.seconds > 0


def test_batch_size_does_not_change_the_result(tok, files):
    model = _model(len(tok))
    a = perplexity(model, tok, files, seq_len=16, n_windows=4, batch_size=1, progress=False)
    b = perplexity(model, tok, files, seq_len=16, n_windows=4, batch_size=4, progress=False)
    assert a.n_tokens == b.n_tokens and a.ppl == pytest.approx(b.ppl, rel=1e-5)


def test_stride_scores_only_new_tokens(tok, files):
    model = _model(len(tok))
    res = perplexity(model, tok, files, seq_len=16, n_windows=3, stride=8, progress=False)
    assert res.n_tokens == 15 + 8 + 8


@pytest.mark.parametrize("kwargs", [{"seq_len": 1}, {"n_windows": 0}, {"stride": 0}, {"stride": 99, "seq_len": 16},
                                    {"batch_size": 0}])
def test_bad_protocol_is_refused(kwargs):
    with pytest.raises(EvalError):
        PerplexityConfig(**kwargs)


def test_too_little_text_is_a_clear_error(tok, files):
    with pytest.raises(EvalError, match="lower n_windows"):
        perplexity(_model(len(tok)), tok, files[:1], seq_len=512, n_windows=100_000, progress=False)
