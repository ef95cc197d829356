"""quant plumbing on tiny random models (walk, swap, save/load, factored models, the stage) and one real-model
check: 8-bit GPTQ on SmolLM2-135M moves held-out perplexity by < 1%."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from quant import QuantConfig, QuantError, QuantLinear, load_quantized, quantize_model, save_quantized
from quant.sequential import decoder_layers


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2", "tiny_bigcode"])
def test_every_decoder_linear_is_quantized_and_reload_gives_identical_logits(fixture, request, calib_ids, tmp_path):
    model = request.getfixturevalue(fixture)
    ref = logits(model, calib_ids)
    cfg = QuantConfig(bits=4, group_size=32, act_order=True, outlier_threshold=0.2)
    report = quantize_model(model, cfg, calib_ids)
    for layer in decoder_layers(model):
        assert not any(type(m) is nn.Linear for m in layer.modules())
    assert len(report.layers) == sum(isinstance(m, QuantLinear) for m in model.modules())
    assert type(model.get_output_embeddings()) is nn.Linear  # the head stays float
    out = logits(model, calib_ids)
    assert rel_err(out, ref) < 0.1
    save_quantized(model, None, tmp_path, cfg)
    qcfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 32 and qcfg["desc_act"] and qcfg["quant_method"] == "gptq"
    reloaded, tok = load_quantized(tmp_path)
    assert tok is None
    assert torch.equal(logits(reloaded, calib_ids), out)


def test_gptq_model_closer_to_float_than_rtn(tiny_llama, calib_ids):
    ref = logits(tiny_llama, calib_ids)
    errs = {}
    for method in ("gptq", "rtn"):
        m = copy.deepcopy(tiny_llama)
        quantize_model(m, QuantConfig(bits=4, group_size=32, method=method), calib_ids)
        errs[method] = rel_err(logits(m, calib_ids), ref)
    assert errs["gptq"] < 0.8 * errs["rtn"], errs


def test_eight_bit_is_near_lossless_and_report_counts_bits(tiny_qwen2, calib_ids):
    ref = logits(tiny_qwen2, calib_ids)
    report = quantize_model(tiny_qwen2, QuantConfig(bits=8, group_size=-1), calib_ids)
    assert rel_err(logits(tiny_qwen2, calib_ids), ref) < 0.01
    s = report.summary()
    assert s["n_outliers"] == 0 and 8.0 < s["avg_bits_per_weight"] < 9.5


def test_missing_calibration_and_bad_group_size_fail_before_any_change(tiny_llama, calib_ids):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(QuantError, match="GPTQ needs calibration data"):
        quantize_model(tiny_llama, QuantConfig(bits=4, group_size=32), None)
    with pytest.raises(QuantError, match=r"group_size=48 does not divide the input dimension 64 of model\.layers\.0"):
        quantize_model(tiny_llama, QuantConfig(bits=4, group_size=48), calib_ids)
    after = tiny_llama.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _factor(model: nn.Module, rank: int):
    """Factor q/k/v (shared down) and gate/up (shared down) of every layer with lord's own modules."""
    modeling_lord = pytest.importorskip("lord.modeling.modeling_lord")
    groups = {}
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}"
        groups[f"{p}.qkv"] = {"members": [f"{p}.self_attn.{n}_proj" for n in "qkv"], "rank": rank}
        groups[f"{p}.gate_up"] = {"members": [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], "rank": rank}
    modeling_lord.install_rank_map(model, groups)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, modeling_lord.LowRankLinear):
            for lin in (m.down, m.up):
                lin.weight.data = torch.randn(lin.weight.shape, generator=g) / lin.in_features**0.5
    model.config.lord = {"groups": groups}
    return modeling_lord


def test_lord_factors_quantized_once_per_shared_down_and_reload(tiny_qwen2, calib_ids, tmp_path):
    modeling_lord = _factor(tiny_qwen2, rank=24)  # 24 is not a multiple of 16: the up factors get a short group
    ref = logits(tiny_qwen2, calib_ids)
    rtn = copy.deepcopy(tiny_qwen2)
    quantize_model(rtn, QuantConfig(bits=4, group_size=16, method="rtn"))
    cfg = QuantConfig(bits=4, group_size=16)
    report = quantize_model(tiny_qwen2, cfg, calib_ids)
    attn = tiny_qwen2.model.layers[0].self_attn
    assert isinstance(attn.q_proj, modeling_lord.LowRankLinear)
    assert isinstance(attn.q_proj.down, QuantLinear) and attn.k_proj.down is attn.q_proj.down
    assert isinstance(attn.v_proj.up, QuantLinear) and attn.v_proj.up.scales.shape[0] == 2  # ceil(24 / 16)
    downs = [n for n in report.layers if n.endswith(".down")]
    assert len(downs) == 2 * tiny_qwen2.config.num_hidden_layers  # one per group, not one per member
    out = logits(tiny_qwen2, calib_ids)
    assert rel_err(out, ref) < 0.8 * rel_err(logits(rtn, calib_ids), ref)  # up's Hessian sees down's outputs
    save_quantized(tiny_qwen2, None, tmp_path, cfg)
    assert json.loads((tmp_path / "quant_layout.json").read_text())["factored"] is True
    reloaded, _ = load_quantized(tmp_path)
    assert isinstance(reloaded.model.layers[1].mlp.up_proj, modeling_lord.LowRankLinear)
    assert torch.equal(logits(reloaded, calib_ids), out)


def test_stage_writes_an_artifact_that_sources_loads(tmp_path):
    from quant import quantize_to_dir
    from sources import load_model

    cfg = QuantConfig(bits=4, group_size=16, n_seqs=4, seq_len=64)
    metrics = quantize_to_dir("tinycoder-random", cfg, tmp_path / "q")
    art = json.loads((tmp_path / "q" / "lord_artifact.json").read_text())
    assert art["kind"] == "gptq" and "loader" not in art  # loaders are chosen by kind (sources/artifact.py)
    assert json.loads((tmp_path / "q" / "metrics.json").read_text()) == metrics
    assert metrics["n_quantized_layers"] == 14 and metrics["size_mb"] > 0
    model, tok = load_model(tmp_path / "q")
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    ids = tok("def f(x):\n    return x", return_tensors="pt").input_ids
    assert torch.isfinite(logits(model, ids)).all()


@pytest.mark.slow
def test_eight_bit_gptq_on_smollm2_moves_heldout_ppl_below_one_percent(tmp_path):
    from evaluation.perplexity import perplexity
    from sources import calibration_batches, code_split, load_model

    model, tok = load_model("smollm2-135m")
    split = code_split()
    protocol = {"seq_len": 256, "n_windows": 8, "batch_size": 4}
    dense = perplexity(model, tok, split.heldout, progress=False, **protocol).ppl
    ids = calibration_batches(tok, split.calibration, n_seqs=8, seq_len=256, seed=0)
    quantize_model(model, QuantConfig(bits=8, group_size=64), ids)  # 576 = 9 x 64
    q8 = perplexity(model, tok, split.heldout, progress=False, **protocol).ppl
    assert abs(q8 / dense - 1) < 0.01, (dense, q8)
