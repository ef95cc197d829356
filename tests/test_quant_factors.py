"""LoRD factor pairs under quantization (quant/factors.py): balancing, up refit, mixed widths, checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from quant import QuantConfig, QuantError, QuantLinear, load_quantized, quantize_model, save_quantized
from quant.factors import (
    BottleneckMoments,
    balance_factors_,
    balance_scales,
    factor_groups,
    pair_error,
    refit_up,
)
from quant.gptq import GPTQ
from quant.rtn import rtn_quantize
from tests.test_quant_model import _factor, logits, rel_err


def _imbalanced_pair(m: int = 64, n: int = 96, r: int = 48, seed: int = 0):
    """A LoRD-like pair: ``up`` orthonormal (entries ~1/sqrt(m)), ``down`` rows with a decaying spectrum and
    a few heavy input columns; inputs ``x`` with correlated channels."""
    g = torch.Generator().manual_seed(seed)
    up = torch.linalg.qr(torch.randn(m, r, generator=g))[0]
    spectrum = torch.logspace(1, -2, r)
    down = spectrum[:, None] * torch.randn(r, n, generator=g) / n**0.5
    down[:, :3] *= 8.0
    x = torch.randn(2048, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g) / n**0.5)
    return up, down, x


def _hessian(x: torch.Tensor) -> GPTQ:
    s = GPTQ(x.shape[1])
    s.add_batch(x)
    return s


def test_balancing_is_exact_in_float_and_equalises_norms(tiny_qwen2, calib_ids):
    _factor(tiny_qwen2, rank=24)
    for m in tiny_qwen2.modules():  # make the factors as imbalanced as LoRD's: decaying down rows
        if type(m).__name__ == "LowRankLinear" and "down" in m._modules:
            m.down.weight.data *= torch.logspace(1, -2, m.rank)[:, None]
    ref = logits(tiny_qwen2, calib_ids)
    layer = tiny_qwen2.model.layers[0]
    assert balance_factors_(layer) == 2  # qkv and gate_up
    attn = layer.self_attn
    up_cols = torch.cat([attn.q_proj.up.weight, attn.k_proj.up.weight, attn.v_proj.up.weight]).norm(dim=0)
    torch.testing.assert_close(attn.q_proj.down.weight.norm(dim=1), up_cols, rtol=1e-5, atol=1e-7)
    for layer in tiny_qwen2.model.layers[1:]:
        balance_factors_(layer)
    torch.testing.assert_close(logits(tiny_qwen2, calib_ids), ref, rtol=1e-4, atol=1e-4)


def test_balancing_lowers_the_quantized_output_error_of_an_imbalanced_pair():
    """Up's grids are shared by 16 rank directions per row; with a rank-dependent column scale the RTN
    grid of ``up`` wastes its range on small directions. Balancing moves resolution to where the output
    energy is (measured here; on the real model see bench/results/quality.json)."""
    up, down, x = _imbalanced_pair()
    up = up * torch.logspace(-2, 1, up.shape[1])[None, :]  # the reverse imbalance: big up columns, tiny rows
    down = down / torch.logspace(-2, 1, up.shape[1])[:, None]
    h = x.T @ x / x.shape[0]

    def err(u, d):
        qu = rtn_quantize(u, 4, 16, True).dequantize()
        qd = rtn_quantize(d, 4, 16, True).dequantize()
        return pair_error(qu, qd, u, d, h)

    dsc = balance_scales(down, [up])
    assert err(up * dsc, down / dsc[:, None]) < 0.8 * err(up, down)
    torch.testing.assert_close((up * dsc) @ (down / dsc[:, None]), up @ down, rtol=1e-4, atol=1e-5)


def test_up_refit_never_increases_the_pair_error():
    up, down, x = _imbalanced_pair()
    h = x.T @ x / x.shape[0]
    for bits in (2, 3, 4, 8):
        qd = _hessian(x).quantize(down, bits, 32).dequantize()
        new = refit_up(up, down, qd, h)
        before, after = pair_error(up, qd, up, down, h), pair_error(new, qd, up, down, h)
        assert after <= before
        if bits <= 4:
            assert after < 0.8 * before  # a real gain where the rounding error is large
    # an exact down leaves nothing to refit
    torch.testing.assert_close(refit_up(up, down, down, h), up, rtol=1e-4, atol=1e-5)


def test_bottleneck_moments_give_the_pair_error_and_the_refit_up_hessian():
    up, down, x = _imbalanced_pair()
    h = x.T @ x / x.shape[0]
    qd = rtn_quantize(down, 4, 16, True).dequantize()
    qu = rtn_quantize(up, 4, 16, True).dequantize()
    mom = BottleneckMoments.of(down, qd, h)
    assert mom.error(up, qu) == pytest.approx(pair_error(qu, qd, up, down, h), rel=1e-4)
    torch.testing.assert_close(mom.qq, (qd.double() @ h.double() @ qd.double().T), rtol=1e-4, atol=1e-6)
    # the refit from shared moments is the refit from scratch
    torch.testing.assert_close(refit_up(up, down, qd, h, moments=mom), refit_up(up, down, qd, h))


def test_upfit_gptq_beats_plain_gptq_on_the_tiny_lord_model(tiny_qwen2, calib_ids):
    _factor(tiny_qwen2, rank=24)
    ref = logits(tiny_qwen2, calib_ids)
    plain, fit = copy.deepcopy(tiny_qwen2), copy.deepcopy(tiny_qwen2)
    quantize_model(plain, QuantConfig(bits=3, group_size=16, factor_upfit=False, factor_rotate=False), calib_ids)
    quantize_model(fit, QuantConfig(bits=3, group_size=16, factor_upfit=True, factor_rotate=False), calib_ids)
    assert rel_err(logits(fit, calib_ids), ref) < rel_err(logits(plain, calib_ids), ref)


def test_mixed_widths_are_recorded_and_round_trip(tiny_qwen2, calib_ids, tmp_path):
    _factor(tiny_qwen2, rank=24)
    cfg = QuantConfig(bits=4, group_size=16, down_bits=8, factor_upfit=True, factor_balance=True)
    report = quantize_model(tiny_qwen2, cfg, calib_ids)
    bits = {n: v["storage_bits"] / v["n_weights"] for n, v in report.layers.items()}
    assert all(b > 8 for n, b in bits.items() if n.endswith(".down"))
    assert all(b < 8 for n, b in bits.items() if not n.endswith(".down"))
    assert 4 < report.summary()["avg_bits_per_weight"] < 8
    out = logits(tiny_qwen2, calib_ids)
    save_quantized(tiny_qwen2, None, tmp_path, cfg)
    layout = json.loads((tmp_path / "quant_layout.json").read_text())
    assert layout["modules"]["model.layers.0.self_attn.q_proj.down"]["bits"] == 8
    assert layout["modules"]["model.layers.0.self_attn.k_proj.up"]["bits"] == 4
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qcfg["bits"] == 4 and qcfg["dynamic"]["+:^model\\.layers\\.0\\.self_attn\\.q_proj\\.down$"] == {"bits": 8}
    reloaded, _ = load_quantized(tmp_path)
    assert reloaded.model.layers[0].self_attn.q_proj.down.bits == 8
    assert isinstance(reloaded.model.layers[0].mlp.gate_proj.up, QuantLinear)
    assert torch.equal(logits(reloaded, calib_ids), out)


def test_plain_dense_checkpoint_has_no_dynamic_section(tiny_llama, calib_ids, tmp_path):
    cfg = QuantConfig(bits=4, group_size=16, down_bits=8, factor_upfit=True)  # no factors: plain GPTQ
    quantize_model(tiny_llama, cfg, calib_ids)
    save_quantized(tiny_llama, None, tmp_path, cfg)
    assert "dynamic" not in json.loads((tmp_path / "quantize_config.json").read_text())


def test_factor_groups_name_the_shared_down_once(tiny_qwen2):
    _factor(tiny_qwen2, rank=24)
    groups = factor_groups(tiny_qwen2.model.layers[0])
    assert [(g.down, g.ups) for g in groups] == [
        ("self_attn.q_proj.down", ["self_attn.q_proj.up", "self_attn.k_proj.up", "self_attn.v_proj.up"]),
        ("mlp.gate_proj.down", ["mlp.gate_proj.up", "mlp.up_proj.up"]),
    ]


@pytest.mark.parametrize("kw", [{"down_bits": 5}, {"up_bits": 0}, {"grid": "lloyd"}])
def test_bad_factor_options_are_rejected(kw):
    with pytest.raises(QuantError):
        QuantConfig(**kw)


def test_rotation_is_exact_in_float_and_lets_gptq_beat_rounding_on_up(tiny_qwen2, calib_ids):
    from quant.factors import rotate_factors_, rotation

    _factor(tiny_qwen2, rank=24)
    ref = logits(tiny_qwen2, calib_ids)
    for layer in tiny_qwen2.model.layers:
        assert rotate_factors_(layer) == 2
    torch.testing.assert_close(logits(tiny_qwen2, calib_ids), ref, rtol=1e-4, atol=1e-4)
    # a LoRD pair: up's Hessian down G down^T is diagonal, so GPTQ = RTN on up; rotated, GPTQ wins
    up, down, x = _imbalanced_pair()
    lam = (down @ x.T).square().mean(1)
    down = torch.diag(lam.rsqrt()) @ down * torch.logspace(1, -2, down.shape[0])[:, None]  # decaying spectrum
    h = x.T @ x / x.shape[0]
    w, vecs = torch.linalg.eigh(down @ h @ down.T)
    down = vecs.T @ down  # now down h down^T is diagonal, as for LoRD
    hx = _hessian(x)

    def up_error(u, d):
        hu = GPTQ(d.shape[0])
        hu.H, hu.n_samples = 2 * d @ hx.H @ d.T / 2, 1
        q = hu.quantize(u, 4, 16, act_order=True).dequantize()
        return pair_error(q, d, u, d, hx.H), pair_error(rtn_quantize(u, 4, 16, True).dequantize(), d, u, d, hx.H)

    gptq, rtn = up_error(up, down)
    assert gptq == pytest.approx(rtn, rel=0.02)  # diagonal Hessian: nothing to feed back
    rot = rotation(down.shape[0]).float()
    gptq_r, _ = up_error(up @ rot, rot.T @ down)
    assert gptq_r < 0.9 * gptq


def test_wide_layers_take_their_width_and_round_trip(tiny_qwen2, calib_ids, tmp_path):
    _factor(tiny_qwen2, rank=24)
    ref = logits(tiny_qwen2, calib_ids)
    narrow = copy.deepcopy(tiny_qwen2)
    quantize_model(narrow, QuantConfig(bits=3, group_size=16), calib_ids)
    last = len(tiny_qwen2.model.layers) - 1
    cfg = QuantConfig(bits=3, group_size=16, wide_layers=(-last - 1,), wide_bits=8)  # layer 0, from the end
    report = quantize_model(tiny_qwen2, cfg, calib_ids)
    widths = {n: v["storage_bits"] / v["n_weights"] for n, v in report.layers.items()}
    assert any(n.startswith(f"model.layers.{last}.") for n in widths)
    assert all((w > 8) == n.startswith("model.layers.0.") for n, w in widths.items())
    # layer 0's share of the 3-bit error is gone from the output
    assert rel_err(logits(tiny_qwen2, calib_ids), ref) < rel_err(logits(narrow, calib_ids), ref)
    out = logits(tiny_qwen2, calib_ids)
    save_quantized(tiny_qwen2, None, tmp_path, cfg)
    reloaded, _ = load_quantized(tmp_path)
    assert reloaded.model.layers[0].self_attn.o_proj.bits == 8
    assert reloaded.model.layers[last].self_attn.o_proj.bits == 3
    assert torch.equal(logits(reloaded, calib_ids), out)


def test_wide_modules_take_their_width_in_every_layer_and_round_trip(tiny_qwen2, calib_ids, tmp_path):
    """A factored module's pattern covers its own factor (v_proj's ``up``), a dense one's the linear itself."""
    _factor(tiny_qwen2, rank=24)
    cfg = QuantConfig(bits=3, group_size=16, wide_modules=("self_attn.v_proj*", "mlp.down_proj"), wide_bits=8)
    quantize_model(tiny_qwen2, cfg, calib_ids)
    for layer in tiny_qwen2.model.layers:
        bits = {n: m.bits for n, m in layer.named_modules() if isinstance(m, QuantLinear)}
        assert {n for n, b in bits.items() if b == 8} == {"self_attn.v_proj.up", "mlp.down_proj"}, bits
        assert {b for b in bits.values() if b != 8} == {3}
    out = logits(tiny_qwen2, calib_ids)
    save_quantized(tiny_qwen2, None, tmp_path, cfg)
    reloaded, _ = load_quantized(tmp_path)
    assert [layer.mlp.down_proj.bits for layer in reloaded.model.layers] == [8, 8]
    assert torch.equal(logits(reloaded, calib_ids), out)
    with pytest.raises(QuantError, match="wide_modules"):
        QuantConfig(wide_modules=("",))


def test_wide_layers_that_overlap_on_a_shallow_model_are_their_union():
    assert QuantConfig(wide_layers=(0, 1, -2, -1)).wide_set(2) == {0, 1}
    assert QuantConfig(wide_layers=(0, 1, -2, -1)).wide_set(24) == {0, 1, 22, 23}


def test_a_wide_module_pattern_that_matches_nothing_is_rejected_before_any_work(tiny_qwen2, calib_ids):
    before = {k: v.clone() for k, v in tiny_qwen2.state_dict().items()}
    with pytest.raises(QuantError, match=r"wide_modules \['self_attn.vproj'\] match no linear"):
        quantize_model(tiny_qwen2, QuantConfig(bits=4, group_size=16, wide_modules=("self_attn.v_proj", "self_attn.vproj")),
                       calib_ids)
    assert all(torch.equal(v, tiny_qwen2.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("wide", [(0, 0), (0, 99), (-3,)])
def test_bad_wide_layers_are_rejected_before_any_work(tiny_qwen2, calib_ids, wide):
    """A duplicate and layers the model lacks (the tiny model has 2 layers)."""
    assert len(tiny_qwen2.model.layers) == 2
    before = {k: v.clone() for k, v in tiny_qwen2.state_dict().items()}
    with pytest.raises(QuantError, match="wide_layers"):
        quantize_model(tiny_qwen2, QuantConfig(bits=4, group_size=16, wide_layers=wide), calib_ids)
    assert all(torch.equal(v, tiny_qwen2.state_dict()[k]) for k, v in before.items())
