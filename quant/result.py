"""QuantizedWeight: what a quantizer (GPTQ or RTN) returns for one linear, before packing."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quant.errors import QuantError


@dataclass
class QuantizedWeight:
    """Integer levels and grids of one ``[out, in]`` weight, in the GPTQ v1 conventions.

    ``W[:, i] = scales[g_idx[i]] * (q[:, i] - zeros[g_idx[i]])``, then the float outliers (flat row-major
    indices into ``[out, in]``) overwrite their entries. ``loss`` is GPTQ's objective
    ``sum (w - q)^2 / [H^-1]_ii / 2`` (0 for RTN, which has no Hessian).
    """

    q: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float16 [n_groups, out]
    zeros: torch.Tensor  # int32 [n_groups, out]
    g_idx: torch.Tensor  # int32 [in]
    bits: int
    group_size: int
    outlier_idx: torch.Tensor  # int64 [k]
    outlier_val: torch.Tensor  # float16 [k]
    loss: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)  # type: ignore[return-value]

    @property
    def n_outliers(self) -> int:
        return int(self.outlier_idx.numel())

    def dequantize(self) -> torch.Tensor:
        g = self.g_idx.long()
        w = (self.scales.float()[g].T * (self.q.float() - self.zeros.float()[g].T)).contiguous()
        if self.n_outliers:
            w.view(-1)[self.outlier_idx] = self.outlier_val.float()
        return w


def check_group_size(in_features: int, group_size: int, name: str = "layer", allow_partial: bool = False) -> int:
    """Return the effective group size (in_features for -1) or raise if it does not divide in_features.

    ``allow_partial`` (LoRD factors, whose input dim is a rank) lets the last group be shorter, as the GPTQ
    layout allows (``ceil(in / group_size)`` groups).
    """
    if group_size == -1:
        return in_features
    if in_features % group_size and not allow_partial:
        divisors = [d for d in (32, 64, 128, 256) if in_features % d == 0]
        hint = f"a divisor such as {divisors[-1]}" if divisors else "-1 (per channel)"
        raise QuantError(
            f"group_size={group_size} does not divide the input dimension {in_features} of {name}; "
            f"use {hint}, or -1 for per-channel grids."
        )
    return group_size


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)
