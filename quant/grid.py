"""Uniform min-max quantization grids, shared by GPTQ and RTN (IST-DASLab ``quant.py``).

One grid per output row of a column group: ``w ~ scale * (q - zero)`` with integer ``q`` in
``[0, 2^bits - 1]``. Scales are rounded to float16 *before* quantizing, because the GPTQ checkpoint stores
them in float16: quantizing against the stored scale makes the saved model exactly the one GPTQ optimised.
"""

from __future__ import annotations

import torch

# float16 cannot hold smaller scales (subnormal limit ~6e-8); a row that flat is all zeros anyway.
_MIN_SCALE = 1e-7


def max_level(bits: int) -> int:
    return 2**bits - 1


def fit_grid(
    w: torch.Tensor, bits: int, sym: bool, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of shape [rows, 1] for ``w`` [rows, cols], ignoring entries where ``keep`` is False.

    The range always contains 0 (so exact zeros stay exact). Symmetric grids put the zero point at
    ``2^(bits-1)``. Asymmetric zero points are clamped to >= 1 because the GPTQ v1 layout stores ``zero - 1``
    (a zero point of 0 would wrap); this only touches rows with no negative weight.
    """
    maxq = max_level(bits)
    w = w.float()
    if keep is not None:
        w = torch.where(keep, w, torch.zeros_like(w))
    xmin = w.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = w.max(dim=1, keepdim=True).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = ((xmax - xmin) / maxq).clamp(min=_MIN_SCALE).half().float()
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(1, maxq)
    return scale, zero


def quantize_int(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels ``clamp(round(w / scale) + zero, 0, maxq)`` (as float, exact integers)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_level(bits))


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale * (q - zero)


def quantize_dequantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return dequantize(quantize_int(w, scale, zero, bits), scale, zero)


def fit_grid_mse(w: torch.Tensor, bits: int, sym: bool, n_steps: int = 40, max_shrink: float = 0.6,
                 norm: float = 2.4) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipped grid: try the min-max range shrunk by factors ``1 - max_shrink * i / n_steps`` and keep, per row, the one with the lowest ``sum |w - q|^norm`` (the ``mse`` option of
    IST-DASLab ``quant.py``, norm 2.4 as there). Bell-shaped rows (LoRD factors are sums of many weights)
    lose less to rounding when a few extreme values are clipped than when every value is coarse."""
    base_scale, base_zero = fit_grid(w, bits, sym)
    w = w.float()
    best = quantize_dequantize(w, base_scale, base_zero, bits).sub_(w).abs_().pow_(norm).sum(1, keepdim=True)
    scale, zero = base_scale.clone(), base_zero.clone()
    maxq = max_level(bits)
    xmin = w.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = w.max(dim=1, keepdim=True).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    for i in range(1, n_steps + 1):
        p = 1.0 - max_shrink * i / n_steps
        s = ((xmax - xmin) * p / maxq).clamp(min=_MIN_SCALE).half().float()
        z = base_zero if sym else torch.round(-xmin * p / s).clamp(1, maxq)
        err = quantize_dequantize(w, s, z, bits).sub_(w).abs_().pow_(norm).sum(1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero
