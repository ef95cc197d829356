"""Distillation recovery (finetune.kd) on tiny random models: the top-k KL against a hand computation, the loss
falling over steps on a LoRD student, the teacher cache, the source chain, and the wall-clock budget."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from test_finetune import char_tokenizer

from finetune import FinetuneConfig, FinetuneError, finetune_to_dir
from finetune.kd import kd_windows, resolve_teacher, teacher_topk, topk_kl
from finetune.train import lr_factor

CODE = "def add(a, b):\n    return a + b\n\n\nclass Box:\n    def __init__(self, x):\n        self.x = x\n"


def test_topk_kl_equals_full_kl_when_k_is_vocab():
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 11, generator=g) * 3, torch.randn(2, 5, 11, generator=g) * 3
    idx, logp = teacher_topk(teacher, k=11)
    full = torch.nn.functional.kl_div(torch.log_softmax(student, -1), torch.log_softmax(teacher, -1),
                                      log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(topk_kl(student, idx, logp), full, atol=1e-5, rtol=1e-5)


def test_topk_kl_matches_a_hand_computation():
    teacher = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    student = torch.tensor([[0.5, 1.5, 0.2, 0.1]])
    idx, logp = teacher_topk(teacher, k=2)
    assert idx.tolist() == [[0, 1]]
    p = [math.exp(x) / sum(math.exp(y) for y in (2, 1, 0, -1)) for x in (2, 1, 0, -1)]
    q = [math.exp(x) / sum(math.exp(y) for y in (0.5, 1.5, 0.2, 0.1)) for x in (0.5, 1.5, 0.2, 0.1)]
    # KL between the two distributions coarsened to {token 0, token 1, everything else}
    pt, qt = p[2] + p[3], q[2] + q[3]
    hand = p[0] * math.log(p[0] / q[0]) + p[1] * math.log(p[1] / q[1]) + pt * math.log(pt / qt)
    assert float(topk_kl(student, idx, logp)) == pytest.approx(hand, rel=1e-5)
    assert float(topk_kl(teacher, idx, logp)) == pytest.approx(0.0, abs=1e-6)  # the teacher matches itself


@pytest.fixture
def kd_setup(tiny_llama, calib_ids, tmp_path) -> tuple[Path, Path, Path]:
    """(dense teacher dir, LoRD student dir compressed from it, code dir). The final norm and the layer weights
    are scaled up so the teacher's next-token distributions are peaked and depend on the compressed layers
    (a random tiny model's are near uniform and dominated by the embedding)."""
    from lord import DecomposeConfig, collect_stats, decompose_model, find_groups, save_factored

    with torch.no_grad():
        tiny_llama.model.norm.weight.mul_(30.0)
        for p in tiny_llama.model.layers.parameters():
            if p.ndim == 2:
                p.mul_(6.0)  # so the layers (what LoRD compresses) shape the output, not just the embedding
    teacher = tmp_path / "teacher"
    tiny_llama.save_pretrained(teacher)
    char_tokenizer().save_pretrained(teacher)
    stats = collect_stats(tiny_llama, find_groups(tiny_llama), calib_ids, progress=False)
    report = decompose_model(tiny_llama, stats, DecomposeConfig(method="lord", plan="uniform", reduction=None,
                                                                rank_reduction=0.7), progress=False)
    student = tmp_path / "student"
    save_factored(tiny_llama, char_tokenizer(), student, report.groups, {"method": "lord"})
    (student / "lord_artifact.json").write_text(json.dumps({"kind": "lord", "loader": "lord.checkpoint:load_factored",
                                                            "source": str(teacher)}))
    code = tmp_path / "code"
    code.mkdir()
    for i in range(8):
        (code / f"m{i}.py").write_text(CODE.replace("add", f"add{i}") * 3)
    return teacher, student, code


def kd_cfg(code: Path, cache: Path, **kw) -> FinetuneConfig:
    base = dict(objective="kd", data=str(code), kd_cache_dir=str(cache), kd_n_seqs=12, n_eval=2, max_seq_len=32,
                kd_top_k=8, lora_r=4, lora_alpha=8, steps=24, micro_batch_size=2, grad_accum_steps=1, lr=1e-2,
                warmup_steps=0, eval_every=8, lora_dropout=0.0, base="float", merge=False, early_stop_patience=0)
    return FinetuneConfig(**{**base, **kw})


def test_kd_loss_falls_and_teacher_targets_are_cached(kd_setup, tmp_path):
    teacher, student, code = kd_setup
    cfg = kd_cfg(code, tmp_path / "cache")
    m = finetune_to_dir(str(student), cfg, tmp_path / "ft", progress=False)
    assert m["objective"] == "kd" and m["data"]["teacher"]["teacher"] == str(teacher)  # found via the source
    assert m["data"]["teacher"]["cached"] is False
    assert m["eval_loss_before"] > 0.05  # the compressed student really differs from the teacher
    assert m["eval_loss_after"] < 0.8 * m["eval_loss_before"]
    losses = m["curve"]["train_loss"]
    assert len(losses) == 24 and sum(losses[-4:]) < 0.8 * sum(losses[:4])
    assert (tmp_path / "ft" / "loss_curve.png").stat().st_size > 1000
    again = finetune_to_dir(str(student), cfg, tmp_path / "ft2", progress=False)
    assert again["data"]["teacher"]["cached"] is True
    assert again["eval_loss_before"] == pytest.approx(m["eval_loss_before"], rel=1e-6)


def test_kd_on_a_gptq_base_finds_the_dense_teacher_through_the_chain(kd_setup, tmp_path):
    """What the flow runs: LoRA on our GPTQ-4 LoRD model, the teacher found via gptq -> lord -> dense."""
    from quant import QuantConfig, quantize_to_dir

    teacher, student, code = kd_setup
    qdir = tmp_path / "gptq"
    quantize_to_dir(str(student), QuantConfig(bits=4, group_size=32, n_seqs=4, seq_len=32), qdir)
    m = finetune_to_dir(str(qdir), kd_cfg(code, tmp_path / "cache", steps=12, merge=True), tmp_path / "ft",
                        progress=False)
    assert m["base_kind"] == "gptq" and m["data"]["teacher"]["teacher"] == str(teacher)
    assert m["eval_loss_after"] < m["eval_loss_before"]
    # evaluation loads it in the compute dtype: on a bf16 CPU the float32 adapter must not turn the residual
    # stream float32 under a bf16 lm_head (a make run failed so)
    from finetune.checkpoint import load_finetuned

    net, _ = load_finetuned(tmp_path / "ft", dtype=torch.bfloat16)
    with torch.no_grad():
        logits = net(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_budget_stops_the_run_cleanly(kd_setup, tmp_path):
    _, student, code = kd_setup
    cfg = kd_cfg(code, tmp_path / "cache", steps=None, budget_minutes=0.03, eval_every=1000)
    t0 = time.perf_counter()
    m = finetune_to_dir(str(student), cfg, tmp_path / "ft", progress=False)
    assert m["budget_stop"] is True and m["steps_done"] >= 2
    assert m["train_seconds"] <= 0.03 * 60 + 1.0  # at most one step / eval past the budget
    assert time.perf_counter() - t0 < 60
    assert (tmp_path / "ft" / "adapter" / "adapter_config.json").is_file()  # saved when the budget ran out


def test_budget_anneals_the_schedule():
    cfg = FinetuneConfig(steps=None, budget_minutes=1.0, warmup_steps=2)
    assert lr_factor(0, cfg, 0.0) == pytest.approx(1 / 3)  # the first step learns (a budget may allow one)
    assert lr_factor(1, cfg, 0.0) == pytest.approx(2 / 3)
    assert lr_factor(5, cfg, 0.0) == pytest.approx(1.0)
    assert lr_factor(5, cfg, 30.0) == pytest.approx(0.5)
    assert lr_factor(5, cfg, 60.0) == pytest.approx(0.0)


def test_source_chain_and_bad_inputs(tmp_path):
    dense, lord, gptq = tmp_path / "dense", tmp_path / "lord", tmp_path / "gptq"
    for d in (dense, lord, gptq):
        d.mkdir()
    (lord / "lord_artifact.json").write_text(json.dumps({"kind": "lord", "source": str(dense)}))
    (gptq / "lord_artifact.json").write_text(json.dumps({"kind": "gptq", "source": str(lord)}))
    assert resolve_teacher(gptq, FinetuneConfig()) == str(dense)
    assert resolve_teacher(gptq, FinetuneConfig(teacher="other")) == "other"
    # a trimmed vocabulary in the chain is the teacher: the student shares its tokenizer, not the original's
    trimmed = tmp_path / "trimmed"
    trimmed.mkdir()
    (trimmed / "lord_artifact.json").write_text(json.dumps({"kind": "dense", "stage": "vocab", "source": str(dense)}))
    (lord / "lord_artifact.json").write_text(json.dumps({"kind": "lord", "source": str(trimmed)}))
    assert resolve_teacher(gptq, FinetuneConfig()) == str(trimmed)
    with pytest.raises(FinetuneError, match="objective"):
        FinetuneConfig(objective="distil")
    with pytest.raises(FinetuneError, match="budget"):
        FinetuneConfig(steps=None)
    with pytest.raises(FinetuneError, match="kd_n_seqs"):
        FinetuneConfig(objective="kd", kd_n_seqs=8, n_eval=8)


def test_kd_windows_read_a_corpus_mix_and_refuse_instruction_files(tmp_path):
    """KD data may be a mix of roots ("stdlib,pkg:numpy", dirs): windows come from its calibration side only."""
    roots = []
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        for i in range(8):
            (d / f"{name}{i}.py").write_text(CODE.replace("add", f"{name}_add{i}") * 4)
        roots.append(str(d))
    tok = char_tokenizer()
    ids, info = kd_windows(tok, FinetuneConfig(objective="kd", data=",".join(roots), kd_n_seqs=6, n_eval=2,
                                               max_seq_len=32))
    assert ids.shape == (6, 32) and info["root"] == ",".join(roots)
    assert info["n_calibration_files"] + info["n_heldout_files"] == 16
    jsonl = tmp_path / "inst.jsonl"
    jsonl.write_text('{"instruction": "x", "output": "y"}\n')
    with pytest.raises(FinetuneError, match="reads code"):
        kd_windows(tok, FinetuneConfig(objective="kd", data=str(jsonl), kd_n_seqs=6, n_eval=2))


def test_tracker_logs_the_loss_curve_as_a_metric_history(tmp_path):
    from bench.harness import temp_mlflow_store
    from flows.tracking import Tracker

    run_dir = tmp_path / "artifact"
    run_dir.mkdir()
    metrics = {"eval_loss_after": 0.5, "curve": {"train_loss": [3.0, 2.0, 1.5], "eval_loss": {"0": 3.2, "3": 1.4}}}
    with temp_mlflow_store(tmp_path) as uri:
        tracker = Tracker("test-curves", uri=uri)
        tracker.start_parent("p", {}, {})
        run_id = tracker.log_stage("finetune", "finetune", {}, {"metrics": metrics, "dir": str(run_dir), "key": "k",
                                                                  "seconds": 1.0}, cached=False, tags={})
        history = tracker.client.get_metric_history(run_id, "curve.train_loss")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(1, 3.0), (2, 2.0), (3, 1.5)]
        assert {m.step for m in tracker.client.get_metric_history(run_id, "curve.eval_loss")} == {0, 3}
        assert tracker.client.get_run(run_id).data.metrics["eval_loss_after"] == 0.5


def test_blockwise_refinement_lowers_each_layer_error_and_the_heldout_kl(kd_setup, tmp_path):
    """Block-wise distillation of the LoRD factors: every factored layer's output error vs the dense layer
    falls, the refined checkpoint reloads, and it is closer to the teacher on windows it never saw."""
    from finetune.blockwise import BlockwiseConfig, blockwise_to_dir
    from sources import load_model

    teacher, student, code = kd_setup
    text = (CODE.replace("add", "mul").replace("Box", "Bag") * 4)[:128]  # code the refinement never saw
    ids = char_tokenizer()(text, return_tensors="pt")["input_ids"].reshape(4, 32)

    def kl_to_teacher(spec: str) -> float:
        t, _ = load_model(str(teacher))
        s, _ = load_model(spec)
        with torch.no_grad():
            idx, logp = teacher_topk(t(input_ids=ids).logits, k=128)
            return float(topk_kl(s(input_ids=ids).logits, idx, logp).mean())

    # the process clock: the same compute when CI shares the CPU (a wall budget of 1.2 s left ~1 step a layer)
    cfg = BlockwiseConfig(budget_minutes=0.02, lr=3e-3, n_seqs=16, seq_len=32, data=str(code), budget_clock="process")
    report = blockwise_to_dir(str(student), cfg, tmp_path / "refined", progress=False)
    assert report["layers"] and all(r["rel_err_after"] < r["rel_err_before"] for r in report["layers"])
    assert report["rel_err_after_mean"] < report["rel_err_before_mean"] and report["teacher"] == str(teacher)
    # the budget covers the captures and layer forwards too: the run ends near it, not budget + overhead
    assert report["budget_seconds"] <= report["budget_seconds_allowed"] + 0.5
    meta = json.loads((tmp_path / "refined" / "lord_artifact.json").read_text())
    assert meta["kind"] == "lord" and meta["source"] == str(teacher) and meta["refined"]["method"] == "blockwise"
    assert kl_to_teacher(str(tmp_path / "refined")) < kl_to_teacher(str(student))


def test_refine_stage_switches_and_config_errors():
    """The optional refine stage sits between decompose and quantize, needs decompose, and its config rejects
    bad values before any compute."""
    from finetune import BlockwiseConfig, FinetuneError
    from flows import FlowError
    from flows.presets import resolve_spec
    from flows.stages import build_config

    spec = resolve_spec("smoke", stages={"refine": True})
    assert spec.enabled.index("decompose") + 1 == spec.enabled.index("refine") < spec.enabled.index("quantize")
    assert spec.stage_kwargs["refine"]["budget_minutes"] > 0
    assert "refine" not in resolve_spec("smoke").enabled  # optional: off unless asked or the preset enables it
    with pytest.raises(FlowError, match="refine=True with decompose=False"):
        resolve_spec("smoke", stages={"refine": True, "decompose": False})
    for bad in ({"budget_minutes": 0}, {"n_seqs": 0}, {"seq_len": 8}, {"budget_clock": "cpu"}):
        with pytest.raises(FinetuneError):
            BlockwiseConfig(**bad)
    with pytest.raises(FlowError, match="valid fields of BlockwiseConfig"):
        build_config("refine", {"budget": 5})


def test_blockwise_keeps_a_layers_start_when_training_made_it_worse(kd_setup, tmp_path):
    """A diverging run (absurd lr) must not leave worse factors behind: every layer whose probe error rose is
    reverted to its starting factors, so the refined checkpoint equals the input one."""
    from safetensors.torch import load_file

    from finetune.blockwise import BlockwiseConfig, blockwise_to_dir

    _, student, code = kd_setup
    cfg = BlockwiseConfig(budget_minutes=0.01, lr=50.0, min_steps=3, n_seqs=8, seq_len=32, data=str(code))
    report = blockwise_to_dir(str(student), cfg, tmp_path / "refined", progress=False)
    assert report["layers_reverted"] == len(report["layers"]) > 0
    # worse, or not finite at all (lr 50 can overflow): either way the start is kept
    assert all(not r["rel_err_trained"] < r["rel_err_before"] == r["rel_err_after"] for r in report["layers"])
    before = {k: v for f in sorted(Path(student).glob("*.safetensors")) for k, v in load_file(f).items()}
    after = {k: v for f in sorted((tmp_path / "refined").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_eora_init_starts_the_adapter_from_the_quantization_error(kd_setup, tmp_path):
    """lora_init='eora' on a GPTQ-3 base of the dense model: the adapter at step 0 is the activation-weighted
    rank-r approximation of each layer's quantization error, so the calibration output error of the
    quantization falls and the KD loss (the teacher is the float model itself) starts below the zero adapter's."""
    from quant import QuantConfig, quantize_to_dir

    teacher, student, code = kd_setup
    qdir = tmp_path / "gptq"
    quantize_to_dir(str(teacher), QuantConfig(bits=3, group_size=32, n_seqs=4, seq_len=32), qdir)
    kw = dict(steps=1, lr=1e-9, merge=False, lora_r=8, lora_alpha=16)
    zero = finetune_to_dir(str(qdir), kd_cfg(code, tmp_path / "cache", **kw), tmp_path / "zero", progress=False)
    eora = finetune_to_dir(str(qdir), kd_cfg(code, tmp_path / "cache", lora_init="eora", init_n_seqs=6, **kw),
                           tmp_path / "eora", progress=False)
    assert zero["lora_init"] == "zero" and eora["lora_init"] == "eora"
    assert eora["eora_reference"] == str(teacher) and eora["eora_layers"] == 2 * 7
    assert eora["eora_quant_error_before"] > 0.01  # 3-bit weights really are off
    assert eora["eora_quant_error_after"] < 0.7 * eora["eora_quant_error_before"]
    assert eora["eval_loss_before"] < 0.8 * zero["eval_loss_before"]
    # the kept adapter is the compensation (not zero), and the artifact loads with it
    from finetune.checkpoint import load_finetuned

    net, _ = load_finetuned(tmp_path / "eora")
    a = next(m for n, m in net.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_B"))
    assert float(a.lora_B["default"].weight.abs().sum()) > 0
    # QLoRA's NF4 base: the error is against the float model the base was loaded from
    nf4 = finetune_to_dir(str(teacher), kd_cfg(code, tmp_path / "cache", lora_init="eora", base="nf4", **kw),
                          tmp_path / "nf4", progress=False)
    assert nf4["eora_reference"] == str(teacher)
    assert nf4["eora_quant_error_after"] < nf4["eora_quant_error_before"]


def test_eora_leaves_lord_factor_pairs_at_zero(kd_setup, tmp_path):
    """The quantize stage rebalances and refits a factor pair, so its float factors are no reference: EoRA
    initialises only the dense linears of a LoRD + GPTQ base and says how many factors it left at zero; a base
    with nothing else is refused."""
    from quant import QuantConfig, quantize_to_dir

    _, student, code = kd_setup
    qdir = tmp_path / "gptq"
    quantize_to_dir(str(student), QuantConfig(bits=4, group_size=32, n_seqs=4, seq_len=32), qdir)
    with pytest.raises(FinetuneError, match="outside LoRD factor pairs"):
        finetune_to_dir(str(qdir), kd_cfg(code, tmp_path / "cache", lora_init="eora", steps=1), tmp_path / "ft",
                        progress=False)
    assert not (tmp_path / "ft").exists()


def test_eora_refuses_a_base_without_its_float_source_and_bad_configs(kd_setup, tmp_path):
    from finetune.eora import reference_dir
    from quant import QuantConfig, quantize_to_dir

    teacher, _, code = kd_setup
    qdir = tmp_path / "gptq"
    quantize_to_dir(str(teacher), QuantConfig(bits=4, group_size=32, n_seqs=4, seq_len=32), qdir)
    assert reference_dir(qdir, "gptq") == teacher
    meta = json.loads((qdir / "lord_artifact.json").read_text())
    (qdir / "lord_artifact.json").write_text(json.dumps({**meta, "source": str(tmp_path / "gone")}))
    with pytest.raises(Exception, match="gone"):
        reference_dir(qdir, "gptq")
    with pytest.raises(FinetuneError, match="needs a 4-bit base"):
        finetune_to_dir(str(teacher), kd_cfg(code, tmp_path / "cache", lora_init="eora", steps=1),
                        tmp_path / "float", progress=False)  # base="float": nothing to compensate
    assert not (tmp_path / "float").exists()
    with pytest.raises(FinetuneError, match="lora_init"):
        FinetuneConfig(lora_init="svd")
    with pytest.raises(FinetuneError, match="init_n_seqs"):
        FinetuneConfig(init_n_seqs=0)


def test_a_zero_adapter_is_not_shipped(kd_setup, tmp_path):
    """Training that keeps its zero start (no eval beat it) writes no adapter weights: the artifact loads as its
    GPTQ base, same logits, no LoRA parameters, and evaluation counts no adapter bytes."""
    from evaluation.evaluate import logical_params, model_size_mb
    from finetune.checkpoint import load_finetuned
    from quant import QuantConfig, quantize_to_dir
    from sources import load_model

    _, student, code = kd_setup
    qdir = tmp_path / "gptq"
    quantize_to_dir(str(student), QuantConfig(bits=4, group_size=32, n_seqs=4, seq_len=32), qdir)
    kw = dict(steps=2, eval_every=1, early_stop_min_delta=10.0)  # no eval can beat the start by 10 nats
    m = finetune_to_dir(str(qdir), kd_cfg(code, tmp_path / "cache", **kw), tmp_path / "ft", progress=False)
    assert m["best_step"] == 0 and m["adapter_dropped"] is True
    assert json.loads((tmp_path / "ft" / "lord_artifact.json").read_text())["adapter"] is None
    assert not list((tmp_path / "ft").rglob("*.safetensors")) and model_size_mb(str(tmp_path / "ft")) == 0.0
    net, _ = load_finetuned(tmp_path / "ft")
    base, _ = load_model(str(qdir))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(net(input_ids=ids).logits, base(input_ids=ids).logits)
    assert logical_params(net) == logical_params(base)
    # an adapter that did learn is kept
    kept = finetune_to_dir(str(qdir), kd_cfg(code, tmp_path / "cache", steps=8), tmp_path / "kept", progress=False)
    assert kept["best_step"] > 0 and kept["adapter_dropped"] is False
    assert (tmp_path / "kept" / "adapter" / "adapter_model.safetensors").is_file()
