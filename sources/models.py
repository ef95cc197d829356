"""One front door for models: ``load_model(spec) -> (model, tokenizer)``.

``spec`` is an embedded name (``qwen2.5-coder-0.5b``, ``smollm2-135m``), a local HF directory, a pipeline
artifact directory (its ``lord_artifact.json`` kind picks the loader, sources/artifact.py), a ``.gguf`` file, or a hub id passed to
transformers untouched. GGUF models are dequantized once into a cached safetensors directory (GGUF load
15-40 s; the cached copy ~1-2 s), written atomically so a killed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from artifacts import ArtifactError, atomic_dir, check_manifest, verify_manifest
from artifacts.resources import check_disk, check_memory

from .artifact import artifact_kind, loader_for
from .embedded import EMBEDDED, assemble_gguf, part_path
from .errors import SourceError


def cache_root() -> Path:
    """Where converted models live: ``$LORD_CACHE_DIR`` or the user cache dir."""
    env = os.environ.get("LORD_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lord-pipeline"
    return base / "models"


def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SourceError(f"device '{device}' is not a torch device; use cpu, cuda, cuda:N or auto") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SourceError(f"device '{device}' asked for but no CUDA device is visible; use --device cpu")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    # fp16 on CPU computes in fp16 and is ~50x slower (STACK.md): float32 on CPU, bf16 on GPU.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def resolve_model_dir(spec: str | os.PathLike, cache_dir: Path | None = None) -> Path | str:
    """Map a spec to something ``from_pretrained`` takes: a local dir (embedded/GGUF converted and cached)
    or a hub id string, unchanged."""
    s = str(spec)
    if s in EMBEDDED:
        return _cached_conversion(s, cache_dir)
    path = Path(s).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise SourceError(f"'{s}' is a file but not a .gguf; pass a HF model directory, a .gguf file, "
                                  f"an embedded name ({', '.join(EMBEDDED)}) or a hub id")
            return _cached_conversion(path, cache_dir)
        if not (path / "config.json").is_file():
            raise SourceError(f"directory '{s}' has no config.json: not a Hugging Face model directory")
        return path
    if s.startswith((".", "/", "~")) or s.endswith(".gguf") or s.count("/") > 1:
        raise SourceError(f"model path '{s}' does not exist")
    if "/" not in s:
        raise SourceError(f"unknown model '{s}': embedded models are {', '.join(EMBEDDED)}; otherwise pass a "
                          f"local directory, a .gguf file or a hub id like bigcode/starcoder")
    return s  # a hub id: transformers decides (offline here, it fails with a clear message below)


def load_model(spec: str | os.PathLike, device: str | None = "cpu", dtype: torch.dtype | None = None,
               cache_dir: Path | None = None, **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` in eval mode; float32 on CPU, bf16 on CUDA unless ``dtype`` says."""
    dev = pick_device(device)
    dtype = dtype or default_dtype(dev)
    where = resolve_model_dir(spec, cache_dir)
    if isinstance(where, Path) and dev.type == "cpu":
        # weights are loaded once, plus transient copies while loading: 1.5x the float32 size on disk
        check_memory(int(1.5 * weights_bytes(where)), f"loading '{spec}'")
    if not isinstance(where, Path):
        return load_hf_dir(where, device=str(dev), dtype=dtype, **kwargs)
    kind = artifact_kind(where)  # refuses an unknown kind before importing anything
    try:
        check_manifest(where)
    except ArtifactError as e:
        raise SourceError(f"cannot load '{spec}': {e}") from e
    return loader_for(kind)(where, device=str(dev), dtype=dtype, **kwargs)


def load_hf_dir(where: Path | str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """Plain transformers loading of a local dir or hub id (the ``dense`` kind's loader)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except OSError as e:
        if isinstance(where, str):
            raise SourceError(f"could not load hub model '{where}': {e}. This machine may be offline; download "
                              f"it elsewhere and pass its local directory, or use an embedded model "
                              f"({', '.join(EMBEDDED)})") from e
        raise SourceError(f"could not load model directory '{where}': {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def _cached_conversion(src: str | Path, cache_dir: Path | None) -> Path:
    root = Path(cache_dir) if cache_dir else cache_root()
    if isinstance(src, str):
        emb = EMBEDDED[src]
        # the tie choice is part of the key: a cache converted under another choice is never reused silently
        tie = f"-tied-{emb.tied_copy}" if emb.tie_word_embeddings else ""
        target = root / f"{emb.name}-{emb.sha256[:12]}{tie}"
    else:
        st = src.stat()
        target = root / f"{src.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (target / "MANIFEST.json").is_file():
        try:
            verify_manifest(target, full=False)
            return target
        except ArtifactError:
            shutil.rmtree(target, ignore_errors=True)  # damaged cache entry: rebuild it
    gguf_bytes = sum(part_path(p).stat().st_size for p in EMBEDDED[src].parts) if isinstance(src, str) \
        else src.stat().st_size
    # a quantized GGUF dequantizes to ~3-8x its size in float32; conversion holds ~2 copies (DATA.md: 6 GiB peak)
    check_disk(target.parent, 8 * gguf_bytes, f"converting '{src}' to safetensors")
    check_memory(12 * gguf_bytes, f"converting '{src}' from GGUF")
    with atomic_dir(target) as tmp:
        info: dict[str, Any] = {"source": str(src)}
        if isinstance(src, str):
            emb = EMBEDDED[src]
            gguf = assemble_gguf(emb, tmp / "_gguf")
            info.update(convert_gguf(gguf, tmp, tie_word_embeddings=emb.tie_word_embeddings,
                                     tied_copy=emb.tied_copy))
            if emb.tie_note:
                info["tie_note"] = emb.tie_note
        else:
            info.update(convert_gguf(src, tmp))
        shutil.rmtree(tmp / "_gguf", ignore_errors=True)
        (tmp / "source.json").write_text(json.dumps(info, indent=2))
    return target


def convert_gguf(gguf: Path, out: Path, tie_word_embeddings: bool | None = None,
                 tied_copy: str = "head") -> dict[str, Any]:
    """Dequantize a GGUF to a float32 safetensors HF directory (tokenizer included); returns what was chosen.

    ``tie_word_embeddings=True`` on a GGUF that stores the embedding and the head as two (differently
    quantized) copies keeps one: ``tied_copy`` ``"head"`` or ``"embedding"``, shared by both modules.
    """
    if tied_copy not in ("head", "embedding"):
        raise SourceError(f"tied_copy={tied_copy!r}: expected 'head' or 'embedding' (which GGUF copy to share)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as e:
        raise SourceError(f"cannot convert GGUF '{gguf}': {e}. Supported GGUF architectures are those "
                          f"transformers can dequantize (llama, qwen2, mistral, gemma, ...).") from e
    # transformers leaves a GGUF quantizer marker that blocks save_pretrained and training (DATA.md).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    info: dict[str, Any] = {}
    if tie_word_embeddings is not None:
        model.config.tie_word_embeddings = tie_word_embeddings
        info["tie_word_embeddings"] = tie_word_embeddings
        if tie_word_embeddings:
            info["tied_copy"] = tie_shared_copy(model, tied_copy)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return info


@torch.no_grad()
def tie_shared_copy(model: torch.nn.Module, copy: str = "head") -> str:
    """Make embedding and head one Parameter holding ``copy``'s values (already one: nothing to choose).

    Returns the copy kept (``"shared"`` when the model already stored one matrix)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is emb.weight:
        return "shared"
    if head.weight.shape != emb.weight.shape:
        raise SourceError(f"cannot tie: embedding {tuple(emb.weight.shape)} and head {tuple(head.weight.shape)} "
                          "differ in shape; convert untied (tie_word_embeddings=False)")
    keep = head.weight if copy == "head" else emb.weight
    emb.weight = keep
    head.weight = keep
    model.config.tie_word_embeddings = True
    return copy


def weights_bytes(directory: Path) -> int:
    """Bytes of weight files in a model dir (safetensors/bin)."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.suffix in {".safetensors", ".bin"})
