"""Group surgery: which linears of a model form a group (read the same input), their stacked weight, and the
swap to LowRankLinear. Which linears group together per family lives in the architecture registry
(``forward.arch.ARCHS``); this module checks them against the model and does the LoRD-specific work.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from forward import ForwardError, adapter_for
from lord.errors import LordError
from lord.modules import install_group


@dataclass(frozen=True)
class Group:
    """Linears reading the same input, stacked row-wise into one ``W`` (m x n) for the decomposition."""

    name: str
    members: tuple[str, ...]
    in_features: int
    out_features: tuple[int, ...]
    layer: int = -1  # decoder layer index (registry groups); -1 for hand-made groups
    kind: str = ""  # registry kind: qkv, o, gate_up, down (llama-like) / c_attn, c_proj, c_fc, mlp_c_proj

    @property
    def m(self) -> int:
        return sum(self.out_features)

    @property
    def n(self) -> int:
        return self.in_features


def model_type(model: nn.Module) -> str:
    """The model's family in the registry; LordError naming the supported ones otherwise."""
    try:
        return adapter_for(model).family
    except ForwardError as e:
        raise LordError(str(e)) from e


def find_groups(model: nn.Module, targets: tuple[str, ...] = ("*",), ignore: tuple[str, ...] = ()) -> list[Group]:
    """Groups of ``model`` whose name matches any ``targets`` glob and no ``ignore`` glob, in layer order."""
    model_type(model)
    adapter = adapter_for(model)
    groups = []
    for lg in adapter.all_groups(model):
        if not any(fnmatch.fnmatchcase(lg.name, t) for t in targets):
            continue
        if any(fnmatch.fnmatchcase(lg.name, p) for p in ignore):
            continue
        mods = [model.get_submodule(m) for m in lg.members]
        for mname, mod in zip(lg.members, mods, strict=True):
            if not isinstance(mod, nn.Linear):
                raise LordError(f"{mname} is a {type(mod).__name__}, expected a dense nn.Linear: "
                                "is this model already factored or quantized? Start from the dense model.")
        groups.append(Group(lg.name, lg.members, mods[0].in_features, tuple(m.out_features for m in mods),
                            lg.layer, lg.kind))
    if not groups:
        raise LordError(f"no group matches targets={targets} ignore={ignore}; group names look like "
                        f"'{adapter.layer_groups(0)[0].name}' (globs, e.g. '*.mlp.*').")
    return groups


def stacked_weight(model: nn.Module, group: Group) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W = [W_1; ...; W_k]`` (m x n, float32) and the stacked bias (or None if no member has one)."""
    mods = [model.get_submodule(m) for m in group.members]
    w = torch.cat([m.weight.detach().float() for m in mods], dim=0)
    if all(m.bias is None for m in mods):
        return w, None
    b = torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features) for m in mods])
    return w, b


@torch.no_grad()
def factor_group(model: nn.Module, group: Group, up: torch.Tensor, down: torch.Tensor) -> None:
    """Swap the group's linears for LowRankLinear with ``up`` (m x r, split per member) and shared ``down``."""
    mods = [model.get_submodule(m) for m in group.members]
    biases = [m.bias for m in mods]
    dtype = mods[0].weight.dtype
    new = install_group(model, list(group.members), int(down.shape[0]))
    new[0].down.weight.copy_(down.to(dtype))
    for mod, b, u in zip(new, biases, torch.split(up, list(group.out_features), dim=0), strict=True):
        mod.up.weight.copy_(u.to(dtype))
        if b is not None:
            mod.up.bias.copy_(b)
