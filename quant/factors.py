"""Quantizing LoRD factor pairs ``W ~ up @ down`` well (issue 14 part 2); the model walk stays in
``quant.sequential``, which calls :class:`FactorPlan` per decoder layer.

Why factors need care: a layer's output error is ``(up down - Q(up) Q(down)) X``, but plain GPTQ quantizes
each factor against its own Hessian collected from the *float* model. ``up``'s input is ``down X`` whose
Hessian ``down G down^T`` is (nearly) diagonal for LoRD (``up = U_r`` are eigenvectors of the output
covariance), so GPTQ's error feedback has nothing to work with on ``up``, and nothing feeds ``down``'s
rounding error into ``up``. The remedies here:

* **up refit** (``QuantConfig.factor_upfit``): quantize ``down`` first, then solve
  ``up' = argmin ||up down X - up' Q(down) X||`` in closed form (``up (down G Qd^T)(Qd G Qd^T)^-1``, the
  cross moment of float and quantized bottleneck outputs), and GPTQ ``up'`` with the Hessian of the
  *quantized* bottleneck's outputs ``Qd G Qd^T``. Because ``up'`` is the least-squares optimum, the total
  error splits exactly into the refit residual plus GPTQ's own objective on ``up'`` (Pythagoras), so GPTQ
  minimises the right thing. ``G`` is ``down``'s input Hessian, which the walk collects anyway.
* **balancing** (``QuantConfig.factor_balance``): ``up <- up D``, ``down <- D^-1 down`` per rank direction,
  ``D = sqrt(||down_i|| / ||up_:,i||)``; exact in float, it only moves where the grids' resolution goes.
* **mixed widths** (``QuantConfig.down_bits`` / ``up_bits``): a factor kind at another bit width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quant.config import QuantConfig
from quant.gptq import GPTQ
from quant.result import QuantizedWeight


@dataclass
class FactorGroup:
    """One shared bottleneck ``down`` (by its name inside the layer) and the ``up`` of each group member."""

    down: str
    ups: list[str] = field(default_factory=list)


def factor_groups(layer: nn.Module) -> list[FactorGroup]:
    """The LoRD groups of a decoder layer, named as ``layer.named_modules()`` names their linears (a shared
    ``down`` is registered once, on the group's owner; members resolve ``.down`` to it)."""
    names = {id(m): n for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    groups: dict[int, FactorGroup] = {}
    for _, mod in layer.named_modules():
        if type(mod).__name__ != "LowRankLinear":
            continue
        down, up = mod.down, mod.up
        if id(down) not in names or id(up) not in names:  # already swapped for a QuantLinear
            continue
        groups.setdefault(id(down), FactorGroup(names[id(down)])).ups.append(names[id(up)])
    return list(groups.values())


@torch.no_grad()
def balance_factors_(layer: nn.Module, eps: float = 1e-12) -> int:
    """Rescale every rank direction of every group so ``down``'s row and the stacked ``up``s' column have
    the same norm (``up <- up D``, ``down <- D^-1 down``). The product, hence the float model, is unchanged
    up to rounding. Returns the number of groups balanced."""
    n = 0
    for g in factor_groups(layer):
        down = layer.get_submodule(g.down)
        ups = [layer.get_submodule(u) for u in g.ups]
        d = balance_scales(down.weight, [u.weight for u in ups], eps)
        down.weight.copy_((down.weight.float() / d[:, None]).to(down.weight.dtype))
        for u in ups:
            u.weight.copy_((u.weight.float() * d[None, :]).to(u.weight.dtype))
        n += 1
    return n


def balance_scales(down: torch.Tensor, ups: list[torch.Tensor], eps: float = 1e-12) -> torch.Tensor:
    """``D_i = sqrt(||down_i,:|| / ||[up_1; ...; up_k]_:,i||)`` (float32, length r); 1 where either is zero."""
    nd = down.float().norm(dim=1)
    nu = torch.cat([u.float() for u in ups], dim=0).norm(dim=0)
    ok = (nd > eps) & (nu > eps)
    return torch.where(ok, (nd / nu.clamp_min(eps)).sqrt(), torch.ones_like(nd))


@dataclass(frozen=True)
class BottleneckMoments:
    """``[down; Qd] h [down; Qd]^T`` in its three r x r blocks (float64): everything an up refit, its error
    check and the refit up's GPTQ Hessian need. Why: each of those used to multiply the n x n ``h`` again (six
    n^2 r products per up; for Qwen's 4864-wide down_proj ~25 s a layer in float64); this is one product, in
    float32 like the Hessian sums it reads, shared by every member of the group."""

    dd: torch.Tensor  # down h down^T
    dq: torch.Tensor  # down h Qd^T
    qq: torch.Tensor  # Qd h Qd^T

    @classmethod
    def of(cls, down: torch.Tensor, q_down: torch.Tensor, h: torch.Tensor,
           dtype: torch.dtype = torch.float32) -> BottleneckMoments:
        """``dtype``: of the n x n product (float64 for reference figures, pair_error)."""
        r = down.shape[0]
        b = torch.cat([down.to(dtype), q_down.to(dtype)], dim=0)  # 2r x n
        m = (b @ (h.to(dtype) @ b.T)).double()
        m = 0.5 * (m + m.T)
        return cls(m[:r, :r], m[:r, r:], m[r:, r:])

    def error(self, up: torch.Tensor, up_q: torch.Tensor) -> float:
        """``tr(E h E^T)``, ``E = up down - up_q Qd``, through the rank."""
        up, up_q = up.double(), up_q.double()
        return float(((up @ self.dd) * up).sum() - 2 * ((up @ self.dq) * up_q).sum() + ((up_q @ self.qq) * up_q).sum())


def refit_up(up: torch.Tensor, down: torch.Tensor | None, q_down: torch.Tensor | None, h: torch.Tensor | None,
             damp: float = 1e-6, moments: BottleneckMoments | None = None) -> torch.Tensor:
    """``argmin_up' ||(up down - up' Qd) X||_F`` with ``h ~ X X^T`` (the down's input Hessian), i.e.
    ``up (down h Qd^T)(Qd h Qd^T + damp*mean(diag) I)^-1``. Falls back to ``up`` if the (damped) solve is
    not better, so it never increases the layer's float output error on ``h``. ``moments``: the group's
    ``BottleneckMoments`` if already computed (then ``down``, ``q_down``, ``h`` are not read)."""
    mom = moments or BottleneckMoments.of(down, q_down, h)
    up64 = up.double()
    hq = mom.qq + damp * mom.qq.diagonal().mean().clamp_min(1e-30) * torch.eye(mom.qq.shape[0], dtype=torch.float64)
    try:
        new = torch.linalg.solve(hq, (up64 @ mom.dq).T).T  # solve(A, B) with A symmetric
    except torch.linalg.LinAlgError:
        return up.clone()
    if mom.error(up64, new) > mom.error(up64, up64):
        return up.clone()
    return new.to(up.dtype)


def pair_error(up_q: torch.Tensor, down_q: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
               h: torch.Tensor) -> float:
    """``tr(E h E^T)`` with ``E = up down - up_q down_q``: the pair's output error on inputs with moment ``h``,
    computed through the rank, in float64 throughout (a reference figure, not the walk's hot path)."""
    return BottleneckMoments.of(down, down_q, h, torch.float64).error(up, up_q)


class FactorPlan:
    """Per-layer choices for LoRD factors during a GPTQ walk: each factor's bit width, and (with
    ``cfg.factor_upfit``) the refit ``up`` and its Hessian once the group's ``down`` is quantized.

    ``sequential`` quantizes a layer's linears in definition order, where a group's ``down`` (on its owner)
    precedes every member's ``up``; ``weight_for`` / ``after`` are its two calls around each linear.
    """

    def __init__(self, layer: nn.Module, cfg: QuantConfig) -> None:
        self.cfg = cfg
        self.groups = factor_groups(layer)
        self.down_of = {u: g.down for g in self.groups for u in g.ups}
        self.downs = {g.down for g in self.groups}
        self._float_down: dict[str, tuple[torch.Tensor, GPTQ]] = {}  # a down's float weight and Hessian, until quantized
        self._moments: dict[str, tuple[BottleneckMoments, int]] = {}  # then its moments and sample count

    def bits(self, name: str) -> int:
        if name in self.downs and self.cfg.down_bits is not None:
            return self.cfg.down_bits
        if name in self.down_of and self.cfg.up_bits is not None:
            return self.cfg.up_bits
        return self.cfg.bits

    def weight_for(self, name: str, lin: nn.Linear, stats: dict[str, GPTQ] | None) -> torch.Tensor:
        """The weight to quantize for ``name``; with up-refit also replaces ``stats[name]``'s Hessian by the
        quantized bottleneck's (``Qd H Qd^T``, same sample count, fp32)."""
        w = lin.weight.detach()
        if not self.cfg.factor_upfit or stats is None:
            return w
        if name in self.downs:
            self._float_down[name] = (w.float().clone(), stats[name])
            return w
        down = self.down_of.get(name)
        if down is None or down not in self._moments:
            return w
        mom, n_samples = self._moments[down]
        new = refit_up(w.float(), None, None, None, moments=mom)
        stat = GPTQ(mom.qq.shape[0])
        stat.H = mom.qq.float()
        stat.n_samples = n_samples
        stats[name] = stat
        return new.to(w.dtype)

    def after(self, name: str, qw: QuantizedWeight) -> None:
        """Once a ``down`` is quantized: its group's bottleneck moments, for every member's refit (the float
        weight and the n x n Hessian are dropped then)."""
        if self.cfg.factor_upfit and name in self._float_down:
            float_down, stat = self._float_down.pop(name)
            mom = BottleneckMoments.of(float_down, qw.dequantize().float(), stat.H)
            self._moments[name] = (mom, stat.n_samples)


def rotation(rank: int, seed: int = 0) -> torch.Tensor:
    """A random orthogonal ``rank x rank`` matrix (QR of a seeded Gaussian, signs fixed so it is Haar)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(rank, rank, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


@torch.no_grad()
def rotate_factors_(layer: nn.Module, seed: int = 0) -> int:
    """``up <- up R``, ``down <- R^T down`` with a random orthogonal ``R`` per group (exact in float).

    Why: LoRD's ``up`` reads ``down x`` whose Hessian ``down G down^T`` is diagonal (the eigenbasis), so
    GPTQ's error feedback cannot help ``up`` and it is quantized like round-to-nearest; after a rotation
    that Hessian is dense and GPTQ compensates each column's rounding on the others (QuIP's incoherence,
    Chee et al. 2023). Returns the number of groups rotated."""
    n = 0
    for k, g in enumerate(factor_groups(layer)):
        down = layer.get_submodule(g.down)
        rot = rotation(down.weight.shape[0], seed + k)
        down.weight.copy_((rot.T @ down.weight.double()).to(down.weight.dtype))
        for u in g.ups:
            up = layer.get_submodule(u)
            up.weight.copy_((up.weight.double() @ rot).to(up.weight.dtype))
        n += 1
    return n
