"""Factored checkpoints: safetensors + config.json carrying the rank map, plus the modeling code.

Loads two ways with equal logits: ``load_factored`` (our classes, so ``isinstance(m, LowRankLinear)`` holds for
quant/ and finetune/) and plain ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` through
``auto_map`` -> the copied ``modeling_lord.py`` (self-contained, like the paper's LoRDCoder). Never pickle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lord.errors import LordError
from lord.modeling import modeling_lord

MODELING_FILE = Path(modeling_lord.__file__)


def save_factored(model: nn.Module, tokenizer: Any, out_dir: Path, groups: dict, info: dict) -> None:
    """Write ``model`` (already factored per ``groups``: name -> {"members", "rank"}) into ``out_dir``."""
    out_dir = Path(out_dir)
    mt = model.config.model_type
    if mt not in modeling_lord.LORD_CLASSES:
        raise LordError(f"cannot save a factored {mt!r} model; supported: {sorted(modeling_lord.LORD_CLASSES)}")
    rank_map = {g: {"members": list(v["members"]), "rank": int(v["rank"])}
                for g, v in groups.items() if v.get("rank") is not None}
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    cls = modeling_lord.LORD_CLASSES[mt].__name__
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = [cls]
    cfg["auto_map"] = {"AutoModelForCausalLM": f"modeling_lord.{cls}"}
    cfg["lord"] = {"groups": rank_map, **info}
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    shutil.copyfile(MODELING_FILE, out_dir / "modeling_lord.py")


def load_factored(directory: str | Path, device: str = "cpu", dtype: torch.dtype | None = None,
                  **kwargs: Any) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of a factored checkpoint dir (kind ``lord``; ``sources.load_model`` checks the
    manifest before calling it)."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise LordError(f"{directory} has no config.json: not a LoRD checkpoint (write one with decompose_to_dir)")
    cfg = json.loads(cfg_path.read_text())
    if "lord" not in cfg or cfg.get("model_type") not in modeling_lord.LORD_CLASSES:
        raise LordError(f"{directory}/config.json has model_type {cfg.get('model_type')!r} and "
                        f"{'a' if 'lord' in cfg else 'no'} `lord` rank map; expected a LoRD checkpoint of one "
                        f"of {sorted(modeling_lord.LORD_CLASSES)}")
    cls = modeling_lord.LORD_CLASSES[cfg["model_type"]]
    model = cls.from_pretrained(directory, dtype=dtype or torch.float32, **kwargs).to(device).eval()
    tok = AutoTokenizer.from_pretrained(directory) if (directory / "tokenizer_config.json").is_file() else None
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok
