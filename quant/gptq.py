"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization", Alg. 1) in pure torch.

One class, two verbs, after IST-DASLab ``gptq.py``: ``add_batch`` accumulates the Hessian
``H = 2 X^T X / n`` of the layer's inputs; ``quantize`` runs the column-by-column solver with lazy block
updates, optional act-order, column groups, and SpQR-style float outliers (Dettmers et al. 2023, sec. 4.1).
The model walk lives in ``quant.sequential``, the grids in ``quant.grid``.
"""

from __future__ import annotations

import math

import torch

from quant.errors import QuantError
from quant.grid import dequantize, fit_grid, fit_grid_mse, quantize_int
from quant.result import QuantizedWeight, check_group_size


class GPTQ:
    """Input statistic and solver for one linear layer with ``in_features`` inputs."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.n_samples = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """Fold inputs ``x`` [..., in_features] into the running mean ``H = 2/n sum x x^T`` (fp32, streaming)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.shape[1] != self.in_features:
            raise QuantError(f"input width {x.shape[1]} != layer in_features {self.in_features}.")
        n = x.shape[0]
        self.H.mul_(self.n_samples / (self.n_samples + n))
        self.n_samples += n
        x = x * math.sqrt(2.0 / self.n_samples)
        self.H.addmm_(x.T, x)

    def quantize(
        self,
        weight: torch.Tensor,
        bits: int,
        group_size: int = 128,
        sym: bool = True,
        act_order: bool = False,
        damp_percent: float = 0.01,
        block_size: int = 128,
        outlier_threshold: float | None = None,
        name: str = "layer",
        allow_partial: bool = False,
        mse_grid: bool = False,
    ) -> QuantizedWeight:
        """Quantize ``weight`` [out, in] minimising ``||X W^T - X Q^T||^2`` column by column (GPTQ eq. 2-4).

        Each column's rounding error, divided by the Cholesky diagonal of ``H^-1``, is spread over the
        not-yet-quantized columns (``W[:, j:] -= err * Hinv[i, j:]``), applied lazily per block of
        ``block_size`` columns. With ``act_order`` columns go in order of decreasing ``H_ii``; groups are
        then contiguous in that order and ``g_idx`` maps each original column to its group. ``mse_grid``
        clips each group's grid to its lowest rounding error (quant.grid.fit_grid_mse; not with outliers).
        """
        if self.n_samples == 0:
            raise QuantError(
                f"{name}: no calibration inputs were seen; GPTQ needs calibration data "
                "(pass calibration ids, or use method='rtn')."
            )
        W = weight.detach().float().clone()
        out_f, in_f = W.shape
        gs = check_group_size(in_f, group_size, name, allow_partial)
        H = self.H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

        perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f)
        W, H = W[:, perm], H[perm][:, perm]
        H += damp_percent * torch.mean(torch.diag(H)) * torch.eye(in_f)
        try:
            Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        except torch.linalg.LinAlgError as e:
            raise QuantError(
                f"{name}: the damped Hessian is not positive definite (damp_percent={damp_percent}); "
                "raise damp_percent (e.g. 0.1) or use more calibration sequences."
            ) from e
        d_all = torch.diag(Hinv)
        thr = None
        if outlier_threshold is not None:
            # SpQR: threshold relative to the layer's mean scaled weight variance
            thr = outlier_threshold * float((W.var(dim=0) / d_all.square()).mean())

        Q = torch.zeros_like(W)
        Qint = torch.zeros_like(W)
        is_out = torch.zeros_like(W, dtype=torch.bool)
        scales: list[torch.Tensor] = []
        zeros: list[torch.Tensor] = []
        scale = zero = None
        loss = torch.zeros(())
        for i1 in range(0, in_f, block_size):
            i2 = min(i1 + block_size, in_f)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if col % gs == 0:
                    group = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                    scale, zero = self._fit_group(group, d_all[col : col + gs], bits, sym, thr, mse_grid)
                    scales.append(scale.squeeze(1))
                    zeros.append(zero.squeeze(1))
                w, d = W1[:, i], Hinv1[i, i]
                qi = quantize_int(w.unsqueeze(1), scale, zero, bits).squeeze(1)
                q = dequantize(qi.unsqueeze(1), scale, zero).squeeze(1)
                if thr is not None:
                    out_mask = ((w - q) / d).square() > thr
                    q = torch.where(out_mask, w.half().float(), q)
                    is_out[:, col] = out_mask
                Qint[:, col], Q[:, col] = qi, q
                err = (w - q) / d
                loss += err.square().sum() / 2
                W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

        inv = torch.argsort(perm)
        Qint, Q, is_out = Qint[:, inv], Q[:, inv], is_out[:, inv]
        g_idx = torch.empty(in_f, dtype=torch.int32)
        g_idx[perm] = (torch.arange(in_f) // gs).to(torch.int32)
        flat = torch.nonzero(is_out.reshape(-1)).squeeze(1)
        return QuantizedWeight(
            q=Qint.to(torch.uint8),
            scales=torch.stack(scales).half(),
            zeros=torch.stack(zeros).to(torch.int32),
            g_idx=g_idx,
            bits=bits,
            group_size=group_size,
            outlier_idx=flat,
            outlier_val=Q.reshape(-1)[flat].half(),
            loss=float(loss),
        )

    @staticmethod
    def _fit_group(
        group: torch.Tensor, d: torch.Tensor, bits: int, sym: bool, thr: float | None, mse_grid: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid of one column group. With outliers on, weights whose *leave-one-out* scaled error exceeds the
        threshold are left out of the fit (SpQR sec. 4.1), so a large weight cannot stretch the grid to hide
        its own error. A min-max grid only changes when its row's min or max is left out, so three fits
        (all, without the max, without the min) give every weight's leave-one-out grid."""
        if mse_grid and thr is None:
            return fit_grid_mse(group, bits, sym)
        scale, zero = fit_grid(group, bits, sym)
        if thr is None or group.shape[1] < 2:
            return scale, zero
        srt = group.sort(dim=1).values
        no_max = fit_grid(torch.cat([srt[:, :1], srt[:, -2:-1]], dim=1), bits, sym)
        no_min = fit_grid(torch.cat([srt[:, 1:2], srt[:, -1:]], dim=1), bits, sym)

        def err(grid: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            q = dequantize(quantize_int(group, *grid, bits), *grid)
            return ((group - q) / d.unsqueeze(0)).square()

        loo = torch.where(group == srt[:, -1:], err(no_max), torch.where(group == srt[:, :1], err(no_min), err((scale, zero))))
        return fit_grid(group, bits, sym, keep=loo <= thr)
