"""LoRA on our GPTQ base (``quant.QuantLinear``): the alternative to an NF4 base.

peft ships ``GPTQLoraLinear`` for auto-gptq / gptqmodel layers; ours is registered as a custom module. The
base matmul runs through ``_DequantLinear``, which dequantizes the int weight in forward and again in backward
instead of keeping it: autograd would otherwise hold every layer's float weight from forward until backward,
i.e. the whole float model, and the point of a quantized base (memory) would be lost.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly; no gradient for W (frozen base), only for x."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        w = layer.dequantize().to(x.dtype)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        w = ctx.layer.dequantize().to(grad_out.dtype)
        return grad_out @ w, None


def quant_linear_type() -> type[nn.Module] | None:
    try:
        from quant.qlinear import QuantLinear
    except ImportError:
        return None
    return QuantLinear


def prepare_quant_linears(model: nn.Module, cache: bool = False) -> int:
    """Make our QuantLinears peft-readable (auto-gptq's ``infeatures``/``outfeatures``). For training
    (``cache=False``) also stop their float weight cache (it would keep a float copy of every layer); for
    inference keep it, or generation dequantizes every weight at every token. Returns how many were found."""
    cls = quant_linear_type()
    if cls is None:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, cls):
            module.infeatures, module.outfeatures = module.in_features, module.out_features
            module.cache = cache
            if not cache:
                module._weight = None
            n += 1
    return n


def register(lora_config: Any) -> None:
    """Map ``quant.QuantLinear`` to ``QuantLoraLinear`` in a peft ``LoraConfig`` (peft's custom-module hook)."""
    cls = quant_linear_type()
    if cls is not None:
        lora_config._register_custom_module({cls: QuantLoraLinear})


def _lora_linear_base() -> type:
    from peft.tuners.lora.gptq import GPTQLoraLinear

    return GPTQLoraLinear


class QuantLoraLinear(_lora_linear_base()):  # type: ignore[misc]
    """peft's GPTQ LoRA layer with a memory-light base matmul (vanilla LoRA only: no DoRA, no merge)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        if torch.is_grad_enabled() and (x.requires_grad or self.training):
            result = _DequantLinear.apply(x, base)
        else:
            result = base(x)
        if self.disable_adapters:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            xa = self._cast_input_dtype(x, lora_a.weight.dtype)
            result = result + lora_b(lora_a(self.lora_dropout[name](xa))) * self.scaling[name]
        # as peft's own LoRA layers: a float32 adapter on a bf16 base must not promote the residual stream to
        # float32 (the next bf16 layer, e.g. lm_head, would fail on the mixed dtypes)
        return result.to(out_dtype)
