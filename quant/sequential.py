"""Model plumbing for GPTQ: walk the decoder layer by layer, each fed by the already-quantized layers before
it (GPTQ sec. 3, "sequential"), and swap every ``nn.Linear`` inside a layer for a ``QuantLinear``.

The decoder layers come from the architecture registry and the walk from the forward toolkit
(``forward.capture``: layer 0's inputs and call arguments captured once, each layer's outputs fed to the next).
LoRD-factored projections (``LowRankLinear`` with ``.down`` and
``.up`` linears, docs/CONTRACTS.md) need no special case: both factors are ``nn.Linear``s, and the hook on
``.up`` sees the ``.down`` outputs, so its Hessian is ``A G A^T`` from the same pass (DESIGN.md). A ``down``
shared by a group appears once in ``named_modules`` and is quantized once, then swapped under every parent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import forward
from forward import ForwardError
from quant.config import QuantConfig
from quant.errors import QuantError
from quant.factors import FactorPlan, balance_factors_, rotate_factors_
from quant.gptq import GPTQ
from quant.qlinear import QuantLinear
from quant.result import QuantizedWeight, check_group_size
from quant.rtn import rtn_quantize


@dataclass
class QuantReport:
    """What a quantization run did: per-layer figures and the totals a benchmark reports."""

    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def n_weights(self) -> int:
        return sum(v["n_weights"] for v in self.layers.values())

    @property
    def n_outliers(self) -> int:
        return sum(v["n_outliers"] for v in self.layers.values())

    @property
    def storage_bits(self) -> int:
        return sum(v["storage_bits"] for v in self.layers.values())

    def summary(self) -> dict[str, Any]:
        n = max(self.n_weights, 1)
        return {
            "n_quantized_layers": len(self.layers),
            "n_quantized_weights": self.n_weights,
            "n_outliers": self.n_outliers,
            "outlier_fraction": self.n_outliers / n,
            "avg_bits_per_weight": self.storage_bits / n,
            "quantize_seconds": self.seconds,
        }


def storage_bits(qw: QuantizedWeight) -> int:
    """Bits the checkpoint spends on this layer: levels, fp16 scale + packed zero per group and row, int32
    g_idx per input column, and 48 bits per outlier (fp16 value + int32 index)."""
    out_f, in_f = qw.shape
    n_groups = qw.scales.shape[0]
    return qw.bits * out_f * in_f + n_groups * out_f * (16 + qw.bits) + 32 * in_f + 48 * qw.n_outliers


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    try:
        return forward.decoder_layers(model)
    except ForwardError as e:
        raise QuantError(str(e)) from e


def target_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` in a decoder layer (shared modules once), in definition order."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def quantize_model(model: nn.Module, cfg: QuantConfig, calib_ids: torch.Tensor | None = None) -> QuantReport:
    """Quantize all linears of ``model``'s decoder layers in place; return the report.

    Parameters that stay in float are rounded through float16, the checkpoint's storage dtype.

    GPTQ needs ``calib_ids`` [n_seqs, seq_len]; RTN ignores them.
    """
    layers = decoder_layers(model)
    prefix = _module_prefix(model, layers)
    wide = cfg.wide_set(len(layers))
    names: set[str] = set()
    for i, layer in enumerate(layers):  # fail before any work if a group size or a width pattern does not fit
        factors = _factor_linears(layer)
        for name, lin in target_linears(layer).items():
            check_group_size(lin.in_features, cfg.group_size, f"{prefix}.{i}.{name}", id(lin) in factors)
            names.add(name)
    unmatched = [p for p in cfg.wide_modules if not any(cfg.is_wide_module(n, (p,)) for n in names)]
    if unmatched:
        raise QuantError(f"wide_modules {unmatched} match no linear of a decoder layer; its linears are "
                         f"{sorted(names)} (fnmatch patterns, e.g. 'self_attn.v_proj*').")
    report = QuantReport()
    t0 = time.perf_counter()
    with torch.no_grad():
        for layer in layers:  # exact in float: before the capture, so every Hessian sees the new factors
            if cfg.factor_rotate:
                rotate_factors_(layer, cfg.seed)
            if cfg.factor_balance:
                balance_factors_(layer)
        if cfg.method == "rtn":
            for i, layer in enumerate(tqdm(layers, desc="rtn", unit="layer")):
                _quantize_layer(layer, f"{prefix}.{i}", cfg, None, report, i in wide)
        else:
            if calib_ids is None or calib_ids.numel() == 0:
                raise QuantError(
                    "GPTQ needs calibration data: got no calibration ids. Pass a LongTensor "
                    "[n_seqs, seq_len] (sources.corpus.calibration_batches), or use method='rtn'."
                )
            stream = forward.capture(model, calib_ids, 0, cfg.batch_size)
            for i, layer in tqdm(forward.walk(model, stream), total=len(layers), desc="gptq", unit="layer"):
                stats = _collect_hessians(layer, stream)
                _quantize_layer(layer, f"{prefix}.{i}", cfg, stats, report, i in wide)
        _round_unquantized_(model, torch.float16)
    report.seconds = time.perf_counter() - t0
    return report


def _round_unquantized_(model: nn.Module, dtype: torch.dtype) -> None:
    """Round the float parameters left in float (embeddings, norms, head) through the checkpoint's storage
    dtype, so the model in memory is exactly the one a reload of the checkpoint gives."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.copy_(p.to(dtype).to(p.dtype))


def _quantize_layer(
    layer: nn.Module, name: str, cfg: QuantConfig, stats: dict[str, GPTQ] | None, report: QuantReport,
    wide_layer: bool = False,
) -> None:
    parents = _parents_of(layer)
    factors = _factor_linears(layer)
    plan = FactorPlan(layer, cfg)  # LoRD factors: per-kind bits, up refit on the quantized down
    for sub, lin in target_linears(layer).items():
        full = f"{name}.{sub}"
        partial = id(lin) in factors
        bits = cfg.wide_bits if wide_layer or cfg.is_wide_module(sub) else plan.bits(sub)
        weight = plan.weight_for(sub, lin, stats)
        if stats is None:
            qw = rtn_quantize(weight, bits, cfg.group_size, cfg.sym, name=full, allow_partial=partial,
                              mse_grid=cfg.grid == "mse")
        else:
            qw = stats[sub].quantize(
                weight, bits, cfg.group_size, cfg.sym, cfg.act_order, cfg.damp_percent,
                cfg.block_size, cfg.outlier_threshold, name=full, allow_partial=partial, mse_grid=cfg.grid == "mse",
            )
            del stats[sub]
            plan.after(sub, qw)
        qlin = QuantLinear.from_quantized(qw, lin.bias).to(lin.weight.device)
        for parent, attr in parents[id(lin)]:
            setattr(parent, attr, qlin)
        report.layers[full] = {
            "shape": list(qw.shape),
            "n_weights": qw.q.numel(),
            "n_outliers": qw.n_outliers,
            "storage_bits": storage_bits(qw),
            "gptq_loss": qw.loss,
        }


def _factor_linears(layer: nn.Module) -> set[int]:
    """ids of the ``down``/``up`` linears of LoRD factors: their in-dim is a rank, so a group size need not
    divide it (the last group is shorter; our loader and GPTQModel's TorchLinear both accept that)."""
    out: set[int] = set()
    for _, mod in layer.named_modules():
        if type(mod).__name__ == "LowRankLinear":
            out.update(id(c) for c in (mod.down, mod.up) if isinstance(c, nn.Linear))
    return out


def _collect_hessians(layer: nn.Module, stream: forward.Stream) -> dict[str, GPTQ]:
    linears = target_linears(layer)
    stats = {name: GPTQ(lin.in_features) for name, lin in linears.items()}
    hooks = [
        lin.register_forward_hook(lambda _m, inp, _out, s=stats[name]: s.add_batch(inp[0]))
        for name, lin in linears.items()
    ]
    try:
        stream.run(layer)
    finally:
        for hk in hooks:
            hk.remove()
    return stats


def _parents_of(root: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(child) -> every (parent, attribute) holding it, so a shared module is swapped everywhere."""
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, mod in root.named_modules(remove_duplicate=False):
        for attr, child in mod.named_children():
            parents.setdefault(id(child), []).append((mod, attr))
    return parents


def _module_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    return "layers"
