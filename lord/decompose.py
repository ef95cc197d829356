"""Factor one group ``W`` (m x n) reading inputs with Gram ``G = X^T X``: every method gives ``W_hat = U_r U_r^T W``.

* ``lord``   (Kaushal et al. 2023, Sec. 3): ``U`` = eigenvectors of the output covariance ``C = W G W^T``.
  Eckart-Young on ``Y = X W^T``: the best rank-r output for calibration data, with no inverse of ``G``.
* ``svd``    plain truncated SVD of ``W``: ``U`` = left singular vectors of ``W`` (ignores the data).
* ``whiten`` SVD-LLM (Wang et al. 2024, Sec. 3.1): SVD of ``W L`` with ``L L^T = G + d I`` (Cholesky, damped by
  ``d = damping * mean(diag G)``); its truncation ``U_r S_r V_r^T L^-1`` equals ``U_r U_r^T W``, with ``U`` the
  eigenvectors of ``W (G + d I) W^T``: whitening is LoRD on a damped Gram, identical as ``d -> 0``.

So ``up = U_r`` (split per member) and ``down = U_r^T W`` for all three, and the calibration output error of
any rank is ``tr(C) - sum_{i<=r} u_i^T C u_i`` (``U`` orthonormal), computed once per group for all ranks.
Each problem is solved on the smaller side, ``O(min(m,n)^2 max(m,n))``: for ``m <= n`` an m x m
eigenproblem, for ``m > n`` an n x n one on ``R0^T W^T W R0`` with ``R0 R0^T`` = the method's Gram
(then ``U = W R0 V Lambda^-1/2``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lord.errors import LordError

METHODS = ("lord", "svd", "whiten")


@dataclass
class Factorization:
    """A group's ordered basis and the calibration output energy each basis vector captures.

    ``tall`` (m > n): the basis is ``U = W @ transform`` (transform n x k); otherwise ``U = transform`` (m x k).
    """

    method: str
    tall: bool
    transform: torch.Tensor
    captured: torch.Tensor  # k, float64: u_i^T C u_i
    total: float  # tr(C) = ||X W^T||_F^2

    @property
    def max_rank(self) -> int:
        return self.transform.shape[1]

    def error_curve(self) -> torch.Tensor:
        """Relative squared output error ``||X(W - W_hat)^T||^2 / ||X W^T||^2`` for ranks 0..k (float64)."""
        if self.total <= 0:
            return torch.zeros(self.max_rank + 1, dtype=torch.float64)
        kept = torch.cat([torch.zeros(1, dtype=torch.float64), self.captured.cumsum(0)])
        return (1.0 - kept / self.total).clamp_min(0.0)

    def factors(self, w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up, down)`` = ``(U_r, U_r^T W)``: m x r and r x n, float32."""
        if not 1 <= rank <= self.max_rank:
            raise LordError(f"rank {rank} is outside [1, {self.max_rank}] for this group")
        w = w.float()
        t = self.transform[:, :rank].float()
        up = w @ t if self.tall else t
        return up, up.T @ w


def factorize(w: torch.Tensor, gram: torch.Tensor, methods: tuple[str, ...] = ("lord",),
              damping: float = 0.01, side: str = "input",
              input_trace: float | None = None) -> dict[str, Factorization]:
    """Factorizations of ``w`` (m x n) for each of ``methods``, sharing work.

    ``gram`` is the input Gram ``G`` (n x n, ``side="input"``) or, for a narrowing group (m <= n), the output
    covariance ``C = W G W^T`` itself (m x m, ``side="output"``, lord/stats.py); whitening's damping then
    needs ``input_trace = tr(G)``.
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LordError(f"unknown decomposition method(s) {unknown}; expected some of {METHODS}")
    if damping < 0:
        raise LordError(f"damping must be >= 0, got {damping}")
    m, n = w.shape
    w32 = w.detach().float()
    if side == "output":
        if gram.shape != (m, m) or m > n:
            raise LordError(f"output covariance has shape {tuple(gram.shape)} but the group's weight is {m} x {n} "
                            "(output statistics need m x m and m <= n): statistics were collected on a "
                            "different model or group")
        if "whiten" in methods and input_trace is None:
            raise LordError("whitening from output statistics needs input_trace = tr(X^T X) for its damping")
        c = gram.detach().to(torch.float64)
        delta = damping * float(input_trace) / n if "whiten" in methods else 0.0
        return _wide(w32, 0.5 * (c + c.T), methods, delta)
    if side != "input":
        raise LordError(f"statistics side {side!r} is unknown; expected 'input' or 'output'")
    if gram.shape != (n, n):
        raise LordError(f"Gram has shape {tuple(gram.shape)} but the group's weight is {m} x {n}: "
                        "statistics were collected on a different model or group")
    g = gram.detach().to(torch.float64)
    g = 0.5 * (g + g.T)
    delta = damping * float(g.diagonal().mean()) if "whiten" in methods else 0.0
    if m <= n:
        c = (w32 @ g.float()).double() @ w32.double().T  # the big product in fp32
        return _wide(w32, 0.5 * (c + c.T), methods, delta)
    return _tall(w32, g, methods, delta)


def _wide(w: torch.Tensor, c: torch.Tensor, methods: tuple[str, ...], delta: float) -> dict[str, Factorization]:
    """m <= n: eigenproblems on m x m matrices, given the output covariance ``C`` (float64, symmetric)."""
    w64 = w.double()
    total = float(c.trace())
    out = {}
    for method in methods:
        if method == "lord":
            b = c
        elif method == "svd":
            b = w64 @ w64.T
        else:  # whiten: W (G + d I) W^T
            b = c + delta * (w64 @ w64.T)
        u = _top_eigvecs(b)
        captured = ((u.T @ c) * u.T).sum(1).clamp_min(0.0)
        out[method] = Factorization(method, False, u.float(), captured, total)
    return out


def _tall(w: torch.Tensor, g: torch.Tensor, methods: tuple[str, ...], delta: float) -> dict[str, Factorization]:
    """m > n: n x n problems on ``R0^T (W^T W) R0`` with ``R0 R0^T`` the method's Gram (or I for svd)."""
    wtw = (w.T @ w).double()
    wtw = 0.5 * (wtw + wtw.T)
    total = float((wtw * g).sum())
    n = g.shape[0]
    out = {}
    for method in methods:
        if method == "lord":
            evals, q = torch.linalg.eigh(g)
            r0 = q * evals.clamp_min(0.0).sqrt()
        elif method == "svd":
            r0 = torch.eye(n, dtype=torch.float64)
        else:
            gd = g + delta * torch.eye(n, dtype=torch.float64)
            r0, info = torch.linalg.cholesky_ex(gd)
            if int(info) != 0:
                raise LordError(f"whitening: G + {delta:.3g} I is not positive definite; raise `damping`")
        k = r0.T @ wtw @ r0
        lam, v = torch.linalg.eigh(0.5 * (k + k.T))
        lam, v = lam.flip(0), v.flip(1)
        floor = lam[0].clamp_min(1e-300) * 1e-12
        transform = r0 @ v / lam.clamp_min(floor).sqrt()  # U = W @ transform has orthonormal columns
        a = wtw @ transform  # W^T U
        captured = ((g @ a) * a).sum(0).clamp_min(0.0)
        out[method] = Factorization(method, True, transform.float(), captured, total)
    return out


def _top_eigvecs(b: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric matrix, largest eigenvalue first."""
    _, v = torch.linalg.eigh(0.5 * (b + b.T))
    return v.flip(1)


def output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    """Relative squared calibration output error ``tr(D G D^T) / tr(W G W^T)``, ``D = W - W_hat`` (a check)."""
    g = gram.double()
    d = (w - w_hat).double()
    return float(((d @ g) * d).sum() / ((w.double() @ g) * w.double()).sum())
