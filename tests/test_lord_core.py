"""LoRD maths and plumbing on tiny random models: exactness at full rank, optimality vs baselines, parity,
rank plans, shared bottlenecks, statistics, and checkpoint round trips (ours and trust_remote_code)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import lord
from lord import LordError, LowRankLinear
from lord.decompose import factorize, output_error
from lord.model_ops import apply_ranks
from lord.ranks import max_factored_rank, params_removed, parity_rank
from lord.surgery import stacked_weight

torch.manual_seed(0)
METHODS = ("lord", "svd", "whiten")
RANK_PLANS = tuple(p for p in lord.PLANS if p != "search")  # search needs the model: test_lord_sensitivity


def _gram(n: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * torch.logspace(0, -3, n)  # anisotropic, like activations
    x = torch.randn(n_tokens, n, generator=g) @ mix.T
    return x.T @ x


@pytest.fixture(params=["tiny_llama", "tiny_qwen2", "tiny_bigcode"])
def tiny_any(request):
    return request.getfixturevalue(request.param)


def _stats(model, ids):
    groups = lord.find_groups(model)
    return groups, lord.collect_stats(model, groups, ids, progress=False)


# ---- maths ------------------------------------------------------------------------------------------------

def test_parity_arithmetic():
    assert parity_rank(4, 4) == 2.0
    assert max_factored_rank(4, 4) == 1  # r == parity stores exactly m n: not a saving, never factored
    assert max_factored_rank(5, 7) == 2  # parity 35/12 = 2.92
    assert max_factored_rank(896, 4864) == 756  # qwen2.5-0.5b down_proj: parity 756.7
    for m, n in [(4, 4), (5, 7), (9728, 896), (896, 4864)]:
        r = max_factored_rank(m, n)
        assert params_removed(m, n, r) > 0
        assert params_removed(m, n, r + 1) <= 0


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (30, 30)])
def test_full_rank_is_exact_and_curves_match_direct_error(shape):
    m, n = shape
    w = torch.randn(m, n)
    g = _gram(n, 200)
    for method, f in factorize(w, g, METHODS).items():
        k = f.max_rank
        assert k == min(m, n)
        up, down = f.factors(w, k)
        assert torch.allclose(up @ down, w, atol=1e-3), method
        curve = f.error_curve()
        assert curve[0] == pytest.approx(1.0) and curve[-1] == pytest.approx(0.0, abs=1e-6)
        assert bool((curve[1:] <= curve[:-1] + 1e-12).all())  # more rank never hurts
        for r in (1, k // 3, k // 2):
            up, down = f.factors(w, r)
            assert float(curve[r]) == pytest.approx(output_error(w, up @ down, g), rel=1e-3, abs=1e-6), method


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
@pytest.mark.parametrize("n_tokens", [10, 400])  # 10 < n: a singular Gram, LoRD needs no inverse
def test_lord_never_worse_than_baselines(shape, n_tokens):
    w = torch.randn(*shape)
    g = _gram(shape[1], n_tokens, seed=1)
    f = factorize(w, g, METHODS, damping=0.05)
    lord_curve = f["lord"].error_curve()
    assert torch.isfinite(lord_curve).all()
    for other in ("svd", "whiten"):
        assert bool((lord_curve <= f[other].error_curve() + 1e-6).all()), other
    assert float(lord_curve[5]) < float(f["svd"].error_curve()[5])  # and strictly better where data matters


def test_whitening_converges_to_lord_without_damping():
    w, g = torch.randn(20, 32), _gram(32, 300, seed=2)
    a = factorize(w, g, ("lord", "whiten"), damping=1e-9)
    assert torch.allclose(a["lord"].error_curve(), a["whiten"].error_curve(), atol=1e-5)


def test_bad_inputs_raise_lord_error():
    with pytest.raises(LordError, match="Gram has shape"):
        factorize(torch.randn(4, 6), torch.eye(5))
    with pytest.raises(LordError, match="unknown decomposition method"):
        factorize(torch.randn(4, 6), torch.eye(6), ("pca",))
    with pytest.raises(LordError, match="plan"):
        lord.DecomposeConfig(plan="random")
    with pytest.raises(LordError, match="rank_reduction"):
        lord.DecomposeConfig(plan="auto", rank_reduction=0.5)
    with pytest.raises(LordError, match="reduction"):
        lord.DecomposeConfig(reduction=1.5)


# ---- statistics -------------------------------------------------------------------------------------------

def test_gram_mean_count_match_captured_inputs(tiny_llama, calib_ids, tmp_path):
    groups = lord.find_groups(tiny_llama, targets=("*.0.mlp.down_proj",))
    seen = []
    h = tiny_llama.get_submodule(groups[0].members[0]).register_forward_pre_hook(
        lambda _m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1]).double()))
    stats = lord.collect_stats(tiny_llama, groups, calib_ids, batch_size=3, progress=False, statistic="input")
    h.remove()
    x = torch.cat(seen)
    s = stats[groups[0].name]
    assert s.n_tokens == calib_ids.numel() == x.shape[0]
    assert torch.allclose(s.gram.double(), x.T @ x, rtol=1e-4, atol=1e-3)
    assert torch.allclose(s.mean.double(), x.mean(0), atol=1e-5)
    lord.save_stats(tmp_path / "s.safetensors", stats, groups, {"model": "tiny", "calibration_hash": "abc"})
    back, meta = lord.load_stats(tmp_path / "s.safetensors")
    assert meta["model"] == "tiny" and torch.equal(back[groups[0].name].gram, s.gram)
    with pytest.raises(LordError, match="no statistics"):
        lord.load_stats(tmp_path / "s.safetensors", ["model.layers.1.mlp.down_proj"])


def test_statistics_skip_the_lm_head_but_not_a_group_in_it(tiny_any, calib_ids):
    """Groups in the body: the head never runs and the Grams equal a full forward's; a hand-made group on the
    head itself needs the full model."""
    from lord.stats import GramCollector
    from lord.surgery import Group

    groups = lord.find_groups(tiny_any)
    head_calls = []
    head = tiny_any.get_output_embeddings()
    h = head.register_forward_hook(lambda *_: head_calls.append(1))
    stats = lord.collect_stats(tiny_any, groups, calib_ids, batch_size=4, progress=False)
    assert head_calls == []
    ref = GramCollector(tiny_any, groups)
    with torch.no_grad():
        for i in range(0, calib_ids.shape[0], 4):
            tiny_any(input_ids=calib_ids[i:i + 4], use_cache=False)
    ref.remove()
    for name, s in ref.result().items():
        assert torch.equal(stats[name].gram, s.gram) and stats[name].n_tokens == s.n_tokens
    head_name = next(n for n, m in tiny_any.named_modules() if m is head)
    on_head = [Group("head", (head_name,), head.in_features, (head.out_features,))]
    lord.collect_stats(tiny_any, on_head, calib_ids, batch_size=4, progress=False)
    h.remove()
    assert head_calls


def test_output_side_statistics_give_the_input_side_factors(tiny_any, calib_ids, tmp_path):
    # "auto" keeps Y^T Y (m x m) for a single narrowing linear instead of X^T X (n x n): same C = W G W^T,
    # so every method's error curve and factors must agree with the input-side ones
    groups = lord.find_groups(tiny_any)
    auto = lord.collect_stats(tiny_any, groups, calib_ids, progress=False)
    full = lord.collect_stats(tiny_any, groups, calib_ids, progress=False, statistic="input")
    narrowing = [g for g in groups if len(g.members) == 1 and g.m < g.n]
    assert narrowing and all(auto[g.name].side == "output" and auto[g.name].gram.shape == (g.m, g.m)
                             for g in narrowing)
    assert all(auto[g.name].side == "input" for g in groups if g not in narrowing)
    lord.save_stats(tmp_path / "s.safetensors", auto, groups, {"model": "tiny"})
    back, _ = lord.load_stats(tmp_path / "s.safetensors")
    for g in narrowing:
        a, f = back[g.name], full[g.name]
        assert a.side == "output" and a.n_tokens == f.n_tokens
        assert a.input_trace == pytest.approx(f.input_trace, rel=1e-5)
        w, _ = stacked_weight(tiny_any, g)
        fa = factorize(w, a.gram, METHODS, side=a.side, input_trace=a.input_trace)
        ff = factorize(w, f.gram, METHODS)
        for method in METHODS:
            assert torch.allclose(fa[method].error_curve(), ff[method].error_curve(), atol=1e-4), method
            r = max(1, g.m // 3)
            ua, _ = fa[method].factors(w, r)
            uf, _ = ff[method].factors(w, r)
            assert torch.allclose(ua @ ua.T, uf @ uf.T, atol=1e-3), method  # same subspace
    with pytest.raises(LordError, match="output covariance has shape"):
        factorize(torch.randn(8, 4), torch.eye(8), side="output", input_trace=1.0)


# ---- surgery and modules ----------------------------------------------------------------------------------

def test_full_rank_model_reproduces_dense_logits(tiny_any, calib_ids):
    groups, stats = _stats(tiny_any, calib_ids)
    dense = tiny_any(calib_ids).logits
    facts = lord.factorize_groups(tiny_any, groups, stats, ("lord",), progress=False)["lord"]
    apply_ranks(tiny_any, groups, facts, {g.name: min(g.m, g.n) for g in groups}, lord.count_params(tiny_any))
    assert len(lord.factored_modules(tiny_any)) == sum(len(g.members) for g in groups)
    assert torch.allclose(tiny_any(calib_ids).logits, dense, atol=1e-4)


def test_group_shares_one_down_computed_once(tiny_llama, calib_ids):
    groups, stats = _stats(tiny_llama, calib_ids)
    facts = lord.factorize_groups(tiny_llama, groups, stats, ("lord",), progress=False)["lord"]
    apply_ranks(tiny_llama, groups, facts, {g.name: 8 for g in groups}, lord.count_params(tiny_llama))
    attn = tiny_llama.model.layers[0].self_attn
    assert isinstance(attn.k_proj, LowRankLinear) and attn.k_proj.down is attn.q_proj.down
    keys = tiny_llama.state_dict().keys()
    assert "model.layers.0.self_attn.q_proj.down.weight" in keys
    assert not any(k.endswith(("k_proj.down.weight", "v_proj.down.weight", "up_proj.down.weight")) for k in keys)
    calls = []
    attn.q_proj.down.register_forward_hook(lambda *_: calls.append(1))
    tiny_llama(calib_ids[:2])
    assert len(calls) == 1  # q, k and v all used one bottleneck product
    # swapping the owner's down (as GPTQ/peft do) is seen by every member
    new = torch.nn.Linear(attn.q_proj.in_features, 8, bias=False)
    attn.q_proj.down = new
    assert attn.v_proj.down is new


def test_shared_bottleneck_gradients_match_unshared(tiny_qwen2, calib_ids):
    groups, stats = _stats(tiny_qwen2, calib_ids)
    facts = lord.factorize_groups(tiny_qwen2, groups, stats, ("lord",), progress=False)["lord"]
    apply_ranks(tiny_qwen2, groups, facts, {g.name: 6 for g in groups}, lord.count_params(tiny_qwen2))
    tiny_qwen2.train()
    owner = tiny_qwen2.model.layers[1].mlp.gate_proj

    def grad() -> torch.Tensor:
        tiny_qwen2.zero_grad()
        tiny_qwen2(calib_ids[:2], labels=calib_ids[:2]).loss.backward()
        return owner.down.weight.grad.clone()

    shared = grad()
    for m in lord.factored_modules(tiny_qwen2).values():
        m._shared.n_members = 1  # disable the cache: each member recomputes down(x)
    assert torch.allclose(shared, grad(), atol=1e-6)


def test_unsupported_architecture_lists_supported():
    from transformers import AutoModelForCausalLM as Auto
    gpt2 = Auto.from_config(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(LordError, match="supported.*gpt_bigcode.*llama.*qwen2"):
        lord.find_groups(gpt2)


def test_targets_and_ignore_patterns(tiny_qwen2):
    names = [g.name for g in lord.find_groups(tiny_qwen2, targets=("*.mlp.*",), ignore=("*.1.*",))]
    assert names == ["model.layers.0.mlp.gate_up", "model.layers.0.mlp.down_proj"]
    with pytest.raises(LordError, match="no group matches"):
        lord.find_groups(tiny_qwen2, targets=("*.nothing",))


# ---- rank plans -------------------------------------------------------------------------------------------

def test_plans_hit_target_stay_below_parity_and_auto_has_least_error(tiny_llama, calib_ids):
    groups, stats = _stats(tiny_llama, calib_ids)
    facts = lord.factorize_groups(tiny_llama, groups, stats, ("lord",), progress=False)["lord"]
    curves = {k: f.error_curve() for k, f in facts.items()}
    total = lord.count_params(tiny_llama)
    errors = {}
    for plan in RANK_PLANS:
        ranks = lord.rank_plan(groups, total, plan, 0.15, curves)
        s = lord.plan_summary(groups, ranks, total)
        assert 0.15 <= s["param_reduction"] < 0.19, plan
        for g in groups:
            r = ranks[g.name]
            assert r is None or 1 <= r < parity_rank(g.m, g.n)
        errors[plan] = sum(float(curves[k][r]) for k, r in ranks.items() if r is not None)
    assert errors["auto"] <= errors["budget"] <= errors["uniform"]
    with pytest.raises(LordError, match="removable"):
        lord.rank_plan(groups, total, "auto", 0.95, curves)


def test_uniform_rank_reduction_is_the_papers_axis(tiny_qwen2):
    groups = lord.find_groups(tiny_qwen2)
    ranks = lord.rank_plan(groups, lord.count_params(tiny_qwen2), "uniform", rank_reduction=0.75)
    for g in groups:
        r = round(0.25 * min(g.m, g.n))
        assert ranks[g.name] == (r if r < parity_rank(g.m, g.n) else None)


def test_linear_param_reduction_counts_every_factorable_linear(tiny_llama, calib_ids):
    """param_reduction is over all parameters (tied counted once), linear_param_reduction over every group's
    ``m n`` even when only some groups are targeted."""
    model = copy.deepcopy(tiny_llama)
    all_groups = lord.find_groups(model)
    linear = sum(g.m * g.n for g in all_groups)
    mlp = lord.find_groups(model, ("*.mlp.*",))
    stats = lord.collect_stats(model, mlp, calib_ids, progress=False)
    report = lord.decompose_model(model, stats, lord.DecomposeConfig(plan="uniform", reduction=0.1,
                                                                     targets=("*.mlp.*",)), progress=False)
    m = report.metrics
    assert m["linear_param_reduction"] == pytest.approx(m["params_removed"] / linear)
    assert m["layer_param_reduction"] == pytest.approx(m["params_removed"] / sum(g.m * g.n for g in mlp))
    total = sum(p.numel() for p in tiny_llama.parameters())  # tied embedding/head: one tensor
    assert tiny_llama.get_input_embeddings().weight is tiny_llama.get_output_embeddings().weight
    assert m["param_reduction"] == pytest.approx(m["params_removed"] / total)


# ---- checkpoints ------------------------------------------------------------------------------------------

def test_checkpoint_round_trip_ours_and_trust_remote_code(tiny_any, calib_ids, tmp_path):
    groups, stats = _stats(tiny_any, calib_ids)
    model = copy.deepcopy(tiny_any)
    report = lord.decompose_model(model, stats, lord.DecomposeConfig(plan="uniform", reduction=0.1),
                                  progress=False)
    assert report.metrics["n_groups_factored"] == len(groups)  # uniform: every group, shared downs included
    out = model(calib_ids).logits
    lord.save_factored(model, None, tmp_path, report.groups, {"method": "lord"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_lord.")
    assert len(cfg["lord"]["groups"]) == len(groups)
    ours, _ = lord.load_factored(tmp_path)
    assert type(next(iter(lord.factored_modules(ours).values()))) is LowRankLinear
    assert torch.equal(ours(calib_ids).logits, out)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert torch.equal(hf(calib_ids).logits, out)
    assert lord.count_params(hf) == lord.count_params(model) < lord.count_params(tiny_any)


def test_plans_reach_any_feasible_target_below_parity():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=40, deadline=None)
    @hypothesis.given(shapes=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=6),
                      frac=st.floats(0.05, 0.95), seed=st.integers(0, 1000))
    def check(shapes, frac, seed):
        groups = [lord.Group(f"g{i}", (f"g{i}.w",), n, (m,)) for i, (m, n) in enumerate(shapes)]
        g = torch.Generator().manual_seed(seed)
        curves = {}
        for grp in groups:  # any non-increasing curve from 1 to 0, as error_curve() produces
            cap = torch.rand(min(grp.m, grp.n), generator=g, dtype=torch.float64)
            curves[grp.name] = 1 - torch.cat([torch.zeros(1, dtype=torch.float64), cap.cumsum(0) / cap.sum()])
        ceiling = sum(max(0, params_removed(x.m, x.n, 1)) for x in groups)
        hypothesis.assume(ceiling > 0)
        total = sum(x.m * x.n for x in groups) * 2
        reduction = frac * ceiling / total
        for plan in RANK_PLANS:
            ranks = lord.rank_plan(groups, total, plan, reduction, curves)
            assert lord.plan_summary(groups, ranks, total)["params_removed"] >= reduction * total - 1e-6
            for x in groups:
                assert ranks[x.name] is None or 1 <= ranks[x.name] <= max_factored_rank(x.m, x.n)

    check()
    # a 2 x 2 group has parity 1: no rank saves anything, so no plan may factor it
    tiny = [lord.Group("a", ("a.w",), 2, (2,)), lord.Group("b", ("b.w",), 8, (8,))]
    curves = {"a": torch.tensor([1.0, 0.5, 0.0]), "b": torch.linspace(1, 0, 9)}
    for plan in RANK_PLANS:
        assert lord.rank_plan(tiny, 100, plan, 0.2, curves)["a"] is None


def test_shared_bottleneck_under_inference_mode_matches_no_grad(tiny_qwen2, calib_ids):
    """generate() runs under torch.inference_mode, whose tensors have no version counter: the shared-down
    cache must still work there (q/k/v and gate/up groups factored) and give the same logits."""
    import lord as _lord

    groups = _lord.find_groups(tiny_qwen2)
    stats = _lord.collect_stats(tiny_qwen2, groups, calib_ids)
    cfg = _lord.DecomposeConfig(method="lord", plan="uniform", reduction=0.1)
    _lord.decompose_model(tiny_qwen2, stats, cfg)
    assert any(len(g.members) > 1 for g in groups)
    with torch.no_grad():
        ref = tiny_qwen2(calib_ids[:2]).logits
    with torch.inference_mode():
        got = tiny_qwen2(calib_ids[:2]).logits
    assert torch.allclose(ref, got, atol=1e-5)
