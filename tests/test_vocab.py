"""Vocabulary trimming on a real byte-level BPE (trained here with the `tokenizers` trainer) and a tiny random
model: merge closure, exact row slicing, lossless round trip of any text, clear errors, CLI, and LoRD on the
trimmed output."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from vocab import (
    BYTE_SYMBOLS,
    VocabConfig,
    VocabError,
    battery,
    roundtrip_failures,
    select_tokens,
    trim_to_dir,
)
from vocab.roundtrip import roundtrip

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
KEEP = 450


def _train_tokenizer(files: list[Path], vocab_size: int = 900) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train([str(f) for f in files], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[2],
                                   pad_token=SPECIALS[0])
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small code corpus (stdlib files the tokenizer was trained on plus others)."""
    root = tmp_path_factory.mktemp("corpus")
    for f in sorted(STDLIB.glob("*.py"))[10:30]:
        shutil.copy(f, root / f.name)
    return root


def _model_dir(root: Path, tied: bool) -> Path:
    tok = _train_tokenizer(sorted(STDLIB.glob("*.py"))[:20])
    cls = LlamaConfig if tied else Qwen2Config
    cfg = cls(vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_start|>")]
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("tied"), tied=True)


@pytest.fixture(scope="module")
def trimmed(tied_dir, corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("trim") / "out"
    return out, trim_to_dir(str(tied_dir), VocabConfig(keep=KEEP, corpus=str(corpus)), out)


def test_select_keeps_required_and_closes_over_merges():
    # ids 0-3 bytes; 4 = 0+1, 5 = 4+2, 6 = 5+3 (a chain), 7 = 2+3
    parents = {4: [(0, 1)], 5: [(4, 2)], 6: [(5, 3)], 7: [(2, 3)]}
    counts = [0, 0, 0, 0, 0, 0, 100, 50]
    assert select_tokens(counts, {0, 1, 2, 3}, parents, keep=7) == [0, 1, 2, 3, 4, 5, 6]  # 6 needs 5 and 4
    # 6 with its chain does not fit in 6 slots; 7 (one new token) does
    assert select_tokens(counts, {0, 1, 2, 3}, parents, keep=6) == [0, 1, 2, 3, 4, 7]
    assert select_tokens(counts, {0, 1, 2, 3}, parents, coverage=0.6) == [0, 1, 2, 3, 4, 5, 6]
    assert select_tokens(counts, {0, 1, 2, 3}, parents, coverage=1.0) == list(range(8))
    with pytest.raises(VocabError, match="keep >= 4"):
        select_tokens(counts, {0, 1, 2, 3}, parents, keep=3)


def test_trimmed_dir_loads_plainly_with_sliced_rows(tied_dir, trimmed, corpus):
    out, metrics = trimmed
    orig = AutoModelForCausalLM.from_pretrained(tied_dir).eval()
    otok = AutoTokenizer.from_pretrained(tied_dir)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    kept = json.loads((out / "kept_ids.json").read_text())
    assert len(tok) == model.config.vocab_size == len(kept) == KEEP == metrics["vocab_after"]
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert torch.equal(model.get_input_embeddings().weight, orig.get_input_embeddings().weight[kept])
    assert metrics["params_after"] == metrics["params_before"] - (len(otok) - KEEP) * 64
    for name in SPECIALS:  # special tokens keep their meaning; config ids follow them
        assert tok.convert_ids_to_tokens(tok.convert_tokens_to_ids(name)) == name
    assert tok.convert_ids_to_tokens(model.config.eos_token_id) == "<|im_end|>"
    assert tok.convert_ids_to_tokens(model.generation_config.eos_token_id) == ["<|im_end|>", "<|im_start|>"]
    assert (out / "MANIFEST.json").is_file()
    spec = json.loads((out / "tokenizer.json").read_text())  # every kept merge result is buildable
    made = {a + b for a, b in (m.split(" ") if isinstance(m, str) else m for m in spec["model"]["merges"])}
    assert all(t in made or t in BYTE_SYMBOLS or t in SPECIALS for t in spec["model"]["vocab"])
    assert json.loads((out / "lord_artifact.json").read_text())["kind"] == "dense"
    # the longest corpus line made of kept tokens: same tokens (remapped), same logits on the kept rows
    lines = (f.read_text() for f in sorted(corpus.glob("*.py")))
    text = max((ln for t in lines for ln in t.splitlines()
                if set(otok(ln, add_special_tokens=False)["input_ids"]) <= set(kept)), key=len)
    old_ids = otok(text, add_special_tokens=False)["input_ids"]
    assert len(old_ids) >= 8
    new_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert new_ids == [kept.index(i) for i in old_ids]
    with torch.no_grad():
        ref = orig(torch.tensor([old_ids])).logits[..., kept]
        got = model(torch.tensor([new_ids])).logits
    assert torch.allclose(ref, got, atol=1e-5)


def test_untied_head_sliced_with_the_same_rows(tmp_path, corpus):
    src = _model_dir(tmp_path / "untied", tied=False)
    metrics = trim_to_dir(str(src), VocabConfig(coverage=0.9, corpus=str(corpus)), tmp_path / "out")
    orig = AutoModelForCausalLM.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    kept = json.loads((tmp_path / "out" / "kept_ids.json").read_text())
    assert not metrics["tied"] and metrics["corpus_coverage"] >= 0.9
    assert torch.equal(model.lm_head.weight, orig.lm_head.weight[kept])
    assert torch.equal(model.get_input_embeddings().weight, orig.get_input_embeddings().weight[kept])
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


def test_mixed_battery_round_trips(tied_dir, trimmed):
    out, _ = trimmed
    assert roundtrip_failures(AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(tied_dir),
                              battery(n_random=300, seed=1)) == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60) | st.binary(max_size=60).map(lambda b: b.decode("latin-1")))
def test_any_text_round_trips_exactly(text, tied_dir, trimmed):
    out, _ = trimmed
    tok, otok = _tokenizers(out), _tokenizers(tied_dir)
    assert roundtrip(tok, text) == text  # this tokenizer has no normalizer: exact
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert all(0 <= i < len(tok) for i in ids)
    old = otok(text, add_special_tokens=False)["input_ids"]
    kept = _kept(out)
    if set(old) <= set(kept):  # a text of kept tokens tokenizes exactly as before
        assert ids == [kept.index(i) for i in old]


_CACHE: dict[str, object] = {}


def _tokenizers(path: Path):
    if str(path) not in _CACHE:
        _CACHE[str(path)] = AutoTokenizer.from_pretrained(path)
    return _CACHE[str(path)]


def _kept(out: Path) -> list[int]:
    key = f"{out}:kept"
    if key not in _CACHE:
        _CACHE[key] = json.loads((out / "kept_ids.json").read_text())
    return _CACHE[key]


def test_keep_below_required_and_bad_config_raise(tied_dir, corpus, tmp_path):
    with pytest.raises(VocabError, match=r"below the \d+ tokens every trim needs"):
        trim_to_dir(str(tied_dir), VocabConfig(keep=100, corpus=str(corpus)), tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(VocabError, match="exactly one of keep"):
        VocabConfig(keep=10, coverage=0.5)
    with pytest.raises(VocabError, match="coverage"):
        VocabConfig(coverage=1.5)


def test_package_code_is_counted_too_in_a_fixed_sample(tied_dir, corpus, tmp_path):
    """``packages``: installed packages' code joins the count (a capped, fixed sample); an unknown package is a
    clear error before any write, and the kept set changes toward the tokens that code uses."""
    from vocab.count import package_files

    files = package_files(("json", "email"), 64)
    assert files == package_files(("json", "email"), 64)  # same order every time
    assert {f.parent.name for f in files} >= {"json"} and sum(f.stat().st_size for f in files) <= 2 * 64 * 1024
    assert len(package_files(("json",), 1024)) > len(package_files(("json",), 8))
    with pytest.raises(VocabError, match="not installed"):
        trim_to_dir(str(tied_dir), VocabConfig(keep=500, corpus=str(corpus), packages=("no_such_pkg_x",)),
                    tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(VocabError, match="package_kb"):
        VocabConfig(keep=500, package_kb=0)
    base = trim_to_dir(str(tied_dir), VocabConfig(keep=500, corpus=str(corpus)), tmp_path / "a")
    wide = trim_to_dir(str(tied_dir), VocabConfig(keep=500, corpus=str(corpus), packages=["email"]), tmp_path / "b")
    assert wide["corpus_tokens"] > base["corpus_tokens"] and wide["corpus_packages"] == ["email"]
    assert wide["config"]["packages"] == ("email",)
    kept_a = json.loads((tmp_path / "a" / "kept_ids.json").read_text())
    kept_b = json.loads((tmp_path / "b" / "kept_ids.json").read_text())
    assert len(kept_a) == len(kept_b) == 500 and kept_a != kept_b


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_untrimmable_tokenizer_types_are_refused(kind, tmp_path, corpus):
    files = [str(f) for f in sorted(STDLIB.glob("*.py"))[:3]]
    if kind == "wordpiece":
        tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tk.pre_tokenizer = pre_tokenizers.Whitespace()
        tk.train(files, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False))
    else:
        tk = Tokenizer(models.Unigram())
        tk.pre_tokenizer = pre_tokenizers.Metaspace()
        tk.train(files, trainers.UnigramTrainer(vocab_size=300, unk_token="<unk>", special_tokens=["<unk>"],
                                                show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="[UNK]" if kind == "wordpiece" else "<unk>")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(VocabError, match="supported: byte-level BPE"):
        trim_to_dir(str(tmp_path / "m"), VocabConfig(keep=200, corpus=str(corpus)), tmp_path / "o")


def test_cli_vocab(tied_dir, corpus, tmp_path, capsys):
    from flows.cli import main

    out = tmp_path / "cli"
    assert main(["vocab", "--model", str(tied_dir), "--keep", "500", "--corpus", str(corpus), "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_after"] == 500
    assert main(["vocab", "--model", str(tied_dir), "--keep", "10", "--corpus", str(corpus),
                 "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "VocabError" in err and "keep >=" in err


def test_lord_runs_on_the_trimmed_model(trimmed, tmp_path):
    import lord
    from sources import load_model

    out, _ = trimmed
    lord.collect_stats_to_file(str(out), tmp_path / "stats", lord.CalibConfig(n_seqs=6, seq_len=32))
    metrics = lord.decompose_to_dir(str(out), tmp_path / "stats",
                                    lord.DecomposeConfig(method="lord", plan="uniform", reduction=0.05),
                                    tmp_path / "ckpt")
    assert metrics["param_reduction"] > 0
    model, tok = load_model(tmp_path / "ckpt")
    assert len(tok) == KEEP and model.config.vocab_size == KEEP
    ids = tok("print('hi')", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == KEEP


def test_vocab_stage_is_off_by_default_and_runs_before_calibration():
    from flows.presets import resolve_spec

    assert "vocab" not in resolve_spec("smoke").enabled
    spec = resolve_spec("smoke", stages={"vocab": True}, overrides={"vocab": {"keep": 1000}})
    assert spec.enabled[:2] == ("vocab", "calibrate") and spec.stage_kwargs["vocab"] == {"keep": 1000}


def test_a_preset_can_enable_the_vocab_stage_and_the_caller_can_still_turn_it_off():
    from flows.presets import PRESETS, resolve_spec

    assert "vocab" in PRESETS["default"].get("enable", ())  # the 0.5B default trims its vocabulary
    for switch in ({}, {"vocab": None}):  # None (the flow/CLI default) = as the preset says
        spec = resolve_spec("default", stages=switch)
        assert spec.enabled[:2] == ("vocab", "calibrate") and spec.stage_kwargs["vocab"]["keep"] == 65536
    assert "vocab" not in resolve_spec("default", stages={"vocab": False}).enabled


def test_flow_with_vocab_stage_feeds_lord(tied_dir, corpus, tmp_path):
    from bench.harness import shared_prefect_harness, temp_mlflow_store
    from flows.pipeline import lord_pipeline

    (tmp_path / "mlflow").mkdir()
    with shared_prefect_harness(), temp_mlflow_store(tmp_path / "mlflow"):
        res = lord_pipeline(
            preset="smoke", model=str(tied_dir), vocab=True, reduction=0.02, refine=True, quantize=False,
            overrides={"vocab": {"keep": KEEP, "corpus": str(corpus)}, "calibrate": {"n_seqs": 6, "seq_len": 32},
                       "refine": {"budget_minutes": 0.01, "n_seqs": 4, "seq_len": 32, "data": str(corpus)},
                       "finetune": {"steps": 1, "kd_n_seqs": 3, "max_seq_len": 32, "n_eval": 1, "eval_every": 1,
                                    "data": str(corpus), "kd_cache_dir": str(tmp_path / "kd")},
                       "evaluate": {"seq_len": 32, "n_windows": 2, "humaneval_problems": 0,
                                    "allow_execution": False}},
            runs_dir=str(tmp_path / "runs"), experiment="test-vocab")
    assert [s["label"] for s in res["stages"]] == ["evaluate[dense]", "vocab", "evaluate[vocab]", "calibrate",
                                                   "decompose", "evaluate[vocab+lord]", "refine",
                                                   "evaluate[vocab+lord+refine]", "finetune",
                                                   "evaluate[vocab+lord+refine+qlora]"]
    # block-wise refinement and distillation both learn from the trimmed model (the student's tokenizer), not the
    # original vocabulary; the refined factors keep the LoRD checkpoint's kind, shapes and source
    refined = json.loads((Path(res["stages"][6]["dir"]) / "lord_artifact.json").read_text())
    assert refined["refined"]["teacher"] == refined["source"] == res["stages"][1]["dir"]
    ft = json.loads((Path(res["stages"][8]["dir"]) / "metrics.json").read_text())
    assert json.dumps(ft).count(res["stages"][1]["dir"]) >= 1
    stats_dir = Path(res["stages"][3]["dir"])
    assert json.loads((stats_dir / "metrics.json").read_text())["n_tokens"] == 6 * 32
    decomposed = json.loads((Path(res["stages"][4]["dir"]) / "lord_artifact.json").read_text())
    assert decomposed["source"] == res["stages"][1]["dir"]  # LoRD factored the trimmed model
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["vocab"]["n_params"] < rows["dense"]["n_params"]
    assert rows["vocab+lord"]["n_params"] < rows["vocab"]["n_params"]
    assert rows["vocab+lord+refine"]["n_params"] == rows["vocab+lord"]["n_params"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-coder-0.5b"])
def test_real_tokenizers_trim_without_losing_any_text(name, tmp_path):
    """The embedded models' own tokenizers (no weights loaded): trimmed hard, a fixed mixed battery still
    round-trips exactly as with the original, and the special/chat tokens keep their strings."""
    from sources import resolve_model_dir
    from vocab import plan_tokens, read_bpe, save_trimmed_tokenizer
    from vocab.count import corpus_files, count_token_use

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(name))
    bpe = read_bpe(tok)
    counts = count_token_use(tok, corpus_files(None, max_files=20), bpe.n_ids)
    kept = plan_tokens(bpe, tok, counts, VocabConfig(keep=8192))
    spec, old_to_new = bpe.restrict(kept)
    trimmed = save_trimmed_tokenizer(tok, spec, old_to_new, tmp_path)  # checks a 50-text battery itself
    assert len(trimmed) == 8192
    assert roundtrip_failures(trimmed, tok, battery(n_random=300, seed=2)) == []
    chat = [{"role": "user", "content": "def f(): pass"}]
    assert trimmed.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    old = tok(rendered, add_special_tokens=False)["input_ids"]
    assert trimmed(rendered, add_special_tokens=False)["input_ids"] == [old_to_new[i] for i in old]


@pytest.mark.slow
def test_sentencepiece_tokenizer_of_tinycoder_is_refused():
    from sources import resolve_model_dir
    from vocab import read_bpe

    with pytest.raises(VocabError, match="Metaspace|ByteLevel pre-tokenizer"):
        read_bpe(AutoTokenizer.from_pretrained(resolve_model_dir("tinycoder-random")))
