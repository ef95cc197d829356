"""Merge a trained adapter into a float model for evaluation: dequantized NF4 base + (alpha/r) B A.

The merged model is what the adapter model computes (up to float rounding): every base weight is the NF4
weight the adapter was trained against, dequantized, not the original float weight it came from. peft's
own ``merge_and_unload`` on a 4-bit base re-quantizes after merging, which would throw the update's fine
detail away again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def merge_to_float(peft_model: nn.Module, model_dir: Path, adapter_dir: Path, trust_remote_code: bool) -> nn.Module:
    """A float copy of the base with the adapter merged in (LoRD factors stay factored: ``down``/``up`` each
    absorb their own update, so the rank does not change)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    float_model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                            trust_remote_code=trust_remote_code)
    _copy_dequantized(peft_model.get_base_model(), float_model)
    merged = PeftModel.from_pretrained(float_model, str(adapter_dir)).merge_and_unload()
    return merged.eval()


@torch.no_grad()
def _copy_dequantized(quantized: nn.Module, float_model: nn.Module) -> int:
    """Overwrite the float model's weights with the dequantized NF4 weights; returns how many were copied."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    n = 0
    for name, module in quantized.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        plain = name.replace(".base_layer", "")  # peft wraps a targeted layer, the base sits under .base_layer
        target = float_model.get_submodule(plain)
        w = bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).to(torch.float32)
        target.weight.copy_(w.reshape(target.weight.shape).to(target.weight.device))
        n += 1
    return n
