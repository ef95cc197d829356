"""Stage cache keys cover the implicit inputs: a changed training file or corpus is never served from cache."""

from __future__ import annotations

from flows.stages import implicit_inputs, stage_key
from sources import code_split


def test_finetune_key_follows_the_data_file_content_not_its_path(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    cfg = {"data": str(data), "steps": 1}
    first = stage_key("finetune", cfg, {"model": "x"})
    assert stage_key("finetune", cfg, {"model": "x"}) == first
    data.write_text('{"instruction": "a", "output": "c"}\n')
    assert stage_key("finetune", cfg, {"model": "x"}) != first


def test_default_instruction_data_and_corpus_are_keyed_by_what_they_read(tmp_path):
    versions = implicit_inputs("finetune", {"data": None})["instruction_packages"]
    assert versions and all(isinstance(v, str) for v in versions.values())  # numpy, torch's deps, ...
    for stage in ("calibrate", "decompose", "quantize", "evaluate", "vocab"):
        assert implicit_inputs(stage, {})["corpus"] == code_split().digest
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("x = 1\n")
    before = implicit_inputs("vocab", {"corpus": str(corpus)})
    (corpus / "a.py").write_text("x = 2\n")
    assert implicit_inputs("vocab", {"corpus": str(corpus)}) != before
