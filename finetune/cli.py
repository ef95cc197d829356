"""What ``lord finetune`` calls (the CLI itself lives in flows/cli.py): keyword arguments in, metrics out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import FinetuneConfig
from .stage import finetune_to_dir


def run_finetune(model: str, out_dir: str | Path, data: str | None = None, steps: int = 100, lora_r: int = 16,
                 **overrides: Any) -> dict[str, Any]:
    """``lord finetune --model DIR --data FILE --steps N --lora-r 16 --out DIR``; other FinetuneConfig fields
    pass through ``overrides`` (e.g. ``lr=1e-4``, ``base="float"``). Errors are ``FinetuneError``."""
    cfg = FinetuneConfig(data=str(data) if data else None, steps=steps, lora_r=lora_r,
                         lora_alpha=overrides.pop("lora_alpha", 2 * lora_r), **overrides)
    return finetune_to_dir(model, cfg, Path(out_dir))
