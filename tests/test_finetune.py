"""QLoRA stage on tiny random models (plumbing, errors, save/load, merge) and one real-model run (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from finetune import FinetuneConfig, FinetuneError, finetune_to_dir, load_finetuned
from finetune.data import load_instructions, tokenize_split, validate_jsonl
from finetune.qlora import attach_lora, load_base

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
    metrics = finetune_to_dir(str(tiny_dir), small_cfg(data_file), out, progress=False)
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["steps_done"] == 8 and metrics["seconds_per_step"] > 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "lord_artifact.json").read_text())["loader"] == "finetune.checkpoint:load_finetuned"
    # the merged float model computes what the NF4 + LoRA model computed
    base, tok = load_base(tiny_dir, small_cfg(data_file))
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
