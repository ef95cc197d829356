"""Sequential (error-compensating) decomposition: factor the model layer by layer, each group fitted on the
inputs the *already compressed* model gives it, toward the *dense* model's output (lord/regression.py).

Why: the one-shot (``parallel``) decomposition takes every group's statistics from the dense model, so each
group is fitted to inputs it will never see once the groups before it are cut; their errors compound. Here
two streams walk the decoder (forward toolkit, like GPTQ's sequential quantization): the dense stream gives
each group's dense inputs ``X`` and so its target ``X W^T``; the compressed stream runs the layers as factored
so far. Within a layer the groups are taken in forward order (q/k/v, o, gate/up, down), so ``o_proj`` already
sees the error of the factored q/k/v. A group's compressed inputs are captured by running the partly
factored layer only up to that group (a hook stops the forward there).

Modes: ``stats`` = plain LoRD on the compressed inputs' statistics (measured 0.91x the one-shot ppl increase,
shared/DESIGN.md); ``compensate`` = the best of lord/regression.py's candidates per group on held-out
calibration sequences (target the dense output); ``stable`` = the same choice without the ``ridge-*`` candidates,
whose inverse of the compressed Gram fits the calibration code rather than code in general (on the 0.5B they won
66 of 96 groups and made the model worse end to end, README). Ranks come from a plan made on the dense statistics
(lord/plans.py); this walk changes the factors, never the ranks.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from forward import capture, run_layer, walk
from lord.errors import LordError
from lord.regression import Compensation, PairMoments, candidate_names, compensate
from lord.stats import stat_side
from lord.surgery import Group, factor_group, stacked_weight

CALIBRATIONS = ("parallel", "sequential")
MODES = ("stats", "compensate", "stable")


@dataclass
class SequentialReport:
    groups: dict = field(default_factory=dict)  # group -> {"rank", "chosen", "val_error": {candidate: error}}
    seconds: float = 0.0

    def chosen_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for v in self.groups.values():
            counts[v["chosen"]] = counts.get(v["chosen"], 0) + 1
        return counts


class _Stop(Exception):
    pass


@torch.no_grad()
def sequential_decompose(model: nn.Module, groups: list[Group], ranks: Mapping[str, int | None],
                         ids: torch.Tensor, mode: str = "compensate", batch_size: int = 4,
                         val_every: int = 4, progress: bool = True) -> SequentialReport:
    """Factor every group with a rank in ``ranks`` (in place), layer by layer on calibration ``ids`` [n, L].

    Every ``val_every``-th sequence is held out to choose each group's candidate (mode ``compensate``)."""
    if mode not in MODES:
        raise LordError(f"sequential mode {mode!r} is unknown; expected one of {MODES}")
    if ids.ndim != 2 or ids.shape[0] < val_every:
        raise LordError(f"sequential calibration ids have shape {tuple(ids.shape)}; expected [n_seqs >= "
                        f"{val_every}, seq_len] (every {val_every}-th sequence is held out)")
    if any(g.layer < 0 for g in groups):
        raise LordError("sequential decomposition needs registry groups (lord.find_groups) that know their layer")
    t0 = time.perf_counter()
    report = SequentialReport()
    by_layer: dict[int, list[Group]] = {}
    for g in groups:
        if ranks.get(g.name) is not None:
            by_layer.setdefault(g.layer, []).append(g)
    dense = capture(model, ids, 0, batch_size)
    comp = dense.copy()
    val_rows = torch.arange(ids.shape[0]) % val_every == val_every - 1
    bar = tqdm(total=sum(len(v) for v in by_layer.values()), desc="sequential", disable=not progress)
    for i, layer in walk(model, comp):
        todo = by_layer.get(i, [])
        # dense inputs of this layer's groups and the dense outputs (next layer's inputs), before any change
        x_dense, dense.hidden = _group_inputs(model, layer, todo, dense.hidden, dense.calls, stop=False)
        for g in todo:
            x_comp = _group_inputs(model, layer, [g], comp.hidden, comp.calls, stop=True)[0][g.name]
            result = _fit_group(model, g, int(ranks[g.name]), x_dense.pop(g.name), x_comp, val_rows, mode)
            report.groups[g.name] = {"rank": int(ranks[g.name]), "chosen": result.chosen,
                                     "val_error": {k: round(v, 6) for k, v in result.val_error.items()}}
            bar.update(1)
    bar.close()
    report.seconds = time.perf_counter() - t0
    return report


def _group_inputs(model: nn.Module, layer: nn.Module, groups: list[Group], hidden: list[torch.Tensor],
                  calls: list, stop: bool) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Inputs of each group's first member as [n_seqs, L, d] for the stream's batches, and the layer's outputs
    per batch; with ``stop`` (one group) the forward ends at that group and there are no outputs."""
    seen: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}
    handles = []
    for g in groups:
        def hook(_m, args, name=g.name):
            seen[name].append(args[0].detach().float())
            if stop:
                raise _Stop

        handles.append(model.get_submodule(g.members[0]).register_forward_pre_hook(hook))
    outputs = []
    try:
        for h, call in zip(hidden, calls, strict=True):
            try:
                outputs.append(run_layer(layer, h, call))
            except _Stop:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}, outputs


def _allowed(mode: str) -> tuple[str, ...] | None:
    if mode == "stats":
        return ("stats",)
    if mode == "stable":
        return tuple(n for n in candidate_names() if not n.startswith("ridge-"))
    return None


def _fit_group(model: nn.Module, g: Group, rank: int, x: torch.Tensor, x_c: torch.Tensor,
               val_rows: torch.Tensor, mode: str) -> Compensation:
    w, _ = stacked_weight(model, g)
    if stat_side(g) == "output":  # narrowing single linear: work on its m-dim outputs (bias excluded)
        x, x_c = x @ w.T, x_c @ w.T
        space_map = torch.eye(g.m)
    else:
        space_map = w
    fit = PairMoments.of(x[~val_rows].flatten(0, 1), x_c[~val_rows].flatten(0, 1))
    val = PairMoments.of(x[val_rows].flatten(0, 1), x_c[val_rows].flatten(0, 1))
    del x, x_c
    result = compensate(space_map, fit, val, rank, allowed=_allowed(mode))
    down = result.down @ w if stat_side(g) == "output" else result.down
    factor_group(model, g, result.up, down)
    return result
