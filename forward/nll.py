"""Next-token negative log-likelihood: the one definition every loss and perplexity in the pipeline uses.

Position ``j`` of the logits predicts token ``j + 1``; the NLL of a batch is the *sum* over scored tokens with
the count beside it, so batches of any size combine token-weighted (mean = sum / n, never a mean of means).
Logits are promoted to float32 first (bf16 log-softmax over a 150k vocabulary loses digits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from forward.errors import ForwardError


@dataclass(frozen=True)
class NLL:
    """Summed next-token NLL (nats) over ``n_tokens`` scored tokens."""

    sum: float = 0.0
    n_tokens: int = 0

    @property
    def mean(self) -> float:
        if self.n_tokens == 0:
            raise ForwardError("mean NLL of zero scored tokens; score at least one sequence of length >= 2")
        return self.sum / self.n_tokens

    def __add__(self, other: NLL) -> NLL:
        return NLL(self.sum + other.sum, self.n_tokens + other.n_tokens)


def check_ids(ids: torch.Tensor, what: str = "token ids") -> None:
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ForwardError(f"{what} have shape {tuple(ids.shape)}; expected [n_seqs, seq_len >= 2]")


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per-position NLL ``[B, L-1]`` (float32, differentiable) of ``ids[:, 1:]`` under ``logits[:, :-1]``."""
    check_ids(ids)
    return _aligned_nll(logits[:, :-1], ids[:, 1:])


def _aligned_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    lg = logits.float()
    tgt = targets.to(lg.device)
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none").view(tgt.shape)


def nll(logits: torch.Tensor, ids: torch.Tensor) -> NLL:
    """Summed NLL of every next token of ``ids`` [B, L] under ``logits`` [B, L, V]."""
    t = token_nll(logits, ids)
    return NLL(float(t.double().sum()), t.numel())


def head_nll(head: nn.Module, normed: torch.Tensor, ids: torch.Tensor) -> NLL:
    """NLL from final-normed hidden states, forming logits one sequence at a time (150k vocab x 2k tokens is
    1 GB of logits per sequence)."""
    total = NLL()
    for i in range(normed.shape[0]):
        t = _aligned_nll(head(normed[i:i + 1, :-1]), ids[i:i + 1, 1:])
        total = total + NLL(float(t.double().sum()), t.numel())
    return total
