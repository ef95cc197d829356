"""Load a fine-tuning artifact (``lord_artifact.json`` kind "adapter"): the merged float model when the
stage merged one, else the recorded base with the peft adapter applied.

Layout of an artifact directory written by ``finetune_to_dir``::

    config.json, model.safetensors, tokenizer*   merged float model (absent weights if merge=False)
    adapter/                                     standard peft adapter (adapter_config.json + safetensors)
    lord_artifact.json, metrics.json, finetune_config.json, MANIFEST.json
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import FinetuneError

ARTIFACT_FILE = "lord_artifact.json"
LOADER = "finetune.checkpoint:load_finetuned"


def read_artifact(directory: Path) -> dict[str, Any]:
    path = Path(directory) / ARTIFACT_FILE
    if not path.is_file():
        raise FinetuneError(f"{directory} has no {ARTIFACT_FILE}: not a fine-tuning artifact (run finetune_to_dir).")
    meta = json.loads(path.read_text())
    if meta.get("kind") != "adapter":
        raise FinetuneError(f"{path} says kind={meta.get('kind')!r}; expected 'adapter'.")
    return meta


def load_finetuned(directory: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                   **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` in eval mode, as ``sources.load_model`` expects of a loader."""
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
    elif meta.get("base_kind") == "gptq":
        from peft import LoraConfig, PeftModel

        from sources import load_model

        from . import gptq_lora

        base, _ = load_model(meta["base_dir"], device=device, dtype=dtype)
        gptq_lora.prepare_quant_linears(base, cache=True)  # inference: dequantize each layer once
        config = LoraConfig.from_pretrained(str(directory / "adapter"))
        gptq_lora.register(config)
        model = PeftModel.from_pretrained(base, str(directory / "adapter"), config=config)
    else:
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(meta["base_dir"], dtype=dtype, trust_remote_code=remote, **kwargs)
        model = PeftModel.from_pretrained(base, str(directory / "adapter"))
    return model.to(device).eval(), tok
