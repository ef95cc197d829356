"""The ``vocab`` stage entry point (docs/CONTRACTS.md): a model spec and a frozen config in, a trimmed plain
HF directory out (kind ``dense``: ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load it, and so
does ``sources.load_model``), with ``metrics.json`` and ``kept_ids.json`` (new id -> original id)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from artifacts import atomic_dir, write_json_atomic
from vocab.bpe import ByteLevelBPE
from vocab.config import VocabConfig
from vocab.count import chat_template_ids, corpus_files, count_token_use, package_files
from vocab.errors import VocabError
from vocab.model import slice_vocab
from vocab.roundtrip import battery, roundtrip_failures
from vocab.select import select_tokens


def trim_to_dir(model: str, cfg: VocabConfig, out_dir: Path) -> dict[str, Any]:
    """Trim ``model``'s vocabulary per ``cfg`` (token use counted on the corpus) and write it to ``out_dir``."""
    from sources import load_model

    t0 = time.perf_counter()
    m, tok = load_model(model)
    bpe = read_bpe(tok)
    files = corpus_files(cfg.corpus, cfg.max_files) + package_files(cfg.packages, cfg.package_kb)
    counts = count_token_use(tok, files, bpe.n_ids)
    kept = plan_tokens(bpe, tok, counts, cfg)
    return write_trimmed(m, tok, bpe, kept, counts, out_dir, source=str(model), cfg=cfg, t0=t0)


def read_bpe(tokenizer: Any) -> ByteLevelBPE:
    """The tokenizer's ``tokenizer.json`` as ByteLevelBPE (VocabError for a slow or non byte-level one)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabError(f"tokenizer {type(tokenizer).__name__} has no tokenizer.json backend (a slow/"
                         f"SentencePiece tokenizer); only byte-level BPE tokenizer.json tokenizers can be trimmed")
    return ByteLevelBPE.from_json(json.loads(backend.to_str()))


def plan_tokens(bpe: ByteLevelBPE, tokenizer: Any, counts: list[int], cfg: VocabConfig) -> list[int]:
    """Original ids to keep: bytes, added/special and chat-template tokens, then the most used (closed over
    merges) up to ``cfg.keep`` or ``cfg.coverage``."""
    required = bpe.base_ids() | chat_template_ids(tokenizer)
    return select_tokens(counts, required, bpe.parents(), keep=cfg.keep, coverage=cfg.coverage)


def write_trimmed(model: Any, tokenizer: Any, bpe: ByteLevelBPE, kept: list[int], counts: list[int],
                  out_dir: Path, source: str, cfg: VocabConfig, t0: float | None = None) -> dict[str, Any]:
    """Slice ``model`` (in place) to ``kept``, rebuild the tokenizer, and write both atomically."""
    from sources.artifact import write_artifact_meta

    t0 = time.perf_counter() if t0 is None else t0
    spec, old_to_new = bpe.restrict(kept)
    info = slice_vocab(model, kept, old_to_new)
    total = sum(counts)
    metrics: dict[str, Any] = {
        "vocab_before": len(tokenizer), "vocab_after": len(kept), "embedding_rows_before": info["rows_before"],
        "tied": info["tied"], "params_before": info["params_before"], "params_after": info["params_after"],
        "param_reduction": 1 - info["params_after"] / info["params_before"],
        "corpus_tokens": total, "corpus_packages": list(cfg.packages), "corpus_coverage": sum(counts[i] for i in kept) / max(total, 1),
        "merges_before": len(bpe.merges), "merges_after": len(spec["model"]["merges"]),
        "dropped_special_ids": info["dropped_special_ids"], "config": cfg.to_dict(),
        "missing_byte_symbols_in_original": len(bpe.missing_bytes),
    }
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        save_trimmed_tokenizer(tokenizer, spec, old_to_new, tmp)
        (tmp / "kept_ids.json").write_text(json.dumps(kept))
        metrics["seconds"] = time.perf_counter() - t0
        write_json_atomic(tmp / "metrics.json", metrics)
        write_artifact_meta(tmp, "dense", source=source, stage="vocab", config=cfg.to_dict(),
                            vocab_after=len(kept))
    return metrics


def save_trimmed_tokenizer(tokenizer: Any, spec: dict[str, Any], old_to_new: dict[int, int],
                           directory: Path) -> Any:
    """Save ``tokenizer`` with the trimmed ``spec`` into ``directory``, reload it and check it: its size and
    the round trip of a mixed-text battery against the original. Returns the reloaded tokenizer."""
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(directory)
    write_tokenizer_files(directory, spec, old_to_new)
    trimmed = AutoTokenizer.from_pretrained(directory)
    if len(trimmed) != len(old_to_new):
        raise VocabError(f"the rebuilt tokenizer has {len(trimmed)} tokens, expected {len(old_to_new)}: "
                         f"{type(tokenizer).__name__} does not load from tokenizer.json alone")
    failures = roundtrip_failures(trimmed, tokenizer, battery(n_random=50))
    if failures:
        raise VocabError(f"the trimmed tokenizer does not round-trip {len(failures)} texts (first: "
                         f"{failures[0]}); this is a bug in vocab/, please report it")
    return trimmed


def write_tokenizer_files(directory: Path, spec: dict[str, Any], old_to_new: dict[int, int]) -> None:
    """Overwrite what ``save_pretrained`` wrote with the trimmed tokenizer: ``tokenizer.json``, the id keys
    of ``added_tokens_decoder``, and ``vocab.json``/``merges.txt`` when the tokenizer class writes them."""
    directory = Path(directory)
    (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=2))
    cfg_path = directory / "tokenizer_config.json"
    if cfg_path.is_file():
        tcfg = json.loads(cfg_path.read_text())
        if "added_tokens_decoder" in tcfg:
            tcfg["added_tokens_decoder"] = {str(old_to_new[int(k)]): v for k, v in tcfg["added_tokens_decoder"].items()
                                            if int(k) in old_to_new}
        cfg_path.write_text(json.dumps(tcfg, ensure_ascii=False, indent=2))
    if (directory / "vocab.json").is_file():
        (directory / "vocab.json").write_text(json.dumps(spec["model"]["vocab"], ensure_ascii=False))
    if (directory / "merges.txt").is_file():
        lines = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
