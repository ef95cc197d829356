"""Code corpora: the CPython stdlib split by file into calibration and held-out sets, or any directory of
``.py`` files; deterministic token streams and calibration batches drawn from them.

The split is by a hash of each file's relative path, so it is stable when files are added or removed,
and it is recorded (file lists + content digest) with every result that uses it.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import SourceError


@dataclass(frozen=True)
class CorpusSplit:
    root: str
    calibration: list[Path] = field(repr=False)
    heldout: list[Path] = field(repr=False)
    digest: str  # sha256 over (relative path, content) of every file, in split order

    def describe(self) -> dict[str, Any]:
        return {"root": self.root, "n_calibration_files": len(self.calibration),
                "n_heldout_files": len(self.heldout), "digest": self.digest}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_split(root: str | Path | None = None, heldout_fraction: float = 0.25,
               recursive: bool | None = None) -> CorpusSplit:
    """Split ``.py`` files under ``root`` (default: the top level of the CPython stdlib) by path hash.

    A file is held out when the first 8 bytes of sha256(relative path), as a fraction of 2**64, fall
    below ``heldout_fraction``.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise SourceError(f"heldout_fraction={heldout_fraction} must be in (0, 1), e.g. 0.25")
    base = stdlib_root() if root is None else Path(root).expanduser()
    if not base.is_dir():
        raise SourceError(f"code corpus directory '{base}' does not exist; pass a directory of .py files")
    recursive = (root is not None) if recursive is None else recursive
    files = sorted(p for p in (base.rglob("*.py") if recursive else base.glob("*.py")) if p.is_file())
    if len(files) < 2:
        raise SourceError(f"'{base}' holds {len(files)} .py files; need at least 2 to split into "
                          f"calibration and held-out sets")
    calib, held = [], []
    digest = hashlib.sha256()
    for p in files:
        rel = str(p.relative_to(base))
        frac = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") / 2**64
        (held if frac < heldout_fraction else calib).append(p)
        digest.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    if not held or not calib:
        raise SourceError(f"split of {len(files)} files in '{base}' left one side empty; "
                          f"use more files or another heldout_fraction")
    return CorpusSplit(root=str(base), calibration=calib, heldout=held, digest=digest.hexdigest())


def read_code(files: list[Path]) -> str:
    """Concatenate files in order, separated by blank lines (undecodable bytes replaced)."""
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def token_stream(tokenizer: Any, files: list[Path], max_tokens: int | None = None) -> torch.Tensor:
    """One 1-D LongTensor of the files' tokens, no BOS (DATA.md: Qwen/SmolLM2 ppl is measured without it).

    Tokenizes file by file and stops once ``max_tokens`` are collected, so a short protocol stays cheap.
    """
    chunks: list[torch.Tensor] = []
    n = 0
    for p in files:
        ids = tokenizer(p.read_text(encoding="utf-8", errors="replace") + "\n\n", add_special_tokens=False,
                        return_attention_mask=False)["input_ids"]
        chunks.append(torch.tensor(ids, dtype=torch.long))
        n += len(ids)
        if max_tokens is not None and n >= max_tokens:
            break
    if not chunks:
        raise SourceError("no files to tokenize")
    stream = torch.cat(chunks)
    return stream[:max_tokens] if max_tokens is not None else stream


_STREAMS: dict[tuple, torch.Tensor] = {}


def _cached_stream(tokenizer: Any, files: list[Path]) -> torch.Tensor:
    """``token_stream`` memoised per process: calibration, the sensitivity pass and GPTQ each draw windows from
    the same split, and tokenizing it is seconds each time. Keyed on the tokenizer's identity and each file's
    path, size and mtime, so an edited file or another tokenizer misses."""
    key = (type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), len(tokenizer),
           tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _STREAMS:
        if len(_STREAMS) >= 4:
            _STREAMS.pop(next(iter(_STREAMS)))
        _STREAMS[key] = token_stream(tokenizer, files)
    return _STREAMS[key]


def calibration_batches(tokenizer: Any, files: list[Path], n_seqs: int = 32, seq_len: int = 256,
                        seed: int = 0) -> torch.Tensor:
    """``n_seqs`` windows of ``seq_len`` tokens at seeded random offsets of the calibration stream.

    Offsets are drawn without replacement on a seq_len grid, so windows never overlap.
    """
    if n_seqs < 1 or seq_len < 2:
        raise SourceError(f"calibration needs n_seqs >= 1 and seq_len >= 2 (got {n_seqs}, {seq_len})")
    stream = _cached_stream(tokenizer, files)
    n_slots = stream.numel() // seq_len
    if n_slots < n_seqs:
        raise SourceError(f"calibration corpus has {stream.numel()} tokens: only {n_slots} windows of {seq_len}, "
                          f"{n_seqs} asked; lower n_seqs/seq_len or add files")
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(n_slots, generator=g)[:n_seqs].sort().values
    return torch.stack([stream[s * seq_len:(s + 1) * seq_len] for s in slots.tolist()])


def batches_digest(ids: torch.Tensor) -> str:
    """Content hash of a calibration batch: recorded with statistics so stale ones are detected."""
    return hashlib.sha256(ids.contiguous().numpy().tobytes() + str(tuple(ids.shape)).encode()).hexdigest()
