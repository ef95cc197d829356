"""Artifacts load by *kind* from a fixed table (sources/artifact.py), never by an import string on disk, and
an artifact directory copied elsewhere still loads (LoRD, GPTQ here; the adapter in tests/test_finetune.py)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from artifacts import PipelineError, atomic_dir
from lord import DecomposeConfig, collect_stats, decompose_model, find_groups, save_factored
from quant import QuantConfig, quantize_to_dir
from sources import SourceError, load_model
from sources.artifact import ARTIFACT_FILE, LOADERS, artifact_kind, write_artifact_meta

EVIL = "h12_evil_loader"


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """An importable module that leaves a marker file if anything imports it."""
    marker = tmp_path / "IMPORTED"
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / f"{EVIL}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "def load(*a, **k):\n    raise SystemExit('ran arbitrary code')\n")
    monkeypatch.syspath_prepend(str(pkg))
    sys.modules.pop(EVIL, None)
    return marker


@pytest.fixture
def tiny_dir(tiny_llama, tmp_path):
    """The tiny Llama as a plain HF directory, with a real (one token per character) tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{chr(97 + i): i + 2 for i in range(26)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  unk_token="<unk>", eos_token="</s>")
    d = tmp_path / "tiny"
    tiny_llama.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_unknown_kind_is_refused_without_importing_its_loader(tiny_dir, evil_module):
    (tiny_dir / ARTIFACT_FILE).write_text(json.dumps({"kind": "custom", "loader": f"{EVIL}:load"}))
    with pytest.raises(SourceError, match="unknown artifact kind 'custom'; known kinds are"):
        load_model(str(tiny_dir))
    assert not evil_module.exists() and EVIL not in sys.modules


def test_a_loader_string_on_disk_is_ignored(tiny_dir, evil_module, tiny_llama, calib_ids):
    """A known kind loads with its own loader whatever module the file names."""
    (tiny_dir / ARTIFACT_FILE).write_text(json.dumps({"kind": "dense", "loader": f"{EVIL}:load"}))
    model, _ = load_model(str(tiny_dir))
    assert not evil_module.exists() and EVIL not in sys.modules
    torch.testing.assert_close(_logits(model, calib_ids[:2]), _logits(tiny_llama, calib_ids[:2]))


def test_writer_refuses_unknown_kinds_and_errors_share_one_base(tmp_path):
    with pytest.raises(SourceError, match="unknown artifact kind 'lora'"):
        write_artifact_meta(tmp_path, "lora")
    assert issubclass(SourceError, PipelineError) and not issubclass(SourceError, ValueError)
    assert set(LOADERS) == {"dense", "lord", "gptq", "adapter"} and artifact_kind(tmp_path) == "dense"


def test_truncated_artifact_is_refused_by_the_front_door(tiny_dir, tmp_path):
    art = tmp_path / "art"
    with atomic_dir(art) as tmp:
        shutil.copytree(tiny_dir, tmp, dirs_exist_ok=True)
        write_artifact_meta(tmp, "dense")
    weights = art / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    with pytest.raises(SourceError, match="model.safetensors.*truncated"):
        load_model(str(art))


def test_lord_and_gptq_artifacts_load_after_being_copied_elsewhere(tiny_llama, tiny_dir, calib_ids, tmp_path):
    stats = collect_stats(tiny_llama, find_groups(tiny_llama), calib_ids, progress=False)
    report = decompose_model(tiny_llama, stats, DecomposeConfig(method="lord", plan="uniform", reduction=None,
                                                                rank_reduction=0.5), progress=False)
    lord_dir = tmp_path / "a" / "lord"
    with atomic_dir(lord_dir) as tmp:
        save_factored(tiny_llama, None, tmp, report.groups, {"method": "lord"})
        write_artifact_meta(tmp, "lord", source="tiny")
    gptq_dir = tmp_path / "a" / "gptq"
    quantize_to_dir(str(tiny_dir), QuantConfig(bits=4, group_size=32, n_seqs=4, seq_len=32), gptq_dir)
    ids = calib_ids[:2]
    want = {d.name: _logits(load_model(str(d))[0], ids) for d in (lord_dir, gptq_dir)}
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    shutil.rmtree(tiny_dir)
    for name, logits in want.items():
        model, _ = load_model(str(tmp_path / "b" / name))
        assert torch.equal(_logits(model, ids), logits), name
