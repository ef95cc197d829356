"""Architecture registry: where a causal LM keeps its decoder layers, final norm and LM head, and which of
its linears form a LoRD group. Everything that walks a model by structure (surgery, sensitivity, GPTQ, the
forward toolkit) reads it; adding a family is one ``ARCHS`` entry plus a tiny-model test.

A group is the unit LoRD factors with one shared bottleneck (Kaushal et al. 2023, Sec. 3.2): linears that
read the same input. llama/qwen2/mistral: ``q_proj,k_proj,v_proj`` (kind ``qkv``) and ``gate_proj,up_proj``
(``gate_up``); ``o_proj`` (``o``) and ``down_proj`` (``down``) alone. gpt_bigcode's ``c_attn`` is already one
fused linear; ``attn.c_proj``, ``mlp.c_fc`` and ``mlp.c_proj`` are alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from forward.errors import ForwardError


@dataclass(frozen=True)
class GroupSpec:
    """One group per decoder layer: ``kind``, its name suffix and member suffixes (relative to the layer)."""

    kind: str
    suffix: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class LayerGroup:
    """A group of one concrete layer: fully qualified ``name`` and ``members``, layer index and kind."""

    name: str
    layer: int
    kind: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class ArchAdapter:
    """Structure of one model family (``config.model_type``)."""

    family: str
    layers_path: str  # attribute path of the decoder layer ModuleList
    norm_path: str  # final norm applied after the last layer, before the LM head
    groups: tuple[GroupSpec, ...]
    lord_class: str  # class name in lord/modeling/modeling_lord.py

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.norm_path)

    def lm_head(self, model: nn.Module) -> nn.Module:
        """The output projection (logits = head(norm(h)); none of these families scales or caps logits)."""
        return model.get_output_embeddings()

    def layer_groups(self, layer: int) -> list[LayerGroup]:
        prefix = f"{self.layers_path}.{layer}"
        return [LayerGroup(f"{prefix}.{g.suffix}", layer, g.kind, tuple(f"{prefix}.{m}" for m in g.members))
                for g in self.groups]

    def all_groups(self, model: nn.Module) -> list[LayerGroup]:
        """Every group of ``model`` in layer order (names only; nothing is checked about the modules)."""
        return [g for i in range(len(self.decoder_layers(model))) for g in self.layer_groups(i)]


_LLAMA_GROUPS = (
    GroupSpec("qkv", "self_attn.qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    GroupSpec("o", "self_attn.o_proj", ("self_attn.o_proj",)),
    GroupSpec("gate_up", "mlp.gate_up", ("mlp.gate_proj", "mlp.up_proj")),
    GroupSpec("down", "mlp.down_proj", ("mlp.down_proj",)),
)
_BIGCODE_GROUPS = (
    GroupSpec("c_attn", "attn.c_attn", ("attn.c_attn",)),
    GroupSpec("c_proj", "attn.c_proj", ("attn.c_proj",)),
    GroupSpec("c_fc", "mlp.c_fc", ("mlp.c_fc",)),
    GroupSpec("mlp_c_proj", "mlp.c_proj", ("mlp.c_proj",)),
)

ARCHS: dict[str, ArchAdapter] = {
    "llama": ArchAdapter("llama", "model.layers", "model.norm", _LLAMA_GROUPS, "LordLlamaForCausalLM"),
    "mistral": ArchAdapter("mistral", "model.layers", "model.norm", _LLAMA_GROUPS, "LordMistralForCausalLM"),
    "qwen2": ArchAdapter("qwen2", "model.layers", "model.norm", _LLAMA_GROUPS, "LordQwen2ForCausalLM"),
    "gpt_bigcode": ArchAdapter("gpt_bigcode", "transformer.h", "transformer.ln_f", _BIGCODE_GROUPS,
                               "LordGPTBigCodeForCausalLM"),
}


def adapter_for(model: Any) -> ArchAdapter:
    """The adapter of a model, a config, or a ``model_type`` string; a clear error for anything else."""
    if isinstance(model, str):
        mt = model
    else:
        config = getattr(model, "config", model)
        mt = getattr(config, "model_type", None)
    if mt not in ARCHS:
        raise ForwardError(f"architecture {mt!r} is not supported; supported families: {sorted(ARCHS)}. "
                           "Add an ArchAdapter to forward/arch.py:ARCHS (layer list, final norm, groups) "
                           "and a tiny-model test.")
    return ARCHS[mt]
