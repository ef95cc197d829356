"""Error-compensating factors for one group: a rank-r map from the *compressed* model's inputs to the *dense*
model's outputs (a reduced-rank regression, ``min ||T w^T - T' A^T||_F`` over rank-r ``A``).

Sequential decomposition (lord/sequential.py) walks the model layer by layer: group ``g`` of layer ``i`` sees
``T'`` = its inputs in the model whose groups before it are already factored, and its target is ``T w^T`` with
``T`` its inputs in the dense model. Everything here reads three second moments of the paired tokens
(``PairMoments``): ``T^T T``, ``T^T T'`` and ``T'^T T'``, in one of two spaces (lord/stats.py ``stat_side``):
the input space (``T = X``, ``w = W``) or, for a single narrowing linear, the output space (``T = X W^T``,
``w = I``; the ``down`` factor is then multiplied by ``W``), where the moments are m x m instead of n x n.

Candidates, each giving ``A = up @ down`` (m x d):
* ``parallel``: LoRD on the dense Gram (today's one-shot; the reference every other candidate must beat);
* ``stats``: LoRD on the compressed Gram ``T'^T T'`` (target ``w T'``: "sequential statistics");
* ``project``: ``A = U U^T w`` with ``U`` the top eigenvectors of ``w (K + K^T - G') w^T`` (``K = T^T T'``,
  ``G' = T'^T T'``): the best *projection* of ``w`` for the dense target; ``||T w^T - T' w^T P||^2 =
  const - tr(P w (K + K^T - G') w^T)``. No inverse, so nothing is amplified;
* ``*+up``: keep that candidate's bottleneck ``down = U^T w`` and refit ``up`` by ridge regression of the dense
  target on the r bottleneck activations ``Z = T' down^T``: an r x r solve on the captured (top) directions
  only, shrunk toward ``U``;
* ``ridge-a``: the full regression ``B = (w K + lam w)(G' + lam I)^-1`` shrunk toward ``w`` (``lam = a tr(G')/d``),
  then its best rank-r approximation in the ``G' + lam I`` metric (exact minimiser of the ridge objective over
  rank r). A plain least-squares refit (small ``a``) inverts ``G'`` and amplifies its low-variance directions:
  measured worse end to end (shared/DESIGN.md), hence the shrinkage and the selection below.
``compensate`` fits every candidate on one split of the tokens and keeps the one with the lowest dense-target
error on a held-out split, so it is never worse than ``parallel`` there (up to the split's noise), then refits
the winner on all tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lord.errors import LordError

RIDGE_ALPHAS = (1e-2, 1e-1, 1.0)
UP_ALPHA = 1e-3


@dataclass
class PairMoments:
    """Second moments of paired dense / compressed rows ``T``, ``T'`` (N x d) of one group, float64."""

    target: torch.Tensor  # T^T T
    cross: torch.Tensor  # T^T T'
    compressed: torch.Tensor  # T'^T T'
    n_tokens: int

    @classmethod
    def of(cls, t: torch.Tensor, t_c: torch.Tensor) -> PairMoments:
        if t.shape != t_c.shape or t.ndim != 2:
            raise LordError(f"paired rows must have one shape [N, d]; got {tuple(t.shape)} and {tuple(t_c.shape)}")
        if t.dtype not in (torch.float32, torch.float64):
            t, t_c = t.float(), t_c.float()  # fp32 GEMMs (as lord/stats.py); fp64 rows stay fp64
        t_c = t_c.to(t.dtype)
        return cls((t.T @ t).double(), (t.T @ t_c).double(), (t_c.T @ t_c).double(), t.shape[0])

    def __add__(self, other: PairMoments) -> PairMoments:
        return PairMoments(self.target + other.target, self.cross + other.cross,
                           self.compressed + other.compressed, self.n_tokens + other.n_tokens)


def top_basis(w: torch.Tensor, m_sym: torch.Tensor, rank: int,
              qr: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Orthonormal ``U`` (m x rank): top eigenvectors of ``w M w^T`` for any symmetric ``M`` (d x d), solved on
    the smaller side (for m > d via ``w = Q R``: eigenvectors ``Q V`` with ``V`` those of ``R M R^T``; pass
    ``qr`` to reuse one factorization of ``w``)."""
    m, d = w.shape
    m_sym = 0.5 * (m_sym + m_sym.T)
    if m <= d:
        c = w @ m_sym @ w.T
        _, v = torch.linalg.eigh(0.5 * (c + c.T))
        return v.flip(1)[:, :rank]
    q, r = qr if qr is not None else torch.linalg.qr(w)
    c = r @ m_sym @ r.T
    _, v = torch.linalg.eigh(0.5 * (c + c.T))
    return q @ v.flip(1)[:, :rank]


def candidate_names(ridge_alphas: tuple[float, ...] = RIDGE_ALPHAS) -> tuple[str, ...]:
    base = ("parallel", "stats", "project")
    return (*base, *(f"{b}+up" for b in base), *(f"ridge-{a:g}" for a in ridge_alphas))


def fit_candidate(w: torch.Tensor, mom: PairMoments, rank: int, name: str, up_alpha: float = UP_ALPHA,
                  bases: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` (m x r, r x d, float64) of candidate ``name`` (module docstring), fitted on ``mom``;
    ``bases`` memoises the eigenbases shared by a candidate and its ``+up`` variant (same ``mom``)."""
    if not 1 <= rank <= min(w.shape):
        raise LordError(f"rank {rank} is outside [1, {min(w.shape)}] for a {tuple(w.shape)} map")
    w = w.double()
    g_c, k = mom.compressed, mom.cross
    if name.startswith("ridge-"):
        d = w.shape[1]
        lam = float(name[len("ridge-"):]) * float(g_c.diagonal().sum()) / d
        metric = g_c + lam * torch.eye(d, dtype=torch.float64)
        b = torch.linalg.solve(metric, (w @ k + lam * w).T).T  # (w K + lam w)(G' + lam I)^-1, G' symmetric
        u = top_basis(b, metric, rank)
        return u, u.T @ b
    base, _, refit = name.partition("+")
    grams = {"parallel": mom.target, "stats": g_c, "project": k + k.T - g_c}
    if base not in grams or refit not in ("", "up"):
        raise LordError(f"unknown compensation candidate {name!r}; expected one of {candidate_names()}")
    bases = {} if bases is None else bases
    if base not in bases:
        if w.shape[0] > w.shape[1] and "_qr" not in bases:
            bases["_qr"] = torch.linalg.qr(w)
        bases[base] = top_basis(w, grams[base], rank, bases.get("_qr"))
    u = bases[base]
    down = u.T @ w
    return (refit_up(w, mom, u, down, up_alpha) if refit else u), down


def refit_up(w: torch.Tensor, mom: PairMoments, u: torch.Tensor, down: torch.Tensor, alpha: float) -> torch.Tensor:
    """``up`` minimising ``||T w^T - Z up^T||^2 + mu ||up - U||^2`` with ``Z = T' down^T`` (r columns), ``mu = alpha
    tr(Z^T Z) / r``: ``up = (w K down^T + mu U)(down G' down^T + mu I)^-1``."""
    zz = down @ mom.compressed @ down.T
    mu = alpha * float(zz.diagonal().sum()) / zz.shape[0]
    rhs = w @ mom.cross @ down.T + mu * u
    return torch.linalg.solve(zz + mu * torch.eye(zz.shape[0], dtype=zz.dtype), rhs.T).T


def dense_target_error(w: torch.Tensor, mom: PairMoments, up: torch.Tensor, down: torch.Tensor) -> float:
    """Relative squared error ``||T w^T - T' down^T up^T||^2 / ||T w^T||^2`` from the moments alone."""
    w = w.double()
    total = float(((w @ mom.target) * w).sum())
    wk_d = w @ mom.cross @ down.T  # m x r
    zz = down @ mom.compressed @ down.T
    err = total - 2 * float((wk_d * up).sum()) + float(((up @ zz) * up).sum())
    return max(err, 0.0) / total if total > 0 else 0.0


@dataclass
class Compensation:
    up: torch.Tensor  # m x r (float32)
    down: torch.Tensor  # r x d (float32): multiply by W for the output space
    chosen: str
    val_error: dict[str, float]  # candidate -> relative dense-target error on the held-out split


def compensate(w: torch.Tensor, fit: PairMoments, val: PairMoments, rank: int,
               ridge_alphas: tuple[float, ...] = RIDGE_ALPHAS, up_alpha: float = UP_ALPHA,
               allowed: tuple[str, ...] | None = None) -> Compensation:
    """Fit every candidate on ``fit``, keep the lowest dense-target error on ``val``, refit it on both splits.

    ``allowed`` restricts the candidates (e.g. ``("stats",)`` for plain sequential statistics)."""
    names = allowed if allowed is not None else candidate_names(ridge_alphas)
    bases: dict = {}
    errors = {name: dense_target_error(w, val, *fit_candidate(w, fit, rank, name, up_alpha, bases))
              for name in names}
    chosen = min(errors, key=errors.get)
    reuse = {"_qr": bases["_qr"]} if "_qr" in bases else {}  # the QR of w only: the moments change
    up, down = fit_candidate(w, fit + val, rank, chosen, up_alpha, reuse)
    return Compensation(up.float(), down.float(), chosen, errors)
