"""Load a LoRD-factored GPTQ checkpoint (written by ``quant.save_quantized``) with GPTQModel.

GPTQModel picks a model definition (a ``BaseQModel`` subclass) from ``config.model_type`` and builds the float
skeleton with the definition's ``loader.from_config``; its ``module_tree`` names the linears of one decoder
layer that its quant linears replace. A factored checkpoint keeps ``model_type: qwen2`` (so our loader and
transformers read its config), but its layers hold ``q_proj.down`` (the group owner's shared bottleneck) and
``q_proj.up`` / ``k_proj.up`` / ``v_proj.up`` instead of ``q_proj``. So the stock definition builds the wrong
skeleton and asks for ``q_proj.qweight``.

``lord_definition(config)`` subclasses the stock definition of the base architecture with two class
attributes, both part of the definition API that GPTQModel's own definitions set: ``loader`` builds our
``Lord*ForCausalLM`` (lord/modeling) so the factors exist before the quant linears are swapped in, and
``module_tree`` lists the factor names derived from ``config.lord["groups"]``. ``load_lord_gptqmodel`` calls
that definition's ``from_quantized`` directly, the step ``GPTQModel.from_quantized`` takes after its
``MODEL_MAP[model_type]`` lookup. Nothing is registered in ``MODEL_MAP``: GPTQModel has no public
registration call (the map is a module dict), and our ``model_type`` is the stock one, so an entry there
would take over every plain Qwen2 checkpoint. Loading only: GPTQModel cannot quantize a factored model
through this definition (its per-layer calibration does not know about the shared bottleneck).

gptqmodel is imported only inside the functions that need it (it is not in the project venv); the module tree
logic is plain Python and tested in tests/test_gptqmodel_lord.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from quant.errors import QuantError

Tree = list[Any]


def layers_prefix(tree: Tree) -> str:
    """The layer-list path of a GPTQModel module tree: ``["model", "layers", "#", {...}]`` -> ``model.layers``."""
    if "#" not in tree:
        raise QuantError(f"module tree {tree!r} has no '#' layer marker: expected ['model', 'layers', '#', {{...}}].")
    return ".".join(str(n).split(":", 1)[0] for n in tree[: tree.index("#")])


def factored_leaves(groups: dict[str, dict[str, Any]], prefix: str, n_layers: int) -> dict[str, list[str]]:
    """Per layer-relative linear (``self_attn.q_proj``) the module names GPTQModel must quantize in some layer.

    A group's first member owns the shared ``down`` (lord/modeling: the others resolve it at call time and do
    not register it), every member has its ``up``; a linear that stays dense in at least one layer keeps its
    own name too. The module tree holds suffixes for all layers at once, so the union is what it needs.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.+)$")
    names: dict[str, list[str]] = {}
    factored_in: dict[str, set[int]] = {}
    for group, spec in groups.items():
        for i, member in enumerate(spec["members"]):
            m = pattern.match(member)
            if m is None:
                raise QuantError(f"LoRD group {group!r} member {member!r} is not under {prefix}.<layer>: "
                                 "this definition only factors decoder-layer linears.")
            layer, rel = int(m.group(1)), m.group(2)
            factored_in.setdefault(rel, set()).add(layer)
            roles = names.setdefault(rel, [])
            for role in (("down", "up") if i == 0 else ("up",)):
                if f"{rel}.{role}" not in roles:
                    roles.append(f"{rel}.{role}")
    for rel, layers in factored_in.items():
        if len(layers) < n_layers:
            names[rel].insert(0, rel)
    return names


def factored_module_tree(base_tree: Tree, groups: dict[str, dict[str, Any]], n_layers: int) -> Tree:
    """``base_tree`` (a stock GPTQModel definition's) with each factored linear replaced by its factors.

    Leaf flags: ``:!`` / ``:?`` entries (norms, capture-only) are kept as they are; a quantized leaf of
    execution group ``g`` becomes ``down:2g`` (reads the layer input, as the dense linear did) and
    ``up:2g+1`` (reads the bottleneck); a dense leaf keeps ``2g``. The ``:in=`` shared-input tags are dropped:
    they only steer Hessian sharing while GPTQModel quantizes, which this definition does not do.
    """
    prefix = layers_prefix(base_tree)
    leaves = factored_leaves(groups, prefix, n_layers)
    listed = {f"{p.split(':', 1)[0]}.{c.split(':', 1)[0]}"
              for node in base_tree if isinstance(node, dict) for p, cs in node.items() for c in cs}
    if set(leaves) - listed:
        raise QuantError(f"LoRD groups factor {sorted(set(leaves) - listed)}, which the base module tree does "
                         "not list: the GPTQModel definition for this architecture names its linears differently.")
    out: Tree = []
    for node in base_tree:
        if not isinstance(node, dict):
            out.append(node)
            continue
        block: dict[str, tuple[str, ...]] = {}
        for parent, children in node.items():
            parent_name = parent.split(":", 1)[0]
            new: list[str] = []
            for child in children:
                name, *flags = child.split(":")
                if "!" in flags or "?" in flags:
                    new.append(child)
                    continue
                group = next((int(f) for f in flags if f.isdigit()), 0)
                rel = f"{parent_name}.{name}"
                for full in leaves.get(rel, [rel]):
                    stage = 2 * group + (1 if full.endswith(".up") else 0)
                    new.append(f"{full[len(parent_name) + 1:]}:{stage}")
            block[parent] = tuple(new)
        out.append(block)
    return out


class LordSkeleton:
    """``loader`` of the definition: builds ``Lord*ForCausalLM`` from a config the way ``AutoModelForCausalLM``
    builds the stock class (uninitialised factors of the checkpoint's ranks, weights loaded afterwards)."""

    @staticmethod
    def from_config(config: Any, trust_remote_code: bool = False, **kwargs: Any) -> Any:
        from lord.modeling.modeling_lord import LORD_CLASSES

        if config.model_type not in LORD_CLASSES:
            raise QuantError(f"model_type {config.model_type!r} has no LoRD class; expected one of "
                             f"{sorted(LORD_CLASSES)}.")
        return LORD_CLASSES[config.model_type]._from_config(config, **kwargs)


def lord_definition(config: Any) -> type:
    """A GPTQModel model definition for this factored ``config`` (a subclass of the stock one)."""
    from gptqmodel.models.auto import MODEL_MAP

    lord = getattr(config, "lord", None)
    if not lord or "groups" not in lord:
        raise QuantError("config has no `lord.groups` rank map: load a dense checkpoint with GPTQModel.load.")
    base = MODEL_MAP.get(config.model_type)
    if base is None or base.module_tree is None:
        raise QuantError(f"GPTQModel {_version()} has no definition with a module tree for model_type "
                         f"{config.model_type!r}; a LoRD definition is built on top of one.")
    tree = factored_module_tree(base.module_tree, lord["groups"], config.num_hidden_layers)
    return type(f"Lord{base.__name__}", (base,), {
        "__doc__": f"{base.__name__} over LoRD factors (quant/gptqmodel_lord.py).",
        "loader": LordSkeleton, "module_tree": tree,
        # a factored layer's shape is not what the stock definition's AWQ / shared-input metadata describes
        "awq_scale_optimize_shape_dependent_modules": None,
        "shared_input_verified_model_types": frozenset(),
    })


def load_lord_gptqmodel(path: str | Path, **kwargs: Any) -> Any:
    """``GPTQModel.from_quantized`` for a factored checkpoint: returns GPTQModel's wrapper (``.model`` is the
    torch module). ``kwargs`` go to the definition's ``from_quantized`` (device, backend, dtype, ...)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    return lord_definition(config).from_quantized(model_id_or_path=str(path), **kwargs)


def _version() -> str:
    import gptqmodel

    return gptqmodel.__version__
