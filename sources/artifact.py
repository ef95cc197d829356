"""Pipeline artifact directories by *kind*: the one writer and reader of ``lord_artifact.json`` and the one
table of kind -> loader.

Why a table and not an import string on disk: a ``lord_artifact.json`` that named a ``module:function`` to
call let a crafted directory run arbitrary code on load. The loaders are fixed here, in code; the file only
says which kind of artifact it is, and an unknown kind is refused before anything is imported. The loaders
are imported lazily, so ``sources`` does not depend on ``lord``, ``quant`` or ``finetune``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from artifacts import write_json_atomic

from .errors import SourceError

ARTIFACT_FILE = "lord_artifact.json"
# kind -> (module, function) of its loader ``f(directory, device=..., dtype=..., **kw) -> (model, tokenizer)``
LOADERS: dict[str, tuple[str, str]] = {
    "dense": ("sources.models", "load_hf_dir"),
    "lord": ("lord.checkpoint", "load_factored"),
    "gptq": ("quant.checkpoint", "load_quantized"),
    "adapter": ("finetune.checkpoint", "load_finetuned"),
}


def _check_kind(kind: Any, where: str) -> str:
    if kind not in LOADERS:
        raise SourceError(f"{where}: unknown artifact kind {kind!r}; known kinds are {sorted(LOADERS)}. "
                          "Re-create the artifact with this version of the pipeline.")
    return kind


def write_artifact_meta(directory: Path, kind: str, **fields: Any) -> dict[str, Any]:
    """Write ``lord_artifact.json`` (``{"kind": kind, **fields}``, atomically) into an artifact directory."""
    meta = {"kind": _check_kind(kind, f"writing {directory}"), **fields}
    write_json_atomic(Path(directory) / ARTIFACT_FILE, meta)
    return meta


def read_artifact_meta(directory: Path) -> dict[str, Any] | None:
    """The artifact record of ``directory`` (None for a plain model directory); SourceError if unreadable or
    of an unknown kind."""
    path = Path(directory) / ARTIFACT_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SourceError(f"{path} is not valid JSON ({e}); delete {directory} and rerun its stage.") from e
    if not isinstance(meta, dict):
        raise SourceError(f"{path} holds a {type(meta).__name__}, expected an object with a 'kind'")
    _check_kind(meta.get("kind"), str(path))
    return meta


def artifact_kind(directory: Path) -> str:
    """``"dense"`` for a plain model directory, else the recorded kind."""
    meta = read_artifact_meta(directory)
    return "dense" if meta is None else meta["kind"]


def loader_for(kind: str) -> Callable[..., tuple[Any, Any]]:
    module, fn = LOADERS[_check_kind(kind, "loading")]
    return getattr(importlib.import_module(module), fn)
