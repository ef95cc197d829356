"""Shared fixtures: tiny random-weight models of each supported architecture (fast unit tests) and the
fast real embedded model (end-to-end tests). Threads are pinned: two heavy processes on 2 cores are 10-30x
slower than one."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPTBigCodeConfig,
    LlamaConfig,
    Qwen2Config,
)

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

VOCAB = 128


def _tiny(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().eval()


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return _tiny(
        LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=True)
    )


@pytest.fixture
def tiny_qwen2() -> torch.nn.Module:
    return _tiny(
        Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=False)
    )


@pytest.fixture
def tiny_bigcode() -> torch.nn.Module:
    return _tiny(
        GPTBigCodeConfig(vocab_size=VOCAB, n_embd=64, n_inner=160, n_layer=2, n_head=4,
                         multi_query=True, n_positions=256)
    )


@pytest.fixture
def calib_ids() -> torch.Tensor:
    """Token ids with structure (a random walk over the vocab), so activations are correlated like text."""
    g = torch.Generator().manual_seed(0)
    steps = torch.randint(-3, 4, (8, 64), generator=g)
    return (steps.cumsum(dim=1) % VOCAB).long()


# One Prefect test server per session (STACK.md: ~10 s each) and a throwaway MLflow store per module, for every
# flow-level test (tests/test_flow*.py, tests/test_scale.py, tests/reliability/).
@pytest.fixture(scope="session")
def prefect_api():
    from bench.harness import shared_prefect_harness

    with shared_prefect_harness() as url:
        yield url


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from bench.harness import temp_mlflow_store

    with temp_mlflow_store(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri
