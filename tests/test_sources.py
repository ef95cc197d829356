"""sources: model specs, embedded assembly with checksums, GGUF conversion, corpus split and batches."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sources import SourceError, calibration_batches, code_split, load_model, resolve_model_dir
from sources.embedded import EMBEDDED, EmbeddedModel, Part, assemble_gguf


def test_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(SourceError, match="unknown model 'starcoderx'.*qwen2.5-coder-0.5b"):
        resolve_model_dir("starcoderx")


def test_missing_path_is_named(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nope" / "model.gguf"))


def test_dir_without_config_is_refused(tmp_path):
    with pytest.raises(SourceError, match="no config.json"):
        resolve_model_dir(tmp_path)


def test_hub_id_is_passed_through_and_fails_clearly_offline():
    assert resolve_model_dir("bigcode/starcoder") == "bigcode/starcoder"
    with pytest.raises(SourceError, match="(?s)could not load hub model 'bigcode/starcoder'.*offline"):
        load_model("bigcode/starcoder")


def test_embedded_gguf_path_converts_once_then_loads_from_cache(tmp_path):
    t0 = time.perf_counter()
    model, tok = load_model("tinycoder-random", cache_dir=tmp_path)
    first = time.perf_counter() - t0
    entries = [p for p in tmp_path.iterdir()]
    assert len(entries) == 1 and (entries[0] / "MANIFEST.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dir left behind
    t0 = time.perf_counter()
    model2, _ = load_model("tinycoder-random", cache_dir=tmp_path)
    second = time.perf_counter() - t0
    assert second < first
    ids = tok("def f(x):\n    return x", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)
    assert next(model.parameters()).dtype == torch.float32


def _fake_package(root: Path, name: str, payload: bytes) -> None:
    pkg = root / name
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "blob.bin").write_bytes(payload)


def test_corrupt_part_names_the_part_and_leaves_nothing(tmp_path, monkeypatch):
    import hashlib

    good, bad = b"a" * 1000, b"b" * 1000
    _fake_package(tmp_path / "site", "fake_part_one", good)
    _fake_package(tmp_path / "site", "fake_part_two", bad[:500])  # truncated
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    parts = (
        Part("fake_part_one", "data/blob.bin", hashlib.sha256(good).hexdigest(), "fake-part-one"),
        Part("fake_part_two", "data/blob.bin", hashlib.sha256(bad).hexdigest(), "fake-part-two"),
    )
    model = EmbeddedModel("fake", "test", "fake.gguf", parts, hashlib.sha256(good + bad).hexdigest())
    out = tmp_path / "cache"
    with pytest.raises(SourceError, match="fake_part_two.*corrupt or truncated.*pip install --force-reinstall fake-part-two"):
        assemble_gguf(model, out)
    assert list(out.iterdir()) == []
    assert "fake_part_one" not in sys.modules and "fake_part_two" not in sys.modules  # located, never imported


def test_missing_package_says_what_to_install(monkeypatch):
    emb = EmbeddedModel("x", "x", "x.gguf", (Part("no_such_pkg_zz", "a.bin", "0" * 64, "no-such-pkg==1"),), "0" * 64)
    with pytest.raises(SourceError, match="pip install no-such-pkg==1"):
        assemble_gguf(emb, Path("/tmp"))


def test_unsupported_gguf_architecture_is_a_clear_error(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), arch="nosucharch")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SourceError, match="odd.gguf"):
        load_model(path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_split_is_deterministic_disjoint_and_recorded():
    a, b = code_split(), code_split()
    assert a.digest == b.digest and a.heldout == b.heldout
    assert not set(a.calibration) & set(a.heldout)
    assert 0.1 < len(a.heldout) / (len(a.heldout) + len(a.calibration)) < 0.4
    assert a.describe()["n_heldout_files"] == len(a.heldout)


def test_user_directory_split_and_errors(tmp_path):
    for i in range(12):
        (tmp_path / "pkg" / f"m{i}.py").parent.mkdir(exist_ok=True)
        (tmp_path / "pkg" / f"m{i}.py").write_text(f"x = {i}\n")
    s = code_split(tmp_path, heldout_fraction=0.5)
    assert len(s.calibration) + len(s.heldout) == 12
    with pytest.raises(SourceError, match="heldout_fraction"):
        code_split(tmp_path, heldout_fraction=1.5)
    with pytest.raises(SourceError, match="does not exist"):
        code_split(tmp_path / "missing")


def test_mix_splits_each_root_and_samples_packages_apart_from_the_heldout_hash(tmp_path):
    from sources.corpus import is_code_spec, is_mix

    for i in range(12):
        (tmp_path / "proj" / f"m{i}.py").parent.mkdir(exist_ok=True)
        (tmp_path / "proj" / f"m{i}.py").write_text(f"y = {i}\n")
    spec = f"stdlib,pkg:torch,{tmp_path / 'proj'}"
    assert is_mix(spec) and is_mix("stdlib") and not is_mix(str(tmp_path)) and is_code_spec(spec)
    mix, stdlib, proj = code_split(spec, package_kb=256), code_split(), code_split(tmp_path / "proj")
    assert mix.digest == code_split(spec, package_kb=256).digest and mix.digest != stdlib.digest
    assert not set(mix.calibration) & set(mix.heldout)
    # every single root is split as on its own: same files on the same side
    assert set(stdlib.calibration) | set(proj.calibration) <= set(mix.calibration)
    assert set(stdlib.heldout) | set(proj.heldout) <= set(mix.heldout)
    torch_files = [p for p in mix.calibration + mix.heldout if "torch" in p.parts]
    assert 0 < sum(p.stat().st_size for p in torch_files) <= 256 * 1024
    held = [p for p in torch_files if p in set(mix.heldout)]
    # the sample is salted: unsalted, its smallest hashes were the held-out side (~90% held out)
    assert 0.1 < len(held) / len(torch_files) < 0.45
    with pytest.raises(SourceError, match="not installed"):
        code_split("stdlib,pkg:no_such_package_xyz")
    with pytest.raises(SourceError, match="does not exist"):
        code_split(f"stdlib,{tmp_path / 'missing'}")


def test_calibration_batches_are_seeded_and_disjoint():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_dir("tinycoder-random"))
    files = code_split().calibration[:6]
    a = calibration_batches(tok, files, n_seqs=4, seq_len=32, seed=1)
    b = calibration_batches(tok, files, n_seqs=4, seq_len=32, seed=1)
    c = calibration_batches(tok, files, n_seqs=4, seq_len=32, seed=2)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(SourceError, match="windows"):
        calibration_batches(tok, files[:1], n_seqs=10_000, seq_len=512)


def test_calibration_token_stream_is_memoised_but_sees_edits(tmp_path):
    import os

    from transformers import AutoTokenizer

    from sources.corpus import token_stream

    tok = AutoTokenizer.from_pretrained(resolve_model_dir("tinycoder-random"))
    files = [tmp_path / f"m{i}.py" for i in range(3)]
    for i, f in enumerate(files):
        f.write_text(f"def f{i}(x):\n    return x * {i}\n" * 40)
    a = calibration_batches(tok, files, n_seqs=4, seq_len=16, seed=0)
    stream = token_stream(tok, files)
    assert torch.equal(a, calibration_batches(tok, files, n_seqs=4, seq_len=16, seed=0))
    assert any(torch.equal(a[0], stream[s:s + 16]) for s in range(0, stream.numel() - 15, 16))
    files[0].write_text("def g(y):\n    return y - 1\n" * 60)  # same file, new content: must not hit
    os.utime(files[0], ns=(files[0].stat().st_atime_ns, files[0].stat().st_mtime_ns + 10**9))
    stream2 = token_stream(tok, files)
    b = calibration_batches(tok, files, n_seqs=4, seq_len=16, seed=0)
    assert all(any(torch.equal(row, stream2[s:s + 16]) for s in range(0, stream2.numel() - 15, 16)) for row in b)


def test_embedded_registry_has_the_default_and_fast_models():
    assert {"qwen2.5-coder-0.5b", "smollm2-135m"} <= set(EMBEDDED)
    assert len(EMBEDDED["qwen2.5-coder-0.5b"].parts) == 6


def test_convert_rejects_non_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(SourceError, match="not a .gguf"):
        load_model(f)


def test_model_that_does_not_fit_memory_fails_before_loading(monkeypatch):
    from artifacts.resources import ResourceError

    resolve_model_dir("tinycoder-random")
    monkeypatch.setenv("LORD_MEMORY_BUDGET_BYTES", "1000")
    with pytest.raises(ResourceError, match="needs about .* GiB of memory"):
        load_model("tinycoder-random")


def test_disk_guard_names_the_numbers(tmp_path):
    from artifacts.resources import ResourceError, check_disk

    check_disk(tmp_path / "new" / "dir", 1024, "a small write")
    with pytest.raises(ResourceError, match="on disk"):
        check_disk(tmp_path, 1 << 60, "an exabyte checkpoint")


@pytest.mark.parametrize("copy", ["head", "embedding"])
def test_tied_conversion_shares_the_chosen_copy_and_records_it(tmp_path, monkeypatch, copy):
    import dataclasses
    import json

    untied, _ = load_model("tinycoder-random", cache_dir=tmp_path / "untied")
    assert untied.get_input_embeddings().weight is not untied.get_output_embeddings().weight
    tied_spec = dataclasses.replace(EMBEDDED["tinycoder-random"], tie_word_embeddings=True, tied_copy=copy,
                                    tie_note="test")
    monkeypatch.setitem(EMBEDDED, "tinycoder-random", tied_spec)
    where = resolve_model_dir("tinycoder-random", cache_dir=tmp_path / "tied")
    assert where.name.endswith(f"-tied-{copy}")  # a new cache key: an untied cache is never reused
    source = json.loads((where / "source.json").read_text())
    assert source["tie_word_embeddings"] is True and source["tied_copy"] == copy and source["tie_note"] == "test"
    tied, _ = load_model("tinycoder-random", cache_dir=tmp_path / "tied")
    emb, head = tied.get_input_embeddings().weight, tied.get_output_embeddings().weight
    assert emb is head  # one Parameter: counted once by model.parameters()
    want = (untied.get_output_embeddings() if copy == "head" else untied.get_input_embeddings()).weight
    assert torch.equal(emb, want)
    n_untied = sum(p.numel() for p in untied.parameters())
    assert sum(p.numel() for p in tied.parameters()) == n_untied - emb.numel()
