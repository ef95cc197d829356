"""LoRA on our GPTQ base (``quant.QuantLinear``): the alternative to an NF4 base.

peft ships ``GPTQLoraLinear`` for auto-gptq / gptqmodel layers; ours is registered as a custom module. The
base matmul runs through ``_DequantLinear``, which never saves the float weight for backward (autograd would
otherwise hold every layer's float weight from forward until backward). Where the whole base fits comfortably
in memory in the compute dtype (``FinetuneConfig.cache_base``, ``base_cache_fits``), each layer keeps one
dequantized copy for the run: a step then costs what a float model's does. Otherwise it dequantizes in forward
and again in backward, which on the 0.5B was most of a CPU step (measured in bench/kd_speed.py).
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
        from quant.qlinear import matmul_dtype

        ctx.layer, ctx.dtype, ctx.x_dtype = layer, matmul_dtype(x), x.dtype
        w = layer.weight_as(ctx.dtype, x.device)
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        # the forward's matmul dtype, so a cached weight is reused, never re-dequantized in another dtype
        w = ctx.layer.weight_as(ctx.dtype, grad_out.device)
        return (grad_out.to(ctx.dtype) @ w).to(ctx.x_dtype), None


def quant_linear_type() -> type[nn.Module] | None:
    try:
        from quant.qlinear import QuantLinear
    except ImportError:
        return None
    return QuantLinear


def prepare_quant_linears(model: nn.Module, cache: bool = False) -> int:
    """Make our QuantLinears peft-readable (auto-gptq's ``infeatures``/``outfeatures``) and set their float
    weight cache: on for inference (or generation dequantizes every weight at every token) and for training
    when ``base_cache_fits``; off keeps no float copy of any layer. Returns how many were found."""
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


CACHE_MEMORY_SHARE = 0.25  # auto caches the dequantized base if it needs at most this share of free memory


def base_cache_fits(model: nn.Module, dtype: torch.dtype, device: str, requested: bool | None = None) -> bool:
    """Whether training keeps a dequantized copy of every QuantLinear: ``requested`` if given, else whether
    those copies (in ``dtype``) take at most ``CACHE_MEMORY_SHARE`` of the memory free on ``device``."""
    if requested is not None:
        return requested
    cls = quant_linear_type()
    if cls is None:
        return False
    need = dtype.itemsize * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, cls))
    if torch.device(device).type == "cuda":
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        from artifacts.resources import available_memory_bytes

        free = available_memory_bytes()
    return need <= CACHE_MEMORY_SHARE * free


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
