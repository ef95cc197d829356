"""Loss-probe sensitivity (lord/sensitivity.py) and the sensitivity-weighted ``auto`` plan, on tiny models."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import lord
from forward import decoder_layers
from lord import LordError
from lord.ranks import max_factored_rank
from lord.sensitivity import _LayerTail, fisher_sensitivities, probe_sensitivities, weights_of

VOCAB = 128


def _llama(layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def _ids(n: int = 8, t: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-3, 4, (n, t), generator=g).cumsum(1) % VOCAB).long()


def _facts(model, ids):
    groups = lord.find_groups(model)
    stats = lord.collect_stats(model, groups, ids, progress=False)
    return groups, lord.factorize_groups(model, groups, stats, ("lord",), progress=False)["lord"]


@pytest.fixture(params=["tiny_llama", "tiny_qwen2", "tiny_bigcode"])
def tiny_any(request):
    return request.getfixturevalue(request.param)


def test_layer_tail_reproduces_the_full_forward_loss(tiny_any, calib_ids):
    """Rerunning from a cached layer input after changing a later layer equals a full forward."""
    tail = _LayerTail(tiny_any, calib_ids[:4])
    with torch.no_grad():
        assert tail.dense_loss == pytest.approx(float(tiny_any(input_ids=calib_ids[:4], labels=calib_ids[:4]).loss),
                                                rel=1e-5)
    layers = decoder_layers(tiny_any)
    with torch.no_grad():
        for p in layers[-1].parameters():
            p.mul_(1.5)
        full = tiny_any(input_ids=calib_ids[:4], labels=calib_ids[:4]).loss
    assert tail.loss_from(len(layers) - 1) == pytest.approx(float(full), rel=1e-5)
    assert tail.loss_from(0) == pytest.approx(float(full), rel=1e-5)


def test_sensitivities_finite_positive_and_model_restored(tiny_any, calib_ids):
    groups, facts = _facts(tiny_any, calib_ids)
    before = copy.deepcopy(tiny_any.state_dict())
    sens = probe_sensitivities(tiny_any, groups, facts, calib_ids[:4], probe_fraction=0.5, progress=False)
    for k, v in tiny_any.state_dict().items():
        assert torch.equal(v, before[k]), k  # every probe restored the dense weights exactly
    json.dumps(sens.to_json())  # serialisable as written to the checkpoint dir
    w = weights_of(sens)
    assert set(w) == {g.name for g in groups}
    assert all(math.isfinite(x) and x > 0 for x in w.values())
    for g in groups:
        assert 1 <= sens.groups[g.name]["probe_rank"] <= max_factored_rank(g.m, g.n)
        assert 0 < sens.groups[g.name]["probe_error"] <= 1


def test_fisher_weights_finite_positive_and_leave_no_gradients(tiny_any, calib_ids):
    groups, facts = _facts(tiny_any, calib_ids)
    w = weights_of(fisher_sensitivities(tiny_any, groups, facts, calib_ids[:4], batch_size=2, progress=False))
    assert set(w) == {g.name for g in groups}
    assert all(math.isfinite(x) and x > 0 for x in w.values())
    assert all(p.grad is None and p.requires_grad for p in tiny_any.parameters())


def test_weighted_plan_hits_target_and_respects_parity(tiny_llama, calib_ids):
    groups, facts = _facts(tiny_llama, calib_ids)
    sens = probe_sensitivities(tiny_llama, groups, facts, calib_ids[:4], progress=False)
    curves = {k: f.error_curve() for k, f in facts.items()}
    total = lord.count_params(tiny_llama)
    for reduction in (0.05, 0.15, 0.3):
        ranks = lord.rank_plan(groups, total, "auto", reduction, curves, weights=weights_of(sens))
        s = lord.plan_summary(groups, ranks, total)
        assert reduction <= s["param_reduction"] < reduction + 0.04
        for g in groups:
            assert ranks[g.name] is None or 1 <= ranks[g.name] <= max_factored_rank(g.m, g.n)
    with pytest.raises(LordError, match="positive weight"):
        lord.rank_plan(groups, total, "auto", 0.1, curves, weights={groups[0].name: 1.0})


def _trained_llama() -> tuple[torch.nn.Module, torch.Tensor]:
    """A 3-layer tiny Llama fitted for 80 Adam steps to random-walk ids (~3 s), so loss reacts to its weights."""
    model, ids = _llama(layers=3), _ids(16, 64)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = model(input_ids=ids[:8], labels=ids[:8]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), ids


def test_a_group_made_sensitive_keeps_more_rank():
    """Scaling one down_proj by 8 leaves its normalised error curve unchanged (the curve is scale-free) but
    makes its truncation move the residual stream 8x as much: the probe must rank it most sensitive of its
    type, and the weighted plan must give it more rank than it gives the same group weighted like its least
    sensitive peer. (Compared with the spectrum plan instead, the outcome depends on every other group's
    weight, and flipped with transformers' tiny-model initialisation between 5.23 and 5.24.)"""
    model, ids = _trained_llama()
    target = "model.layers.2.mlp.down_proj"  # the last group: every other group's statistics stay the same
    with torch.no_grad():
        model.get_submodule(target).weight.mul_(8.0)
    groups, facts = _facts(model, ids)
    curves = {k: f.error_curve() for k, f in facts.items()}
    total = lord.count_params(model)
    sens = probe_sensitivities(model, groups, facts, ids[8:12], progress=False)
    others = [v["weight"] for k, v in sens.groups.items() if k.endswith("down_proj") and k != target]
    assert sens.groups[target]["weight"] > max(others)
    fisher = fisher_sensitivities(model, groups, facts, ids[8:12], progress=False)
    g = next(x for x in groups if x.name == target)
    dense = max_factored_rank(g.m, g.n) + 1  # a dense group counts as more rank than any factored one
    plain = lord.rank_plan(groups, total, "spectrum", 0.3, curves)[target] or dense
    assert plain < dense  # the unweighted plan cuts it (scale-free curve)...
    for s in (sens, fisher):  # ...the measured sensitivity protects it
        w = weights_of(s)
        peer = min(v for k, v in w.items() if k.endswith("down_proj") and k != target)
        protected = lord.rank_plan(groups, total, "auto", 0.3, curves, weights=w)[target] or dense
        as_peer = lord.rank_plan(groups, total, "auto", 0.3, curves, weights={**w, target: peer})[target] or dense
        assert protected > as_peer


def test_decompose_model_auto_needs_ids_and_reports_sensitivities(tiny_llama, calib_ids):
    groups = lord.find_groups(tiny_llama)
    stats = lord.collect_stats(tiny_llama, groups, calib_ids, progress=False)
    cfg = lord.DecomposeConfig(plan="auto", reduction=0.1)
    with pytest.raises(LordError, match="sensitivity_ids"):
        lord.decompose_model(copy.deepcopy(tiny_llama), stats, cfg, progress=False)
    model = copy.deepcopy(tiny_llama)
    report = lord.decompose_model(model, stats, cfg, progress=False, sensitivity_ids=calib_ids[:4])
    assert report.metrics["param_reduction"] >= 0.1
    assert set(weights_of(report.plan.sensitivity)) == {g.name for g in groups}
    assert report.metrics["sensitivity_seconds"] > 0


def test_config_validates_sensitivity_fields():
    with pytest.raises(LordError, match="probe_fraction"):
        lord.DecomposeConfig(plan="auto", probe_fraction=0.0)
    with pytest.raises(LordError, match="sensitivity_seqs"):
        lord.DecomposeConfig(plan="auto", sensitivity_seqs=0)


def test_search_plan_measures_its_candidates_and_restores_the_model(tiny_any):
    """The measured plan: meets the target below parity, never loses to uniform or its rival on calibration
    loss (it evaluates them), scores a candidate with the same loss a really factored model has, and leaves
    the dense model exactly as it was."""
    from torch.nn import functional as F  # noqa: N812

    from lord.search import group_type, search_plan, type_ranks

    model = tiny_any
    ids = _ids(12, 64)
    groups, facts = _facts(model, ids[:8])
    total = lord.count_params(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    target = 0.2 * total
    uniform = lord.rank_plan(groups, total, "uniform", 0.2)
    assert type_ranks(groups, {group_type(g): 1.0 for g in groups}, target) == uniform  # c = 1: uniform
    types = sorted({group_type(g) for g in groups})
    one_dense = type_ranks(groups, {t: 0.0 if t == types[0] else 1.0 for t in types}, target)  # c = 0: dense
    assert all((one_dense[g.name] is None) == (group_type(g) == types[0]) for g in groups)
    assert lord.plan_summary(groups, one_dense, total)["params_removed"] >= target
    assert type_ranks(groups, dict.fromkeys(types, 0.0), target) is None  # nothing left to cut
    rival = lord.rank_plan(groups, total, "spectrum", 0.2, {k: f.error_curve() for k, f in facts.items()})
    ranks, rep = search_plan(model, groups, facts, ids[8:], target, passes=1, progress=False,
                             candidates={"spectrum": rival})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(type(model.get_submodule(m)).__name__ != "_Sliced" for g in groups for m in g.members)
    assert lord.plan_summary(groups, ranks, total)["params_removed"] >= target
    assert all(r is None or r <= max_factored_rank(g.m, g.n) for g, r in zip(groups, ranks.values(), strict=True))
    losses = {h.get("candidate", "uniform" if i == 0 else "types"): h["loss"] for i, h in enumerate(rep["history"])}
    assert rep["loss"] == min(h["loss"] for h in rep["history"]) <= min(losses["uniform"], losses["spectrum"])
    factored = copy.deepcopy(model)
    lord.apply_ranks(factored, groups, facts, ranks, total)
    with torch.no_grad():
        logits = factored(input_ids=ids[8:]).logits[:, :-1].float()
        real = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[8:, 1:].reshape(-1)))
    assert real == pytest.approx(rep["loss"], rel=1e-4)
    # an independent batch re-scores the finalists; its argmin wins, whatever the search batch said
    ranks_v, rep_v = search_plan(model, groups, facts, ids[8:], target, passes=1, progress=False,
                                 candidates={"spectrum": rival}, validation_ids=ids[:4])
    assert {"uniform", "spectrum"} <= set(rep_v["validation_loss"])
    assert rep_v["chosen"] == min(rep_v["validation_loss"], key=rep_v["validation_loss"].get)
    assert ranks_v == {"uniform": uniform, "spectrum": rival}.get(rep_v["chosen"], ranks_v)
    # only the best few on the search batch are re-scored (each is a forward of the model)
    _, rep_1 = search_plan(model, groups, facts, ids[8:], target, passes=1, progress=False,
                           candidates={"spectrum": rival}, validation_ids=ids[:4], validate_top=1)
    assert list(rep_1["validation_loss"]) == [rep["chosen"]] and rep_1["chosen"] == rep["chosen"]


def test_decompose_model_search_plan_reports_choice(tiny_llama, calib_ids):
    groups = lord.find_groups(tiny_llama)
    stats = lord.collect_stats(tiny_llama, groups, calib_ids, progress=False)
    report = lord.decompose_model(tiny_llama, stats, lord.DecomposeConfig(plan="search", reduction=0.1),
                                  progress=False, sensitivity_ids=calib_ids[:4])
    assert report.metrics["param_reduction"] >= 0.1
    assert report.metrics["search_chosen"] in ("uniform", "types", "auto") or \
        report.metrics["search_chosen"].startswith(("least-sensitive ", "auto over least-sensitive "))
    # the auto plan over the least sensitive half competes too, and meets the target on its own
    tried = [h["candidate"] for h in report.plan.search["history"] if "candidate" in h]
    n = len(groups)
    assert f"auto over least-sensitive {n // 2}/{n}" in tried
    assert report.metrics["search_loss"] <= report.metrics["search_loss_uniform"]
    assert report.plan.search["evaluations"] > 1
    assert report.plan.to_json()["_search"] == report.plan.search  # sensitivity.json's layout
    with pytest.raises(LordError, match="decompose_model"):
        lord.rank_plan(groups, lord.count_params(tiny_llama), "search", 0.1)


def test_least_sensitive_ranks_cut_the_cheapest_share_deeper():
    """A small cut in fewer groups: each candidate factors only the lowest-weight share, uniformly, and still
    meets the target; the other groups stay dense; a share that cannot meet the target is not offered."""
    from lord.search import least_sensitive_ranks
    from lord.surgery import Group

    groups = [Group(f"l{i}.down", (f"l{i}.down",), 4864, (896,), i, "down") for i in range(8)]
    weights = {g.name: w for g, w in zip(groups, (9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0), strict=True)}
    total = 10 ** 8
    target = 0.01 * total
    cands = least_sensitive_ranks(groups, weights, target)
    assert set(cands) == {"least-sensitive 4/8", "least-sensitive 3/8", "least-sensitive 2/8"}
    half = cands["least-sensitive 4/8"]
    assert [g.name for g in groups if half[g.name] is not None] == ["l1.down", "l3.down", "l5.down", "l7.down"]
    assert len({half[n] for n in ("l1.down", "l3.down", "l5.down", "l7.down")}) == 1  # uniform on the share
    uniform = lord.rank_plan(groups, total, "uniform", 0.01)
    assert half["l1.down"] < uniform["l1.down"]  # fewer groups, each cut deeper
    for ranks in cands.values():
        assert lord.plan_summary(groups, ranks, total)["params_removed"] >= target
    # 2 groups of 8 hold 25% of their parameters: they cannot remove 30%; 3 can
    big = least_sensitive_ranks(groups, weights, 0.3 * 8 * 896 * 4864)
    assert "least-sensitive 2/8" not in big and "least-sensitive 3/8" in big


def test_auto_over_share_leaves_the_sensitive_groups_dense_and_meets_the_target():
    """The auto plan restricted to the least sensitive half: the other half stays dense, the target is met, and a
    share that cannot remove it is refused with a LordError (search then skips that candidate)."""
    from lord.plans import PlanContext, auto_over_share
    from lord.surgery import Group

    groups = [Group(f"l{i}.down", (f"l{i}.down",), 4864, (896,), i, "down") for i in range(8)]
    weights = {g.name: w for g, w in zip(groups, (9.0, 1.0, 8.0, 2.0, 7.0, 3.0, 6.0, 4.0), strict=True)}
    curves = {g.name: torch.linspace(1.0, 0.0, 897) ** 2 * (1 + g.layer) for g in groups}  # later: steeper
    total = 10 ** 8
    label, ranks = auto_over_share(PlanContext(groups, total, 0.01, None, curves, weights), 0.5)
    assert label == "auto over least-sensitive 4/8" and set(ranks) == {g.name for g in groups}
    assert {n for n, r in ranks.items() if r is not None} <= {"l1.down", "l3.down", "l5.down", "l7.down"}
    assert lord.plan_summary(groups, ranks, total)["params_removed"] >= 0.01 * total
    with pytest.raises(LordError):  # 2 of 8 groups cannot remove 30% of all their parameters
        auto_over_share(PlanContext(groups, 8 * 896 * 4864, 0.3, None, curves, weights), 0.25)


def test_search_over_one_type_measures_each_distinct_plan_once(tiny_llama):
    """With a single group type every multiplier re-plans the same uniform cut; the loss is measured once per
    distinct plan (the search's cost on the default preset, which factors down_proj only)."""
    from lord.search import search_plan

    ids = _ids(12, 64)
    groups, facts = _facts(tiny_llama, ids[:8])
    down = [g for g in groups if g.kind == "down"]
    total = lord.count_params(tiny_llama)
    _, rep = search_plan(tiny_llama, down, facts, ids[8:], 0.05 * total, passes=2, progress=False)
    distinct = {tuple(sorted(h["multipliers"].items())) for h in rep["history"]}
    assert len(rep["history"]) > rep["evaluations"] >= 1
    assert rep["evaluations"] <= len(distinct)
