"""The ``search`` rank plan: the cut per group *type* chosen by measured calibration loss.

Why: per-group proxies mispredict which layers can be cut. On Qwen2.5-Coder-0.5B at -20% parameters
(bench/results/lord.json) the uniform plan (every group at the same fraction of its parity rank) reached held-out
ppl 29.0 while the Fisher-weighted ``auto`` plan reached 52.4 and the unweighted spectrum 128: both spared the
attention projections, which the uniform plan cuts hardest and which turn out cheap. So start from uniform and
let the model say how much deeper or shallower each type (q/k/v, o, gate/up, down) should go.

Plan family: group ``g`` of type ``t`` gets ``r_g = floor(parity_g * (1 - c_t (1 - f)))`` (clipped to
``[1, max_factored_rank]``; ``c_t = 0``: the type stays dense); ``c_t = 1`` everywhere is ``uniform``. For a
multiplier vector ``c`` the fraction ``f`` is found by bisection so the parameter target is met; ``c`` is chosen
by coordinate descent (each type in turn, a few multipliers, keep what lowers the loss) on the mean next-token
loss of a calibration batch, evaluated with every group truncated at once (interactions included: the loss of the whole cut, not a sum of probes).
Each evaluation is one forward: the factors are computed once at the largest rank and sliced per candidate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from tqdm.auto import tqdm

from forward import NLL, nll
from lord.decompose import Factorization
from lord.errors import LordError
from lord.ranks import max_factored_rank, parity_fraction_ranks
from lord.surgery import Group, stacked_weight

# 0 leaves the type dense: near parity a factored group has paid its cut to parity without saving a parameter,
# so a small target is cheaper in fewer types cut deeper (trimmed 0.5B at 2.5%: all groups ppl 8.382, down_proj
# only 7.854; bench/results/speed_plan.json), which no positive multiplier can express
MULTIPLIERS = (0.0, 0.5, 0.75, 1.5, 2.0)
# the same reasoning within a type: the parameters come from the least sensitive share of the groups, cut deeper.
# Trimmed 0.5B, 2.5% in down_proj (dense 6.957): uniform over all 24 layers 7.854; over the 18 / 12 / 8 / 6 / 4 with
# the lowest Fisher weight 7.416 / 7.322 / 7.253 / 7.242 / 7.338; the Fisher-weighted ``auto`` plan 7.381
# (bench/results/lord_share.json). The loss evaluations pick the share.
SUBSET_FRACTIONS = (0.5, 1 / 3, 0.25)


class _Sliced(nn.Module):
    """A group member computing ``up[:, :r] @ (down[:r] @ x)`` at the group's current rank (None = dense)."""

    def __init__(self, dense: nn.Linear, up: torch.Tensor, down: torch.Tensor, state: dict) -> None:
        super().__init__()
        self.dense, self.up_full, self.down_full, self.state = dense, up, down, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.state["rank"]
        if r is None:
            return self.dense(x)
        return F.linear(F.linear(x, self.down_full[:r]), self.up_full[:, :r], self.dense.bias)


def group_type(group: Group) -> str:
    """The group's registry kind (qkv, o, gate_up, down, ...; forward/arch.py); a hand-made group is its own type."""
    return group.kind or group.name


def least_sensitive_ranks(groups: list[Group], weights: Mapping[str, float], target: float,
                          fractions: tuple[float, ...] = SUBSET_FRACTIONS) -> dict[str, dict[str, int | None]]:
    """``{label: ranks}``: for each fraction, the uniform plan over that share of the groups with the lowest
    sensitivity weight (the rest dense), when that share can meet ``target``. Ties keep the groups' order."""
    out: dict[str, dict[str, int | None]] = {}
    for frac in fractions:
        share = least_sensitive(groups, weights, frac)
        if len(share) >= len(groups):
            continue
        sub = parity_fraction_ranks(share, target)
        if sub is not None:
            out[f"least-sensitive {len(share)}/{len(groups)}"] = {g.name: sub.get(g.name) for g in groups}
    return out


def least_sensitive(groups: list[Group], weights: Mapping[str, float], fraction: float) -> list[Group]:
    """The ``ceil(fraction * len(groups))`` groups with the lowest sensitivity weight (ties keep their order)."""
    k = max(1, math.ceil(fraction * len(groups)))
    return sorted(groups, key=lambda g: weights.get(g.name, math.inf))[:k]


def type_ranks(groups: list[Group], mult: Mapping[str, float], target: float) -> dict[str, int | None] | None:
    """Ranks for multipliers ``mult`` (type -> c_t) meeting ``target`` removed parameters, or None if unreachable."""
    return parity_fraction_ranks(groups, target, {g.name: mult[group_type(g)] for g in groups})


@torch.no_grad()
def search_plan(model: nn.Module, groups: list[Group], facts: Mapping[str, Factorization], ids: torch.Tensor,
                target: float, multipliers: tuple[float, ...] = MULTIPLIERS, passes: int = 2,
                batch_size: int = 4, progress: bool = True,
                candidates: Mapping[str, Mapping[str, int | None]] | None = None,
                validation_ids: torch.Tensor | None = None,
                validate_top: int = 3) -> tuple[dict[str, int | None], dict]:
    """Ranks meeting ``target`` removed parameters with the lowest measured loss on ``ids`` among the plan family
    and any other ``candidates`` (label -> ranks, e.g. the Fisher-weighted ``auto`` plan, which won on
    smollm2-135m); the model is restored before returning. Also returns a report (chosen plan, multipliers,
    losses, evaluations, seconds). With ``validation_ids`` the ``validate_top`` finalists (among uniform, the best
    per-type plan and each candidate) with the lowest loss are re-scored on that independent batch and the lowest
    there wins: the best of ~34 plans on one batch is optimistically scored (winner's curse), and on
    qwen2.5-coder-0.5b it did not transfer."""
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise LordError(f"search ids have shape {tuple(ids.shape)}; expected [n_seqs, seq_len >= 2]")
    t0 = time.perf_counter()
    types = list(dict.fromkeys(group_type(g) for g in groups))
    mult = {t: 1.0 for t in types}
    start = type_ranks(groups, mult, target)
    if start is None:
        raise LordError(f"{target:.3g} parameters cannot be removed from the targeted groups")
    states, originals = {}, {}
    try:
        for g in tqdm(groups, desc="search: factors", disable=not progress):
            w, _ = stacked_weight(model, g)
            rmax = min(max_factored_rank(g.m, g.n), facts[g.name].max_rank)
            state = states[g.name] = {"rank": None}
            if rmax < 1:
                continue
            up, down = facts[g.name].factors(w, rmax)
            dtype = model.get_submodule(g.members[0]).weight.dtype
            down = down.to(dtype)
            for member, u in zip(g.members, torch.split(up.to(dtype), list(g.out_features), dim=0), strict=True):
                parent, _, attr = member.rpartition(".")
                dense = model.get_submodule(member)
                originals[member] = dense
                setattr(model.get_submodule(parent), attr, _Sliced(dense, u, down, state))

        memo: dict[tuple, float] = {}

        def loss(ranks: Mapping[str, int | None], batch: torch.Tensor = ids) -> float:
            key = (id(batch), tuple(sorted(ranks.items())))
            if key not in memo:  # one type's multipliers all give its uniform plan: measured once
                memo[key] = _loss(ranks, batch)
            return memo[key]

        def _loss(ranks: Mapping[str, int | None], batch: torch.Tensor) -> float:
            for name, r in ranks.items():
                states[name]["rank"] = r
            device = next(model.parameters()).device
            total = NLL()
            for i in range(0, batch.shape[0], batch_size):
                x = batch[i:i + batch_size].to(device)
                total = total + nll(model(input_ids=x, use_cache=False).logits, x)
            return total.mean

        best_ranks, best = start, loss(start)
        history: list[dict] = [{"multipliers": dict(mult), "loss": best}]
        bar = tqdm(total=passes * len(types) * len(multipliers), desc="search: plans", disable=not progress)
        for _ in range(passes):
            improved = False
            for t in types:
                base = dict(mult)
                for m in multipliers:
                    bar.update(1)
                    cand = {**base, t: base[t] * m}
                    if cand == base:  # a dense type stays dense under every multiplier
                        continue
                    ranks = type_ranks(groups, cand, target)
                    if ranks is None:
                        continue
                    value = loss(ranks)
                    history.append({"multipliers": cand, "loss": value})
                    if value < best:
                        best, best_ranks, mult, improved = value, ranks, cand, True
                bar.set_postfix(loss=f"{best:.4f}")
            if not improved:
                break
        bar.close()
        chosen = "types" if len(history) > 1 and best < history[0]["loss"] else "uniform"
        finalists = {"uniform": start, **({"types": best_ranks} if chosen == "types" else {})}
        scores = {"uniform": history[0]["loss"], "types": best}
        for label, ranks in (candidates or {}).items():
            value = loss(ranks)
            history.append({"candidate": label, "loss": value})
            finalists[label], scores[label] = dict(ranks), value
            if value < best:
                best, best_ranks, chosen = value, dict(ranks), label
        validation = {}
        if validation_ids is not None and len(finalists) > 1:
            # the few best on the search batch: each re-score is a forward of the model (~20 s on the 0.5B)
            top = sorted(finalists, key=lambda label: scores[label])[:validate_top]
            validation = {label: loss(finalists[label], validation_ids) for label in top}
            chosen = min(validation, key=validation.get)
            best_ranks = finalists[chosen]
    finally:
        for member, dense in originals.items():
            parent, _, attr = member.rpartition(".")
            setattr(model.get_submodule(parent), attr, dense)
    report = {"method": "search", "chosen": chosen, "multipliers": mult, "loss": scores[chosen],
              "loss_uniform": history[0]["loss"], "validation_loss": validation, "evaluations": len(memo),
              "n_tokens": int(ids.numel()), "history": history, "seconds": time.perf_counter() - t0}
    return best_ranks, report
