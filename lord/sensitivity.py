"""Measured per-group sensitivity: how much LM loss one group's truncation costs, to weight its error curve.

The spectrum plan minimises ``sum_g e_g(r_g)`` (normalised calibration output error), but equal output error
does not cost equal loss across groups (shared/DESIGN.md: cost per removed parameter differs ~5x between group
types; bench/results/lord.json: the unweighted plan loses to uniform). Loss probe (cf. the layer-wise
sensitivity scans of Dong et al. 2019 "HAWQ" and of LLM-Pruner, Ma et al. 2023, Sec. 3.2, measured here
instead of Taylor-approximated): for each group alone, replace its weight by the rank-``r_p`` factorization
``U_r U_r^T W`` (decompose.py), measure the increase ``Delta_g`` of the mean next-token loss on a small
calibration batch, restore the dense weight. With ``e_g`` the group's normalised error curve, the predicted
loss cost of rank ``r`` is ``w_g e_g(r)``, ``w_g = Delta_g / e_g(r_p)`` (first order in the output
perturbation energy, one point per group); the ``auto`` plan minimises ``sum_g w_g e_g(r_g)``
(lord/plans.py). The default weights are the cheaper ``fisher_sensitivities`` (one backward), which measured
far better than these probes on smollm2-135m (lord/plans.py): probe deltas are ~0.01 nats, near their noise.
Probe cost: one forward of the unmodified model, then per group only the layers from the group's
decoder layer on (their inputs are cached), so on average half a forward per probe.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from forward import all_layer_inputs, nll_from, token_nll
from lord.decompose import Factorization
from lord.errors import LordError
from lord.ranks import max_factored_rank
from lord.surgery import Group, model_type, stacked_weight

DELTA_FLOOR = 1e-3  # fraction of the largest probe loss increase given to groups whose probe cost ~nothing


@dataclass(frozen=True)
class Sensitivity:
    """Measured sensitivities: ``groups`` maps each group to its numbers (``weight`` = ``w_g`` plus how it was
    measured), ``meta`` how the pass ran (method, n_tokens, seconds, ...), kept apart so the per-group dict
    holds groups only."""

    groups: dict[str, dict[str, float]]
    meta: dict[str, Any]

    @property
    def weights(self) -> dict[str, float]:
        """``{group: w_g}``, the auto plan's weights."""
        return {k: float(v["weight"]) for k, v in self.groups.items()}

    @property
    def seconds(self) -> float:
        return float(self.meta["seconds"])

    def to_json(self) -> dict[str, Any]:
        """The file layout (sensitivity.json, bench/results/lord_sensitivity_*.json): ``{"_meta": meta, **groups}``."""
        return {"_meta": self.meta, **self.groups}


class _LayerTail:
    """Inputs of every decoder layer from one forward, to rerun the model from layer ``i`` on (``loss_from``)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor):
        model_type(model)  # LordError for an unsupported family
        self.model = model
        self.inputs = all_layer_inputs(model, ids)
        last = len(self.inputs) - 1
        self.dense_loss = nll_from(model, self.inputs[last], last).mean

    def loss_from(self, layer: int) -> float:
        """Mean next-token loss with layers ``layer..`` as they are now, on the dense inputs of ``layer``."""
        return nll_from(self.model, self.inputs[layer], layer).mean


def probe_rank(group: Group, fact: Factorization, fraction: float) -> int:
    """``round(fraction * max_factored_rank)``, at least 1 and within the factorization's ranks."""
    return max(1, min(fact.max_rank, max_factored_rank(group.m, group.n), round(fraction * max_factored_rank(
        group.m, group.n))))


@torch.no_grad()
def probe_sensitivities(model: nn.Module, groups: list[Group], facts: Mapping[str, Factorization],
                        ids: torch.Tensor, probe_fraction: float = 0.5,
                        progress: bool = True) -> Sensitivity:
    """Per group: ``probe_rank``, ``probe_error`` (= e_g(r_p)), ``delta_loss`` (raw), ``weight`` (= w_g).

    The model is left exactly as given (each group's dense weights are restored after its probe).
    """
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise LordError(f"sensitivity ids have shape {tuple(ids.shape)}; expected [n_seqs, seq_len >= 2]")
    if not 0 < probe_fraction <= 1:
        raise LordError(f"probe_fraction must be in (0, 1], got {probe_fraction}")
    if any(g.layer < 0 for g in groups):
        raise LordError("probe groups must come from find_groups (they carry their decoder layer index)")
    missing = [g.name for g in groups if g.name not in facts]
    if missing:
        raise LordError(f"no factorization for groups {missing[:3]} ({len(missing)} missing); "
                        "factorize every group first (model_ops.factorize_groups)")
    t0 = time.perf_counter()
    tail = _LayerTail(model, ids.to(next(model.parameters()).device))
    out: dict[str, dict[str, float]] = {}
    for g in tqdm(groups, desc="sensitivity probes", disable=not progress):
        f = facts[g.name]
        r = probe_rank(g, f, probe_fraction)
        mods = [model.get_submodule(m) for m in g.members]
        dense = [m.weight.detach().clone() for m in mods]
        w, _ = stacked_weight(model, g)
        up, down = f.factors(w, r)
        try:
            for mod, part in zip(mods, torch.split(up @ down, list(g.out_features), dim=0), strict=True):
                mod.weight.copy_(part.to(mod.weight.dtype))
            loss = tail.loss_from(g.layer)
        finally:
            for mod, wd in zip(mods, dense, strict=True):
                mod.weight.copy_(wd)
        out[g.name] = {"probe_rank": r, "probe_error": float(f.error_curve()[r]),
                       "delta_loss": loss - tail.dense_loss}
    if not all(torch.isfinite(torch.tensor(v["delta_loss"])) for v in out.values()):
        raise LordError("a sensitivity probe gave a non-finite loss; check the model and calibration ids")
    floor = DELTA_FLOOR * max([v["delta_loss"] for v in out.values()] + [1e-12])
    for v in out.values():
        v["weight"] = max(v["delta_loss"], floor) / max(v["probe_error"], 1e-12)
    meta = {"method": "probe", "dense_loss": tail.dense_loss, "probe_fraction": probe_fraction, "n_tokens": int(ids.numel()),
            "seconds": time.perf_counter() - t0}
    del tail
    return Sensitivity(out, meta)


def weights_of(sens: Sensitivity | Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``{group: w_g}`` of a ``Sensitivity``, or of its file layout (``to_json``; the ``_meta`` entry dropped)."""
    if isinstance(sens, Sensitivity):
        return sens.weights
    return {k: float(v["weight"]) for k, v in sens.items() if not k.startswith("_")}


def fisher_sensitivities(model: nn.Module, groups: list[Group], facts: Mapping[str, Factorization],
                         ids: torch.Tensor, batch_size: int = 4,
                         progress: bool = True) -> Sensitivity:
    """Cheaper alternative to the probes: one backward, ``w_g = E||dL/dY_g||^2 / m_g * tr(C_g)``.

    Second order in the output perturbation with an isotropic empirical Fisher per group (cf. the
    Fisher-weighted SVD of Hsu et al. 2022, Sec. 3, taken per group instead of per weight row): a rank-r
    truncation with normalised error ``e`` perturbs the outputs by energy ``e tr(C)`` and costs ~
    ``E||g||^2 / m`` per unit energy.
    """
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise LordError(f"sensitivity ids have shape {tuple(ids.shape)}; expected [n_seqs, seq_len >= 2]")
    t0 = time.perf_counter()
    energy = {g.name: 0.0 for g in groups}
    owner = {m: g.name for g in groups for m in g.members}

    def add(name: str, grad: torch.Tensor) -> None:
        energy[name] += float(grad.double().square().sum())

    def on_output(name: str):
        def fwd(_module, _args, out):
            out.register_hook(lambda grad: add(name, grad))
        return fwd

    # no weight gradients (no 4-bytes-per-parameter buffers): make the embedding output the leaf instead
    handles = [model.get_submodule(m).register_forward_hook(on_output(n)) for m, n in owner.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_()))
    requires = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    n_batches = 0
    try:
        for p in requires:
            p.requires_grad_(False)
        with torch.enable_grad():
            for i in tqdm(range(0, ids.shape[0], batch_size), desc="fisher", disable=not progress):
                x = ids[i:i + batch_size].to(device)
                loss = token_nll(model(input_ids=x, use_cache=False).logits, x).mean()
                loss.backward()
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for p, r in requires.items():
            p.requires_grad_(r)
    out: dict[str, dict[str, float]] = {}
    for g in groups:
        e = energy[g.name] / n_batches
        out[g.name] = {"grad_energy": e, "output_energy": facts[g.name].total,
                       "weight": e / g.m * facts[g.name].total}
    top = max(v["weight"] for v in out.values())
    for v in out.values():
        v["weight"] = max(v["weight"], DELTA_FLOOR * top, 1e-30)
    meta = {"method": "fisher", "n_tokens": int(ids.numel()), "seconds": time.perf_counter() - t0}
    return Sensitivity(out, meta)
