"""The GPTQModel module tree of a factored config (quant/gptqmodel_lord.py), without gptqmodel: it must name
exactly the linears a LoRD model registers, so GPTQModel swaps every factor and asks for no missing tensor.
Loading in GPTQModel itself is checked by bench/quant_interop.py (gptqmodel is not in the project venv)."""

from __future__ import annotations

import pytest
from torch import nn

from lord.modeling.modeling_lord import install_rank_map
from quant.errors import QuantError
from quant.gptqmodel_lord import factored_leaves, factored_module_tree, layers_prefix

# GPTQModel 7.6's LlamaQModel.module_tree, which Qwen2QModel inherits
LLAMA_TREE = [
    "model", "layers", "#",
    {
        "input_layernorm": ("input_layernorm:!",),
        "self_attn": ("q_proj:0:in=x", "k_proj:0:in=x", "v_proj:0:in=x", "o_proj:1"),
        "post_attention_layernorm": ("post_attention_layernorm:!",),
        "mlp": ("gate_proj:0:in=x", "up_proj:0:in=x", "down_proj:1"),
    },
]


def uniform_groups(n_layers: int, rank: int = 8) -> dict:
    """The grouping the uniform plan writes: q/k/v and gate/up share a down; o and down_proj alone."""
    groups = {}
    for i in range(n_layers):
        p = f"model.layers.{i}"
        for name, members in (("qkv", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                              ("o", ["self_attn.o_proj"]), ("gate_up", ["mlp.gate_proj", "mlp.up_proj"]),
                              ("down", ["mlp.down_proj"])):
            groups[f"{p}.{name}"] = {"members": [f"{p}.{m}" for m in members], "rank": rank}
    return groups


def test_layers_prefix() -> None:
    assert layers_prefix(LLAMA_TREE) == "model.layers"
    with pytest.raises(QuantError, match="'#'"):
        layers_prefix(["model", "layers", {}])


def test_uniform_plan_tree_names_owner_down_and_member_ups() -> None:
    tree = factored_module_tree(LLAMA_TREE, uniform_groups(2), n_layers=2)
    assert tree[:3] == ["model", "layers", "#"]
    assert tree[3] == {
        "input_layernorm": ("input_layernorm:!",),
        "self_attn": ("q_proj.down:0", "q_proj.up:1", "k_proj.up:1", "v_proj.up:1", "o_proj.down:2", "o_proj.up:3"),
        "post_attention_layernorm": ("post_attention_layernorm:!",),
        "mlp": ("gate_proj.down:0", "gate_proj.up:1", "up_proj.up:1", "down_proj.down:2", "down_proj.up:3"),
    }
    assert LLAMA_TREE[3]["self_attn"][0] == "q_proj:0:in=x"  # the stock definition's tree is not mutated


def test_partly_factored_model_keeps_dense_names() -> None:
    """Layer 1 leaves q_proj and the MLP dense and groups k/v alone: k_proj owns that layer's down."""
    groups = {k: v for k, v in uniform_groups(2).items() if not k.startswith("model.layers.1.")}
    groups["model.layers.1.kv"] = {"members": ["model.layers.1.self_attn.k_proj",
                                               "model.layers.1.self_attn.v_proj"], "rank": 8}
    leaves = factored_leaves(groups, "model.layers", n_layers=2)
    assert leaves["self_attn.q_proj"] == ["self_attn.q_proj", "self_attn.q_proj.down", "self_attn.q_proj.up"]
    assert leaves["self_attn.k_proj"] == ["self_attn.k_proj.up", "self_attn.k_proj.down"]
    assert leaves["self_attn.o_proj"] == ["self_attn.o_proj", "self_attn.o_proj.down", "self_attn.o_proj.up"]
    tree = factored_module_tree(LLAMA_TREE, groups, n_layers=2)
    assert "q_proj:0" in tree[3]["self_attn"] and "k_proj.down:0" in tree[3]["self_attn"]


def test_rejects_groups_the_base_tree_cannot_place() -> None:
    with pytest.raises(QuantError, match="not under model.layers"):
        factored_module_tree(LLAMA_TREE, {"head": {"members": ["lm_head"], "rank": 4}}, n_layers=1)
    odd = {"g": {"members": ["model.layers.0.self_attn.qkv_proj"], "rank": 4}}
    with pytest.raises(QuantError, match="qkv_proj"):
        factored_module_tree(LLAMA_TREE, odd, n_layers=1)


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_llama"])
def test_tree_matches_the_linears_a_factored_model_registers(fixture: str, request: pytest.FixtureRequest) -> None:
    """GPTQModel keeps a found nn.Linear under the layers iff its name ends with a tree leaf: every linear of the
    factored model must match one, and every leaf must match some linear."""
    model = request.getfixturevalue(fixture)
    n_layers = model.config.num_hidden_layers
    groups = uniform_groups(n_layers, rank=8)
    del groups["model.layers.1.o"]  # one linear left dense
    install_rank_map(model, groups)
    tree = factored_module_tree(LLAMA_TREE, groups, n_layers)
    leaves = [f"{p}.{c.split(':', 1)[0]}" for p, cs in tree[3].items() for c in cs if "!" not in c]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    assert linears and all(any(n.endswith(leaf) for leaf in leaves) for n in linears)
    assert all(any(n.endswith(leaf) for n in linears) for leaf in leaves)
    assert "model.layers.1.self_attn.o_proj" in linears and "model.layers.0.self_attn.k_proj.down" not in linears
