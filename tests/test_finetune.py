"""QLoRA stage on tiny random models (plumbing, errors, save/load, merge) and one real-model run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from finetune import FinetuneConfig, FinetuneError, finetune_to_dir, load_finetuned, target_module_names
from finetune.data import load_instructions, tokenize_split, validate_jsonl
from finetune.qlora import attach_lora, load_base
from sources.artifact import write_artifact_meta

CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A real tokenizer (one token per character, 99 ids) that fits the fixtures' 128-token vocab."""
    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")


RECORDS = [
    {"instruction": f"Return {a} plus {b}.", "output": f"def f():\n    return {a} + {b}\n"}
    for a in range(6) for b in range(4)
]


@pytest.fixture
def tiny_dir(tiny_llama, tmp_path) -> Path:
    d = tmp_path / "tiny"
    tiny_llama.save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


@pytest.fixture
def data_file(tmp_path) -> Path:
    p = tmp_path / "data.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return p


def small_cfg(data_file: Path, **kw) -> FinetuneConfig:
    base = dict(data=str(data_file), n_eval=4, max_seq_len=64, lora_r=4, lora_alpha=8, steps=8,
                micro_batch_size=2, grad_accum_steps=2, lr=5e-3, warmup_steps=1, eval_every=4, lora_dropout=0.0)
    return FinetuneConfig(**{**base, **kw})


def test_stage_trains_saves_and_merges(tiny_dir, data_file, tmp_path):
    out = tmp_path / "ft"
    metrics = finetune_to_dir(str(tiny_dir), small_cfg(data_file, dtype="float32"), out, progress=False)
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["base_quant"] == "nf4" and metrics["double_quant"] is True
    assert metrics["steps_done"] == 8 and metrics["seconds_per_step"] > 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "lord_artifact.json").read_text())["kind"] == "adapter"
    # the merged float model computes what the NF4 + LoRA model computed (in float32: on a bf16 CPU "auto"
    # dequantizes NF4 into bf16, ~2e-3 off the float32 merge; the config's dtype is what bnb computes in)
    base, tok = load_base(tiny_dir, small_cfg(data_file, dtype="float32"))
    from peft import PeftModel

    adapter_model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged, _ = load_finetuned(out)
    ids = tok(["def f():\n    return 1 + 2"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = adapter_model(input_ids=ids).logits
        m = merged(input_ids=ids).logits
    assert torch.allclose(a, m, atol=1e-3, rtol=1e-3), (a - m).abs().max()


def test_bad_data_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(FinetuneError, match="empty"):
        validate_jsonl(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(RECORDS[0]) + "\n{not json\n")
    with pytest.raises(FinetuneError, match=r"bad.jsonl:2: not valid JSON"):
        validate_jsonl(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(FinetuneError, match=r"missing.jsonl:1: field 'output'"):
        load_instructions(missing)
    with pytest.raises(FinetuneError, match="does not exist"):
        validate_jsonl(tmp_path / "nope.jsonl")


def test_no_targetable_modules(tiny_dir, data_file):
    model, _ = load_base(tiny_dir, small_cfg(data_file))
    with pytest.raises(FinetuneError, match="no linear layer named like"):
        attach_lora(model, small_cfg(data_file, target_modules=("nonexistent_proj",)))


def test_config_validation():
    with pytest.raises(FinetuneError, match="scheduler"):
        FinetuneConfig(scheduler="exponential")
    with pytest.raises(FinetuneError, match="steps"):
        FinetuneConfig(steps=0)


def test_prompt_is_masked(data_file):
    tok = char_tokenizer()
    split = tokenize_split(load_instructions(data_file), tok, max_seq_len=128, n_eval=2, seed=0)
    ex = split.train[0]
    supervised = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != -100]
    assert tok.decode(supervised).startswith("def f():") and supervised[-1] == tok.eos_token_id


@pytest.fixture
def tiny_lord_dir(tiny_llama, calib_ids, tmp_path) -> Path:
    """A real LoRD checkpoint of the tiny Llama (q/k/v and gate/up share a bottleneck), as lord writes it."""
    from lord import DecomposeConfig, collect_stats, decompose_model, find_groups, save_factored

    stats = collect_stats(tiny_llama, find_groups(tiny_llama), calib_ids, progress=False)
    report = decompose_model(tiny_llama, stats, DecomposeConfig(method="lord", plan="uniform", reduction=None,
                                                                rank_reduction=0.5), progress=False)
    d = tmp_path / "tiny_lord"
    save_factored(tiny_llama, char_tokenizer(), d, report.groups, {"method": "lord"})
    write_artifact_meta(d, "lord")
    return d


def test_lord_base_factors_are_quantized_and_adapted(tiny_lord_dir, data_file, tmp_path):
    import bitsandbytes as bnb

    from lord import LowRankLinear
    from sources import load_model

    cfg = small_cfg(data_file, dtype="float32")  # compared with the float32 merge below
    base, _ = load_base(tiny_lord_dir, cfg)
    factored = [n for n, m in base.named_modules() if type(m).__name__ == "LowRankLinear"]
    assert factored, "the LoRD checkpoint loaded without factored projections"
    names = target_module_names(base, cfg.target_modules)
    assert any(n.endswith("q_proj.down") for n in names) and any(n.endswith("k_proj.up") for n in names)
    assert all(isinstance(base.get_submodule(n), bnb.nn.Linear4bit) for n in names)

    out = tmp_path / "ft_lord"
    metrics = finetune_to_dir(str(tiny_lord_dir), cfg, out, progress=False)
    assert metrics["base_kind"] == "lord" and metrics["eval_loss_after"] < metrics["eval_loss_before"]
    merged, tok = load_model(str(out))  # kind "adapter" -> finetune.checkpoint:load_finetuned
    assert any(isinstance(m, LowRankLinear) or type(m).__name__ == "LowRankLinear" for m in merged.modules())
    from peft import PeftModel

    adapter_model = PeftModel.from_pretrained(load_base(tiny_lord_dir, cfg)[0], str(out / "adapter")).eval()
    ids = tok(["def f():\n    return 3 + 1"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(adapter_model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-3, rtol=1e-3)


def test_adapter_round_trip_and_seeded(tiny_dir, data_file, tmp_path):
    """A saved peft adapter reloaded on a fresh NF4 base reproduces the trained model; same seed, same run."""
    from peft import PeftModel

    from finetune import train
    from finetune.data import load_instructions

    cfg = small_cfg(data_file, steps=4)
    logits = []
    for _ in range(2):
        model, tok = load_base(tiny_dir, cfg)
        model = attach_lora(model, cfg)
        split = tokenize_split(load_instructions(data_file), tok, cfg.max_seq_len, cfg.n_eval, cfg.seed)
        train(model, split.train, split.eval, cfg, tok.pad_token_id, progress=False)
        ids = torch.tensor([split.eval[0]["input_ids"]])
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_base(tiny_dir, cfg)[0], str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        again = reloaded(input_ids=ids).logits
    assert torch.allclose(again, logits[1], atol=1e-6)
    assert not torch.allclose(again, load_base(tiny_dir, cfg)[0](input_ids=ids).logits, atol=1e-4)


def test_lora_on_gptq_base(tiny_dir, data_file, tmp_path):
    """The alternative base: our GPTQ 4-bit checkpoint, LoRA on its QuantLinears, saved unmerged."""
    from finetune.gptq_lora import QuantLoraLinear
    from quant import QuantConfig, quantize_to_dir
    from quant.qlinear import QuantLinear
    from sources import load_model

    qdir = tmp_path / "tiny_gptq"
    quantize_to_dir(str(tiny_dir), QuantConfig(bits=4, group_size=32, n_seqs=4, seq_len=32), qdir)
    cfg = small_cfg(data_file)
    base, _ = load_base(qdir, cfg)
    model = attach_lora(base, cfg)
    wrapped = [m for m in model.modules() if isinstance(m, QuantLoraLinear)]
    assert wrapped and all(isinstance(m.get_base_layer(), QuantLinear) for m in wrapped)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    out = tmp_path / "ft_gptq"
    metrics = finetune_to_dir(str(qdir), cfg, out, progress=False)
    assert metrics["base_kind"] == "gptq" and metrics["eval_loss_after"] < metrics["eval_loss_before"]
    # the record says what ran: the GPTQ base's own 4-bit weights, not NF4 (double_quant does not apply)
    assert metrics["base_quant"] == "gptq" and metrics["base_bits"] == 4 and "double_quant" not in metrics
    reloaded, tok = load_model(str(out))
    ids = tok(["def f():\n    return 2 + 2"], return_tensors="pt")["input_ids"]
    plain, _ = load_model(str(qdir))
    with torch.no_grad():
        assert not torch.allclose(reloaded(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-4)
    # inference on the reloaded adapter model dequantizes each base layer once, not at every call/token
    bases = [m for m in reloaded.modules() if isinstance(m, QuantLinear)]
    assert bases and all(m.cache and m._weight is not None for m in bases)

    # relocatable: move the base and the (unmerged) adapter elsewhere together; it finds its base again
    moved = tmp_path / "elsewhere" / "runs"
    moved.mkdir(parents=True)
    for d in (qdir, out, tiny_dir):
        d.rename(moved / d.name)
    again, _ = load_model(str(moved / out.name))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    # another base at that path (8-bit instead of 4-bit) is refused, not silently used
    quantize_to_dir(str(moved / tiny_dir.name), QuantConfig(bits=8, group_size=32, n_seqs=4, seq_len=32),
                    moved / qdir.name)
    with pytest.raises(FinetuneError, match="content digest"):
        load_model(str(moved / out.name))


def test_dequant_linear_gradient_matches_float():
    """The memory-light GPTQ matmul has the float layer's input gradient (it recomputes W in backward)."""
    from finetune.gptq_lora import _DequantLinear
    from quant.qlinear import QuantLinear
    from quant.rtn import rtn_quantize

    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48)
    layer = QuantLinear.from_quantized(rtn_quantize(dense.weight.detach(), bits=4, group_size=32, sym=True), dense.bias)
    x = torch.randn(3, 64, requires_grad=True)
    _DequantLinear.apply(x, layer).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, layer.dequantize(), layer.bias.float()).pow(2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, atol=1e-5)


def test_cached_gptq_base_trains_like_the_uncached_one():
    """A cached base (one dequantized copy per layer, in the matmul dtype) gives the uncached path's output and
    input gradient, under bf16 autocast too, and keeps a single copy: backward reuses it, never re-dequantizes."""
    from finetune.gptq_lora import _DequantLinear, base_cache_fits
    from quant.qlinear import QuantLinear
    from quant.rtn import rtn_quantize

    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 48)
    qw = rtn_quantize(dense.weight.detach(), bits=4, group_size=32, sym=True)
    for autocast_dtype in (None, torch.bfloat16):
        grads, outs, layers = [], [], []
        for cache in (False, True):
            layer = QuantLinear.from_quantized(qw, dense.bias, cache=cache)
            x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
            with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
                y = _DequantLinear.apply(x, layer)
            y.float().pow(2).sum().backward()
            grads.append(x.grad)
            outs.append(y.detach())
            layers.append(layer)
        assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
        assert layers[0]._weight is None  # uncached: no float copy survives the step
        assert layers[1]._weight.dtype == (autocast_dtype or torch.float32)
        calls = []
        layers[1].dequantize = lambda calls=calls: calls.append(1)  # a second dequantize would be a bug now
        x = torch.randn(3, 64, requires_grad=True)
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            _DequantLinear.apply(x, layers[1]).float().sum().backward()
        assert not calls
    model = torch.nn.Sequential(QuantLinear.from_quantized(qw, dense.bias))
    assert base_cache_fits(model, torch.bfloat16, "cpu") is True  # 6 KB of bf16 fits any machine
    assert base_cache_fits(model, torch.bfloat16, "cpu", requested=False) is False
    assert base_cache_fits(torch.nn.Linear(4, 4), torch.float32, "cpu", requested=True) is True
    with pytest.raises(FinetuneError, match="cache_base='yes'"):
        FinetuneConfig(cache_base="yes")  # e.g. `--set cache_base=yes`: one clear error, not a truthy string


def test_isolated_run_reports_its_own_peak(tiny_dir, data_file, tmp_path):
    from finetune import finetune_in_subprocess

    m = finetune_in_subprocess(str(tiny_dir), small_cfg(data_file, steps=2, merge=False), tmp_path / "iso",
                               threads=1, progress=False)
    assert m["train_peak_rss_mb"] > m["rss_start_mb"] > 0 and m["peak_rss_mb"] >= m["train_peak_rss_mb"]


@pytest.mark.slow
def test_real_model_few_steps_reduce_loss(tmp_path):
    """SmolLM2-135M, NF4 base: a few QLoRA steps on mined docstring -> function pairs lower the held-out loss,
    and the artifact loads back through sources.load_model."""
    from sources import load_model
    from sources.instructions import InstructionConfig, build_instructions_file

    data = tmp_path / "inst.jsonl"
    build_instructions_file(data, InstructionConfig(packages=("packaging", "click"), max_examples=40))
    cfg = FinetuneConfig(data=str(data), n_eval=8, max_seq_len=128, steps=6, micro_batch_size=2,
                         grad_accum_steps=1, lr=1e-3, warmup_steps=1, eval_every=6, lora_r=8, lora_alpha=16)
    out = tmp_path / "ft"
    m = finetune_to_dir("smollm2-135m", cfg, out, progress=False)
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.02, m
    model, tok = load_model(str(out))
    ids = tok(["def add(a, b):\n    return a + b"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_early_stop_keeps_best_adapter(tiny_dir, data_file):
    """A diverging run (absurd lr) stops after `patience` worse evals and restores the best (initial) adapter."""
    from finetune import train
    from finetune.data import load_instructions

    cfg = small_cfg(data_file, steps=20, lr=50.0, warmup_steps=0, eval_every=1, early_stop_patience=2,
                    scheduler="constant")
    model, tok = load_base(tiny_dir, cfg)
    model = attach_lora(model, cfg)
    split = tokenize_split(load_instructions(data_file), tok, cfg.max_seq_len, cfg.n_eval, cfg.seed)
    res = train(model, split.train, split.eval, cfg, tok.pad_token_id, progress=False)
    assert res.stopped_early and res.steps_done < 20
    from finetune.train import eval_loss

    assert eval_loss(model, split.eval, tok.pad_token_id, 2) == pytest.approx(res.eval_loss_after, rel=1e-5)
    assert res.eval_loss_after == min(loss for _, loss in res.eval_history)


def test_gradient_checkpointing_same_gradients_on_lord_base(tiny_lord_dir, data_file):
    """Recomputing activations in backward (shared LoRD bottlenecks included) must not change the LoRA grads."""
    ids = char_tokenizer()(["def f():\n    return 3 + 1\n"] * 2, return_tensors="pt")["input_ids"]
    grads = []
    for ckpt in (False, True):
        model = attach_lora(load_base(tiny_lord_dir, small_cfg(data_file))[0],
                            small_cfg(data_file, gradient_checkpointing=ckpt))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        assert model.base_model.model.is_activation_checkpointing == ckpt
    assert grads[0].keys() == grads[1].keys() and any(g.abs().sum() > 0 for g in grads[0].values())
    for n, g in grads[0].items():
        assert torch.allclose(g, grads[1][n], atol=1e-5, rtol=1e-4), n


def test_cli_finetune_bounded_by_time_alone(tiny_dir, data_file, tmp_path, capsys):
    """`lord finetune --set steps=null --set budget_minutes=M`: the CLI's own --steps default must not collide
    with the override (it raised a TypeError), and the run stops on its time budget."""
    import json

    from flows.cli import main

    out = tmp_path / "ft-budget"
    assert main(["finetune", "--model", str(tiny_dir), "--out", str(out), "--data", str(data_file),
                 "--set", "steps=null", "--set", "budget_minutes=0.05", "--set", "n_eval=4",
                 "--set", "max_seq_len=64", "--set", "micro_batch_size=2", "--set", "grad_accum_steps=1",
                 "--set", "merge=false", "--set", "dtype=float32"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["budget_stop"] and metrics["steps_done"] >= 1
