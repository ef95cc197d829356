"""Code corpora: the CPython stdlib split by file into calibration and held-out sets, any directory of
``.py`` files, or a mix of roots; deterministic token streams and calibration batches drawn from them.

The split is by a hash of each file's relative path, so it is stable when files are added or removed,
and it is recorded (file lists + content digest) with every result that uses it.

A mix is a comma-separated spec: ``stdlib``, ``pkg:NAME`` (an installed package's code, a fixed sample of
``PACKAGE_KB``) or a directory, e.g. ``"stdlib,pkg:numpy,pkg:torch"``. Calibrating on one project's code fits
the compression to it: LoRD calibrated on the stdlib alone cost about twice as much ppl on another project's
code (networkx) and on HumanEval's text as on held-out stdlib (bench/results/domain_ppl.json).
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


PACKAGE_PREFIX = "pkg:"
PACKAGE_KB = 512  # per installed package in a mix: ~130k Qwen tokens, so 10 packages weigh about the stdlib's split


def _mix_items(spec: str | Path | None) -> list[str] | None:
    """The roots of a multi-root spec (``stdlib``, ``pkg:NAME``, comma-separated); None for one directory."""
    if spec is None or isinstance(spec, Path):
        return None
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if len(parts) > 1 or parts[0] == "stdlib" or parts[0].startswith(PACKAGE_PREFIX):
        return parts
    return None


def is_mix(spec: str | Path | None) -> bool:
    """A multi-root spec rather than one directory."""
    return _mix_items(spec) is not None


def is_code_spec(spec: str | Path) -> bool:
    """Something ``code_split`` reads: a directory or a mix (not, e.g., an instruction JSONL file)."""
    return is_mix(spec) or Path(spec).expanduser().is_dir()


def sample_files(root: Path, max_kb: int, salt: bytes = b"") -> list[Path]:
    """Up to ``max_kb`` of ``.py`` files under ``root``, in sha256(salt + relative path) order: fixed for a given
    installed version and spread over the package rather than its first folder; returned in path order. A mix
    salts it so the sample is independent of ``code_split``'s held-out hash (unsalted, it was mostly held out)."""
    found = sorted((hashlib.sha256(salt + str(p.relative_to(root)).encode()).hexdigest(), p)
                   for p in root.rglob("*.py") if p.is_file())
    budget, picked = max_kb * 1024, []
    for _, p in found:
        size = p.stat().st_size
        if size <= budget:
            picked.append(p)
            budget -= size
    return sorted(picked)


def _py_files(base: Path, recursive: bool, hint: str = "pass a directory of .py files") -> list[Path]:
    """The ``.py`` files of one directory root, sorted; a clear error if it is missing."""
    if not base.is_dir():
        raise SourceError(f"code corpus directory '{base}' does not exist; {hint}")
    return sorted(p for p in (base.rglob("*.py") if recursive else base.glob("*.py")) if p.is_file())


def _root_files(item: str, package_kb: int) -> tuple[Path, list[Path]]:
    """One root of a mix: its base directory and its ``.py`` files."""
    if item == "stdlib":
        return stdlib_root(), _py_files(stdlib_root(), recursive=False)
    if item.startswith(PACKAGE_PREFIX):
        from sources.instructions import package_root

        base = package_root(item[len(PACKAGE_PREFIX):])
        if base is None:
            raise SourceError(f"corpus root {item!r}: package not installed (or a single module); install it "
                              f"or drop it from the corpus spec")
        return base, sample_files(base, package_kb, salt=b"sample\0")
    base = Path(item).expanduser()
    return base, _py_files(base, recursive=True, hint="pass a directory of .py files, 'stdlib' or 'pkg:NAME'")


def code_split(root: str | Path | None = None, heldout_fraction: float = 0.25,
               recursive: bool | None = None, package_kb: int = PACKAGE_KB) -> CorpusSplit:
    """Split ``.py`` files under ``root`` (default: the top level of the CPython stdlib; or a mix, see the
    module docstring) by path hash.

    A file is held out when the first 8 bytes of sha256(relative path), as a fraction of 2**64, fall
    below ``heldout_fraction``; in a mix each root is split on its own and the sides concatenated.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise SourceError(f"heldout_fraction={heldout_fraction} must be in (0, 1), e.g. 0.25")
    items = _mix_items(root)
    if items is not None:
        roots = [(item, *_root_files(item, package_kb)) for item in items]
    else:
        base = stdlib_root() if root is None else Path(root).expanduser()
        recursive = (root is not None) if recursive is None else recursive
        roots = [("", base, _py_files(base, recursive))]
    n_files = sum(len(files) for _, _, files in roots)
    if n_files < 2:
        raise SourceError(f"'{root or roots[0][1]}' holds {n_files} .py files; need at least 2 to split into "
                          f"calibration and held-out sets")
    calib, held = [], []
    digest = hashlib.sha256()
    for item, base, files in roots:
        for p in files:
            rel = str(p.relative_to(base))
            frac = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big") / 2**64
            (held if frac < heldout_fraction else calib).append(p)
            # a single root keeps its historical digest (no root name), so existing caches stay valid
            digest.update((f"{item}/" if item else "").encode() + rel.encode() + b"\0" + p.read_bytes() + b"\0")
    if not held or not calib:
        raise SourceError(f"split of {n_files} files in '{root or roots[0][1]}' left one side empty; "
                          f"use more files or another heldout_fraction")
    name = str(root) if items is not None else str(roots[0][1])
    return CorpusSplit(root=name, calibration=calib, heldout=held, digest=digest.hexdigest())


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
