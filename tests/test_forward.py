"""Forward toolkit: replay from any layer equals the full forward, the one NLL equals cross-entropy by hand,
the architecture registry covers what it claims (and refuses what it does not)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config

from forward import (
    ARCHS,
    NLL,
    ForwardError,
    adapter_for,
    all_layer_inputs,
    capture,
    decoder_layers,
    logits_from,
    nll,
    nll_from,
    run_layer,
    token_nll,
    walk,
)
from lord.modeling import modeling_lord


@pytest.fixture(params=["tiny_llama", "tiny_qwen2", "tiny_bigcode"])
def tiny_any(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("layer", [0, 1])
def test_replay_from_layer_equals_full_forward(tiny_any, calib_ids, layer):
    with torch.no_grad():
        full = tiny_any(input_ids=calib_ids, use_cache=False).logits
    stream = capture(tiny_any, calib_ids, layer=layer, batch_size=3)
    got = torch.cat(logits_from(tiny_any, stream, layer))
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_nll_from_matches_cross_entropy_of_full_logits(tiny_any, calib_ids):
    with torch.no_grad():
        logits = tiny_any(input_ids=calib_ids, use_cache=False).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             calib_ids[:, 1:].reshape(-1))
    got = nll_from(tiny_any, capture(tiny_any, calib_ids, 1, batch_size=5), 1)
    assert got.n_tokens == calib_ids.shape[0] * (calib_ids.shape[1] - 1)
    assert got.mean == pytest.approx(float(want), rel=1e-5)


def test_walk_with_modified_layer_equals_forward_of_modified_model(tiny_llama, calib_ids):
    """Two streams through the same layers: the dense one sees the original layer, the other the modified one."""
    dense = capture(tiny_llama, calib_ids, batch_size=4)
    comp = dense.copy()
    with torch.no_grad():
        dense_logits = tiny_llama(input_ids=calib_ids, use_cache=False).logits
        for i, layer in walk(tiny_llama, comp):
            dense.advance(layer)
            if i == 0:
                layer.mlp.down_proj.weight.mul_(0.5)
        modified = tiny_llama(input_ids=calib_ids, use_cache=False).logits
        head, norm = adapter_for(tiny_llama).lm_head(tiny_llama), adapter_for(tiny_llama).final_norm(tiny_llama)
        torch.testing.assert_close(torch.cat([head(norm(h)) for h in comp.hidden]), modified, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([head(norm(h)) for h in dense.hidden]), dense_logits,
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(modified, dense_logits)


def test_all_layer_inputs_are_each_layers_inputs(tiny_bigcode, calib_ids):
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda _m, a, kw: seen.append(a[0] if a else kw["hidden_states"]),
                                             with_kwargs=True) for layer in decoder_layers(tiny_bigcode)]
    with torch.no_grad():
        tiny_bigcode(input_ids=calib_ids, use_cache=False)
    for h in hooks:
        h.remove()
    streams = all_layer_inputs(tiny_bigcode, calib_ids)
    assert len(streams) == len(seen) == 2
    for s, want in zip(streams, seen, strict=True):
        torch.testing.assert_close(s.hidden[0], want)
    out = run_layer(decoder_layers(tiny_bigcode)[0], streams[0].hidden[0], streams[0].calls[0])
    torch.testing.assert_close(out, streams[1].hidden[0])


def test_nll_matches_cross_entropy_by_hand():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 7, generator=g)
    ids = torch.randint(0, 7, (3, 5), generator=g)
    by_hand = 0.0
    for b in range(3):
        for j in range(4):
            p = torch.softmax(logits[b, j].double(), -1)
            by_hand -= math.log(float(p[ids[b, j + 1]]))
    got = nll(logits, ids)
    assert got.n_tokens == 12
    assert got.sum == pytest.approx(by_hand, rel=1e-6)
    assert token_nll(logits, ids).shape == (3, 4)
    assert (got + NLL(1.0, 3)).mean == pytest.approx((by_hand + 1.0) / 15, rel=1e-6)
    with pytest.raises(ForwardError, match="zero scored tokens"):
        _ = NLL().mean


def test_unknown_architecture_is_refused_with_the_supported_list():
    with pytest.raises(ForwardError, match="'gpt2' is not supported.*gpt_bigcode.*llama"):
        adapter_for(GPT2Config())
    with pytest.raises(ForwardError, match="expected \\[n_seqs, seq_len >= 2\\]"):
        nll(torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long))


def test_registry_groups_name_real_linears(tiny_any):
    ad = adapter_for(tiny_any)
    groups = ad.all_groups(tiny_any)
    assert len(groups) == 4 * len(ad.decoder_layers(tiny_any))
    assert {g.kind for g in groups} == {s.kind for s in ad.groups}
    for g in groups:
        for m in g.members:
            assert isinstance(tiny_any.get_submodule(m), torch.nn.Linear)


def test_shipped_modeling_file_agrees_with_the_registry():
    """modeling_lord.py ships inside checkpoints and cannot import the registry: check its table instead."""
    assert set(modeling_lord.LORD_CLASSES) == set(ARCHS)
    for family, cls in modeling_lord.LORD_CLASSES.items():
        assert cls.__name__ == ARCHS[family].lord_class
