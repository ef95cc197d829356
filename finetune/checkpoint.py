"""Load a fine-tuning artifact (``lord_artifact.json`` kind "adapter"): the merged float model when the
stage merged one, else the recorded base with the peft adapter applied.

Layout of an artifact directory written by ``finetune_to_dir``::

    config.json, model.safetensors, tokenizer*   merged float model (absent weights if merge=False)
    adapter/                                     standard peft adapter (adapter_config.json + safetensors); only
                                                 the tokenizer when training kept the zero adapter (meta
                                                 ``adapter`` None: the artifact is its base)
    lord_artifact.json, metrics.json, finetune_config.json, MANIFEST.json
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from artifacts import content_digest
from artifacts.errors import PipelineError
from sources.artifact import read_artifact_meta

from .errors import FinetuneError


def read_artifact(directory: Path) -> dict[str, Any]:
    meta = read_artifact_meta(Path(directory))
    if meta is None or meta["kind"] != "adapter":
        raise FinetuneError(f"{directory} is {'a plain model' if meta is None else 'a ' + meta['kind'] + ' artifact'}"
                            ", not a fine-tuning artifact (write one with finetune_to_dir).")
    return meta


def base_reference(base_dir: Path | str, out_dir: Path, source: str) -> dict[str, Any]:
    """How an adapter finds its base again after being moved: the base's path relative to the adapter dir,
    the base's content digest (to check the right base was found), and ``source`` (the spec the user gave:
    an embedded or hub name resolves anywhere)."""
    if not isinstance(base_dir, Path):  # a hub id: the name is the reference
        return {"source": source, "relative": None, "digest": None}
    return {"source": source, "relative": os.path.relpath(base_dir.resolve(), Path(out_dir).resolve()),
            "digest": content_digest(base_dir)}


def resolve_base(directory: Path, meta: dict[str, Any]) -> Path | str:
    """The base of an adapter artifact: the recorded relative path if it still holds the same content, else
    the recorded source spec if that resolves to the same content; FinetuneError naming the digest otherwise."""
    from sources.models import resolve_model_dir

    # artifacts written before relocatable references recorded only the absolute base_dir
    ref = meta.get("base") or {"source": meta.get("base_dir"), "relative": None, "digest": None}
    tried = []
    if ref.get("relative") is not None:
        cand = (Path(directory) / ref["relative"]).resolve()
        if cand.is_dir() and content_digest(cand) == ref["digest"]:
            return cand
        tried.append(str(cand))
    try:
        cand = resolve_model_dir(ref["source"])
    except PipelineError:
        cand = None
    if cand is not None and (not isinstance(cand, Path) or ref["digest"] is None
                             or content_digest(cand) == ref["digest"]):
        return cand
    tried.append(str(ref["source"]))
    raise FinetuneError(f"{directory}: its base model (content digest {ref['digest']}) is not at {tried}; copy the "
                        "base artifact next to the adapter as it was when trained (same relative path), or "
                        "re-run the finetune stage.")


def load_finetuned(directory: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                   **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` in eval mode (the ``adapter`` kind's loader in sources/artifact.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    meta = read_artifact(directory)
    dtype = dtype or torch.float32
    tok = AutoTokenizer.from_pretrained(directory / "adapter")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    remote = bool(meta.get("trust_remote_code"))
    if meta.get("merged"):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, trust_remote_code=remote, **kwargs)
    elif meta.get("adapter", "adapter") is None:  # training kept the zero adapter: the base is the model
        from sources import load_model

        model, _ = load_model(str(resolve_base(directory, meta)), device=device, dtype=dtype)
    elif meta.get("base_kind") == "gptq":
        from peft import LoraConfig, PeftModel

        from sources import load_model

        from . import gptq_lora

        base, _ = load_model(str(resolve_base(directory, meta)), device=device, dtype=dtype)
        gptq_lora.prepare_quant_linears(base, cache=True)  # inference: dequantize each layer once
        config = LoraConfig.from_pretrained(str(directory / "adapter"))
        gptq_lora.register(config)
        model = PeftModel.from_pretrained(base, str(directory / "adapter"), config=config)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(resolve_base(directory, meta), dtype=dtype,
                                                    trust_remote_code=remote, **kwargs)
        model = PeftModel.from_pretrained(base, str(directory / "adapter"))
    return model.to(device).eval(), tok
