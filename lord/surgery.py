"""Architecture adapters: which linears of a model form a group (read the same input), and module swaps.

A group is the unit LoRD factors with one shared bottleneck (Kaushal et al. 2023, Sec. 3.2): llama/qwen2/
mistral ``q_proj,k_proj,v_proj`` and ``gate_proj,up_proj``; ``o_proj`` and ``down_proj`` alone; gpt_bigcode's
``c_attn`` is already one fused linear, ``c_fc`` and ``c_proj`` alone. Adding an architecture is one entry in
``ADAPTERS``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from lord.errors import LordError
from lord.modules import install_group

# per decoder layer: (group suffix, member suffixes) relative to the layer prefix
_LLAMA_LIKE = (
    ("self_attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.o_proj", ("self_attn.o_proj",)),
    ("mlp.gate_up", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.down_proj", ("mlp.down_proj",)),
)
_BIGCODE = (
    ("attn.c_attn", ("attn.c_attn",)),
    ("attn.c_proj", ("attn.c_proj",)),
    ("mlp.c_fc", ("mlp.c_fc",)),
    ("mlp.c_proj", ("mlp.c_proj",)),
)
# model_type -> (attribute path of the decoder layer list, per-layer groups)
ADAPTERS: dict[str, tuple[str, tuple]] = {
    "llama": ("model.layers", _LLAMA_LIKE),
    "mistral": ("model.layers", _LLAMA_LIKE),
    "qwen2": ("model.layers", _LLAMA_LIKE),
    "gpt_bigcode": ("transformer.h", _BIGCODE),
}


@dataclass(frozen=True)
class Group:
    """Linears reading the same input, stacked row-wise into one ``W`` (m x n) for the decomposition."""

    name: str
    members: tuple[str, ...]
    in_features: int
    out_features: tuple[int, ...]

    @property
    def m(self) -> int:
        return sum(self.out_features)

    @property
    def n(self) -> int:
        return self.in_features


def model_type(model: nn.Module) -> str:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ADAPTERS:
        raise LordError(f"architecture {mt!r} is not supported by lord; supported: {sorted(ADAPTERS)}. "
                        "Add an adapter to lord/surgery.py:ADAPTERS (layer list path + groups).")
    return mt


def find_groups(model: nn.Module, targets: tuple[str, ...] = ("*",), ignore: tuple[str, ...] = ()) -> list[Group]:
    """Groups of ``model`` whose name matches any ``targets`` glob and no ``ignore`` glob, in layer order."""
    layers_path, spec = ADAPTERS[model_type(model)]
    layers = model.get_submodule(layers_path)
    groups = []
    for i in range(len(layers)):
        prefix = f"{layers_path}.{i}"
        for gsuffix, msuffixes in spec:
            name = f"{prefix}.{gsuffix}"
            if not any(fnmatch.fnmatchcase(name, t) for t in targets):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in ignore):
                continue
            members = tuple(f"{prefix}.{s}" for s in msuffixes)
            mods = [model.get_submodule(m) for m in members]
            for mname, mod in zip(members, mods, strict=True):
                if not isinstance(mod, nn.Linear):
                    raise LordError(f"{mname} is a {type(mod).__name__}, expected a dense nn.Linear: "
                                    "is this model already factored or quantized? Start from the dense model.")
            groups.append(Group(name, members, mods[0].in_features, tuple(m.out_features for m in mods)))
    if not groups:
        raise LordError(f"no group matches targets={targets} ignore={ignore}; group names look like "
                        f"'{layers_path}.0.{spec[0][0]}' (globs, e.g. '*.mlp.*').")
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
