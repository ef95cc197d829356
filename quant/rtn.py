"""Round-to-nearest baseline on the same grids as GPTQ (what GPTQ's error feedback is measured against)."""

from __future__ import annotations

import torch

from quant.grid import fit_grid, fit_grid_mse, quantize_int
from quant.result import QuantizedWeight, check_group_size


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int, sym: bool, name: str = "layer", allow_partial: bool = False,
    mse_grid: bool = False,
) -> QuantizedWeight:
    """Quantize each row's column groups independently to their nearest grid level."""
    w = weight.detach().float()
    out_f, in_f = w.shape
    gs = check_group_size(in_f, group_size, name, allow_partial)
    n_groups = -(-in_f // gs)
    # zero padding of a short last group leaves its grid unchanged: every grid's range contains 0
    padded = torch.nn.functional.pad(w, (0, n_groups * gs - in_f))
    rows = padded.reshape(out_f * n_groups, gs)
    scale, zero = (fit_grid_mse if mse_grid else fit_grid)(rows, bits, sym)
    q = quantize_int(rows, scale, zero, bits).reshape(out_f, n_groups * gs)[:, :in_f]
    return QuantizedWeight(
        q=q.to(torch.uint8),
        scales=scale.reshape(out_f, n_groups).T.contiguous().half(),
        zeros=zero.reshape(out_f, n_groups).T.contiguous().to(torch.int32),
        g_idx=(torch.arange(in_f) // gs).to(torch.int32),
        bits=bits,
        group_size=group_size,
        outlier_idx=torch.zeros(0, dtype=torch.int64),
        outlier_val=torch.zeros(0, dtype=torch.float16),
    )
