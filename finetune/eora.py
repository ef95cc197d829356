"""Start the LoRA adapters from the quantization error instead of zero (EoRA, Liu et al. 2024; LoftQ's idea).

A 4-bit base ``Q`` differs from the float weight ``W`` it was made from by ``E = W - Q``. The adapter ``B A`` of
rank r is set to the best rank-r approximation of ``E`` *in the layer's output on calibration data*:
``min ||X (E - B A)^T||_F`` over rank r, which is exactly the LoRD problem (lord/decompose.py ``factorize``,
method ``lord``: ``B = U_r``, ``A = U_r^T E``, ``U`` the top eigenvectors of ``E X^T X E^T``). So at step 0 the
adapted model is already closer to the float model than the quantized one, and distillation starts from there
(and, if it does not improve the held-out KL, the kept adapter is this compensation, not a zero one).

Works on our GPTQ base (``quant.QuantLinear``, the float reference being the artifact it was quantized from) and
on an NF4 base (bitsandbytes, the reference being the float model it was loaded from). The statistics ``X^T X``
are those of the quantized model's own inputs, one forward pass over ``ids``.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import FinetuneError

PEFT_PREFIX = "base_model.model."


def reference_dir(model_dir: Path, base_kind: str) -> Path:
    """The float model the 4-bit base approximates: a GPTQ artifact's recorded ``source``, else ``model_dir``
    itself (an NF4 base is quantized on load from it)."""
    from sources.artifact import read_artifact_meta
    from sources.models import resolve_model_dir

    if base_kind != "gptq":
        return model_dir
    source = (read_artifact_meta(model_dir) or {}).get("source")
    where = resolve_model_dir(source) if source else None
    if not isinstance(where, Path) or not where.is_dir():
        raise FinetuneError(f"lora_init='eora': the GPTQ artifact {model_dir} records no readable float source "
                            f"({source!r}); the quantization error needs the weights it was quantized from. "
                            "Use lora_init='zero' or restore the source directory.")
    return where


class ReferenceWeights:
    """Float weights by parameter name from a model directory's safetensors (sharded or not), read lazily."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            shards = json.loads(index.read_text())["weight_map"]
            self._where = {k: directory / v for k, v in shards.items()}
        elif (directory / "model.safetensors").is_file():
            from safetensors import safe_open

            path = directory / "model.safetensors"
            with safe_open(str(path), framework="pt") as f:
                self._where = {k: path for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
        else:
            raise FinetuneError(f"lora_init='eora': {directory} holds no model.safetensors to read float weights from")
        self.directory = directory

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._where:
            raise FinetuneError(f"lora_init='eora': {self.directory} has no weight {name!r}: the base was not "
                                f"quantized from this model")
        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name).float()


def dequantized(layer: nn.Module) -> torch.Tensor:
    """Float32 [out, in] weight of a 4-bit layer: our QuantLinear, or whatever peft can dequantize (bnb NF4)."""
    if hasattr(layer, "dequantize") and hasattr(layer, "qweight"):
        return layer.dequantize().float()
    if getattr(getattr(layer, "weight", None), "quant_state", None) is None:
        raise FinetuneError(f"lora_init='eora' needs a 4-bit base (GPTQ or NF4); a {type(layer).__name__} layer is "
                            "float, with no quantization error to start from: use lora_init='zero'")
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(layer).float()


def lora_layers(model: nn.Module) -> tuple[dict[str, nn.Module], list[str]]:
    """peft LoRA-wrapped layers by the name of the weight they wrap (``model.layers.0.self_attn.q_proj``), and
    the names of those left at zero: the ``down``/``up`` of a LoRD factor pair. The quantize stage rebalances,
    rotates and refits a pair (quant/factors.py), so a factor's float source is no reference for its rounding,
    and the pair's error was already compensated there (``up`` refit on the quantized bottleneck)."""
    out, factors = {}, []
    parents = dict(model.named_modules())
    for name, module in parents.items():
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer") and len(module.lora_A):
            parent = parents.get(name.rsplit(".", 1)[0])
            key = name.removeprefix(PEFT_PREFIX)
            (factors.append(key) if type(parent).__name__ == "LowRankLinear" else out.__setitem__(key, module))
    return out, factors


@torch.no_grad()
def input_grams(model: nn.Module, layers: dict[str, nn.Module], ids: torch.Tensor, batch_size: int,
                autocast: Any) -> dict[str, torch.Tensor]:
    """``X^T X`` (float32, [in, in]) of every layer's input over ``ids``, one forward pass with adapters off."""
    from sources.compute import wide

    grams: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def add(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            with wide():  # accumulate in float32 even inside the bf16 autocast region
                grams[name] = grams[name].addmm_(x.T, x) if name in grams else x.T @ x
        return add

    was_training = model.training
    model.eval()
    with ExitStack() as stack:
        for name, layer in layers.items():
            stack.enter_context(layer.get_base_layer().register_forward_pre_hook(hook(name)))
        stack.enter_context(model.disable_adapter())
        for start in range(0, ids.shape[0], batch_size):
            with autocast():
                model(input_ids=ids[start:start + batch_size], use_cache=False)
    model.train(was_training)
    return grams


@torch.no_grad()
def eora_init(model: nn.Module, reference: Path, ids: torch.Tensor, batch_size: int, autocast: Any,
              adapter: str = "default") -> dict[str, Any]:
    """Set every LoRA pair to the activation-weighted rank-r approximation of its layer's quantization error.

    Returns what it did: the layers, and the calibration output error of the quantization before and after
    (relative to the float layer's output energy, summed over layers).
    """
    from lord.decompose import factorize

    t0 = time.perf_counter()
    layers, factors = lora_layers(model)
    if not layers:
        raise FinetuneError(f"lora_init='eora': the model has no LoRA layer outside LoRD factor pairs "
                            f"({len(factors)} factors) to initialise; use lora_init='zero'")
    weights = ReferenceWeights(reference)
    grams = input_grams(model, layers, ids, batch_size, autocast)
    err_before = err_after = energy = 0.0
    for name, layer in layers.items():
        w = weights.get(f"{name}.weight")
        base = layer.get_base_layer()
        q = dequantized(base)
        if w.shape != q.shape:
            raise FinetuneError(f"lora_init='eora': {name} is {tuple(q.shape)} in the base but "
                                f"{tuple(w.shape)} in {reference}: the base was not quantized from it")
        e = w - q
        g = grams[name].double()
        rank = layer.lora_A[adapter].weight.shape[0]
        fac = factorize(e, g, ("lord",))["lord"]
        rank = min(rank, fac.max_rank)
        up, down = fac.factors(e, rank)
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        a.zero_()[:rank].copy_(down.to(a.dtype))
        b.zero_()[:, :rank].copy_((up / layer.scaling[adapter]).to(b.dtype))
        energy += float(((w.double() @ g) * w.double()).sum())
        err_before += fac.total
        err_after += fac.total * float(fac.error_curve()[rank])
    return {"lora_init": "eora", "eora_layers": len(layers), "eora_factors_at_zero": len(factors),
            "eora_reference": str(reference),
            "eora_n_tokens": int(ids.numel()),
            "eora_quant_error_before": err_before / energy if energy else 0.0,
            "eora_quant_error_after": err_after / energy if energy else 0.0,
            "eora_seconds": time.perf_counter() - t0}
