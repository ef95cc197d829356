"""Atomic artifact directories with a checksum manifest.

Every stage writes into a temp dir beside its target and renames it into place only when complete, so a
killed run never leaves a half-written artifact that looks finished. ``MANIFEST.json`` (sha256 + size per
file) lets a later stage detect a corrupt or truncated file *before* using it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from artifacts.errors import PipelineError

MANIFEST = "MANIFEST.json"


class ArtifactError(PipelineError):
    """An artifact directory is missing, incomplete or corrupt."""


def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable content hash of a JSON-able object (configs, rank maps)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def write_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    directory = Path(directory)
    entries = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            entries[str(p.relative_to(directory))] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    write_json_atomic(directory / MANIFEST, entries)
    return entries


def verify_manifest(directory: Path, full: bool = True) -> None:
    """Raise ArtifactError naming the first missing, truncated or altered file.

    ``full=False`` checks presence and sizes only (catches truncation in milliseconds on multi-GB files).
    """
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}: it is not a finished artifact (rerun the stage).")
    try:
        entries = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); delete {directory} and rerun the stage.") from e
    for rel, meta in entries.items():
        p = directory / rel
        if not p.is_file():
            raise ArtifactError(f"{p} is listed in {MANIFEST} but missing; delete {directory} and rerun.")
        if p.stat().st_size != meta["bytes"]:
            raise ArtifactError(
                f"{p} is {p.stat().st_size} bytes, manifest says {meta['bytes']} (truncated?); "
                f"delete {directory} and rerun."
            )
        if full and sha256_file(p) != meta["sha256"]:
            raise ArtifactError(f"{p} does not match its checksum (corrupt); delete {directory} and rerun.")


def check_manifest(directory: Path) -> None:
    """Before loading a model directory: if it carries a manifest, its files must all be there at their recorded
    sizes (ArtifactError naming the file otherwise); a plain directory without one passes."""
    if (Path(directory) / MANIFEST).is_file():
        verify_manifest(directory, full=False)


def content_digest(directory: Path, volatile: frozenset[str] = frozenset({"metrics.json"})) -> str:
    """Digest of an artifact's content from its manifest (``volatile`` files, e.g. timings, left out, so a
    bit-identical recompute keeps its digest); of every file's checksum for a directory without one."""
    directory = Path(directory)
    mpath = directory / MANIFEST
    if mpath.is_file():
        entries = json.loads(mpath.read_text())
        return sha256_json({k: v["sha256"] for k, v in entries.items() if k not in volatile})
    files = sorted(f for f in directory.rglob("*") if f.is_file())
    return sha256_json({str(f.relative_to(directory)): sha256_file(f) for f in files})


def is_complete(directory: Path) -> bool:
    try:
        verify_manifest(directory)
    except ArtifactError:
        return False
    return True


@contextlib.contextmanager
def atomic_dir(target: Path, manifest: bool = True, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temp dir next to ``target``; on success write the manifest and rename it into place.

    On any exception the temp dir is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if manifest:
            write_manifest(tmp)
        if target.exists():
            if not overwrite:
                raise ArtifactError(f"{target} already exists")
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
