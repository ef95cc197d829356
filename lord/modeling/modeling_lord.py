"""LoRD factored causal LMs, loadable with ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``.

This file is copied into every factored checkpoint (like the paper's LoRDCoder), so it imports nothing but
torch and transformers. The ``lord`` package imports ``LowRankLinear`` from here too: one definition.

A factored projection ``W ~ up @ down`` (Kaushal et al. 2023, Sec. 3) keeps its attribute name. Members of a
group read the same input (q/k/v, gate/up) and share one bottleneck ``down``: it is registered once, on the
group *owner* (first member); the other members resolve ``.down`` to the owner's module at call time (so a
later swap of ``owner.down`` by GPTQ or peft is seen by every member) and never register it, so the state
dict holds each tensor once and safetensors can save it. The first member called on an input computes
``down(x)``; the others reuse it while ``x`` is the same, unmodified tensor (identity + version check).

``config.lord["groups"]``: ``{group: {"members": [qualified module names], "rank": r}}``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPTBigCodeForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM


class _SharedBottleneck:
    """Per-group cache of the last ``down(x)``: computed by whichever member runs first."""

    __slots__ = ("x", "version", "out", "remaining", "n_members")

    def __init__(self, n_members: int) -> None:
        self.n_members = n_members
        self.clear()

    def clear(self) -> None:
        self.x = None
        self.version = -1
        self.out = None
        self.remaining = 0

    @staticmethod
    def _version(x: torch.Tensor) -> int:
        # inference-mode tensors (generate) carry no version counter; they cannot be changed in place outside
        # inference mode, and inside it the members read x back to back, so identity alone is safe there
        return -2 if x.is_inference() else x._version

    def get(self, x: torch.Tensor, down: nn.Module) -> torch.Tensor:
        if self.remaining > 0 and self.x is x and self.version == self._version(x):
            out = self.out
            self.remaining -= 1
            if self.remaining == 0:
                self.clear()
            return out
        out = down(x)
        if self.n_members > 1:
            self.x, self.version, self.out, self.remaining = x, self._version(x), out, self.n_members - 1
        return out


class LowRankLinear(nn.Module):
    """``y = up(down(x))`` with ``down: in -> r`` (no bias) and ``up: r -> out`` (the original bias)."""

    def __init__(self, down: nn.Linear | None, up: nn.Linear, owner: LowRankLinear | None = None,
                 shared: _SharedBottleneck | None = None) -> None:
        super().__init__()
        if (down is None) == (owner is None):
            raise ValueError("LowRankLinear needs exactly one of `down` (group owner) or `owner` (member)")
        if down is not None:
            self.down = down
        self.up = up
        # plain attributes (not submodules): the owner's down is registered exactly once
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_shared", shared or _SharedBottleneck(1))

    def __getattr__(self, name: str):
        if name == "down":
            modules = self.__dict__["_modules"]
            if "down" in modules:
                return modules["down"]
            return self.__dict__["_owner"].down
        return super().__getattr__(name)

    @property
    def in_features(self) -> int:
        return self.down.in_features

    @property
    def out_features(self) -> int:
        return self.up.out_features

    @property
    def rank(self) -> int:
        return self.up.in_features

    def dense_weight(self) -> torch.Tensor:
        """The dense equivalent ``up.W @ down.W`` (for inspection; never used in forward)."""
        return self.up.weight @ self.down.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self._shared.get(x, self.down))

    def extra_repr(self) -> str:
        role = "owner" if "down" in self._modules else "shares down"
        return f"in={self.in_features}, rank={self.rank}, out={self.out_features}, {role}"


def install_group(model: nn.Module, members: list[str], rank: int) -> list[LowRankLinear]:
    """Replace each dense member by a LowRankLinear of ``rank`` sharing one down (weights uninitialised)."""
    denses = [model.get_submodule(name) for name in members]
    in_features = denses[0].in_features
    for name, d in zip(members, denses, strict=True):
        if not isinstance(d, nn.Linear) or d.in_features != in_features:
            raise ValueError(f"group member {name} is {type(d).__name__} with in_features "
                             f"{getattr(d, 'in_features', None)}; expected nn.Linear reading {in_features}")
    w = denses[0].weight
    shared = _SharedBottleneck(len(members))
    owner = None
    out = []
    for name, d in zip(members, denses, strict=True):
        up = nn.Linear(rank, d.out_features, bias=d.bias is not None, device=w.device, dtype=w.dtype)
        if owner is None:
            down = nn.Linear(in_features, rank, bias=False, device=w.device, dtype=w.dtype)
            new = owner = LowRankLinear(down, up, shared=shared)
        else:
            new = LowRankLinear(None, up, owner=owner, shared=shared)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
        out.append(new)
    return out


def install_rank_map(model: nn.Module, groups: dict) -> None:
    for spec in groups.values():
        install_group(model, list(spec["members"]), int(spec["rank"]))


class _LordMixin:
    def _install_lord(self, config) -> None:
        lord = getattr(config, "lord", None)
        if not lord or "groups" not in lord:
            raise ValueError("config has no `lord.groups` rank map: this is not a LoRD factored checkpoint")
        install_rank_map(self, lord["groups"])


class LordLlamaForCausalLM(LlamaForCausalLM, _LordMixin):
    def __init__(self, config) -> None:
        super().__init__(config)
        self._install_lord(config)


class LordMistralForCausalLM(MistralForCausalLM, _LordMixin):
    def __init__(self, config) -> None:
        super().__init__(config)
        self._install_lord(config)


class LordQwen2ForCausalLM(Qwen2ForCausalLM, _LordMixin):
    def __init__(self, config) -> None:
        super().__init__(config)
        self._install_lord(config)


class LordGPTBigCodeForCausalLM(GPTBigCodeForCausalLM, _LordMixin):
    def __init__(self, config) -> None:
        super().__init__(config)
        self._install_lord(config)


LORD_CLASSES = {
    "llama": LordLlamaForCausalLM,
    "mistral": LordMistralForCausalLM,
    "qwen2": LordQwen2ForCausalLM,
    "gpt_bigcode": LordGPTBigCodeForCausalLM,
}
