"""QLoRA model plumbing: load a frozen 4-bit NF4 base (double quantization) and attach LoRA adapters.

Dettmers et al. 2023 (QLoRA), sec. 3: the base weights are stored in NF4 with their block scales quantized
again (double quantization) and dequantized to the compute dtype on the fly; only the LoRA matrices
(Hu et al. 2021, W + (alpha/r) B A) are trained. A LoRD-factored projection is two plain ``nn.Linear``
(``.down``: d_in -> r, ``.up``: r -> d_out, docs/CONTRACTS.md), so bitsandbytes quantizes both and peft
adapts both: the memory saved by factoring carries into fine-tuning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sources.artifact import artifact_kind

from . import gptq_lora
from .config import FinetuneConfig
from .errors import FinetuneError

FACTOR_CHILDREN = ("down", "up")
NEVER_TARGET = ("lm_head", "embed_tokens", "wte", "wpe")


def bnb_config(cfg: FinetuneConfig) -> Any:
    from transformers import BitsAndBytesConfig

    from sources.compute import compute_dtype

    # NF4 dequantizes into the compute dtype: bf16 only where it is native (sources/compute.py), or what the
    # config's dtype asks; never fp16 on CPU (~50x slower)
    compute = compute_dtype(cfg.device, cfg.dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=cfg.double_quant, bnb_4bit_compute_dtype=compute)


def load_base(model_dir: Path, cfg: FinetuneConfig) -> tuple[nn.Module, Any]:
    """Load the model in ``model_dir`` frozen, as NF4 (``cfg.base == "nf4"``) or float, plus its tokenizer.

    Dense and LoRD directories load through ``from_pretrained`` (LoRD via its remote code), so
    bitsandbytes quantizes every ``nn.Linear`` (factors included) while the weights stream in; the float
    model never exists in full. A GPTQ directory keeps its own integer weights: LoRA goes on top.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    kind = artifact_kind(model_dir)
    if kind == "adapter":
        raise FinetuneError(f"{model_dir} is a fine-tuned adapter artifact; fine-tuning on top of one is not "
                            "supported: fine-tune its base model again (more steps or other data) instead.")
    tok = AutoTokenizer.from_pretrained(model_dir)
    kwargs: dict[str, Any] = {"trust_remote_code": kind == "lord", "device_map": {"": cfg.device}}
    if kind == "gptq":
        from sources import load_model

        model, _ = load_model(str(model_dir), device=cfg.device)
        gptq_lora.prepare_quant_linears(model)
    elif cfg.base == "nf4":
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=bnb_config(cfg),
                                                     dtype=torch.float32, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    if cfg.base == "nf4" and kind != "gptq":
        _check_all_quantized(model, cfg.target_modules, model_dir)
        keep_nf4_layout(model)
    return model, tok


def keep_nf4_layout(model: nn.Module) -> int:
    """Stop bitsandbytes' CPU inference repacking (avx512-bf16 CPUs, eval mode, no grad).

    That path rewrites the weight in place on the first eval forward: it drops the double quantization and
    rounds the block scales to bf16, so the base would change between eval and training, the merged model
    would no longer match, and layers whose width is not a multiple of its block fail outright. Training
    must see one fixed NF4 base (QLoRA sec. 3).
    """
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def target_module_names(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full names of the linear layers to adapt: ``*.<target>`` and, for factored ones, ``*.<target>.down/.up``."""
    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if not _is_linear(module) or any(p in NEVER_TARGET for p in parts):
            continue
        if parts[-1] in targets or (len(parts) > 1 and parts[-1] in FACTOR_CHILDREN and parts[-2] in targets):
            names.append(name)
    return names


def attach_lora(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """Freeze the base and wrap every targeted linear with a LoRA adapter; returns a ``PeftModel``."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    names = target_module_names(model, cfg.target_modules)
    if not names:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise FinetuneError(f"{type(model).__name__} has no linear layer named like {list(cfg.target_modules)} "
                            f"(its linear layer names: {linears or 'none'}); pass target_modules that exist.")
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        # casts the remaining float params (norms, embeddings) to fp32 and freezes the base
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise FinetuneError(f"{type(model).__name__} does not support gradient checkpointing; "
                                "set gradient_checkpointing=False.")
        # non-reentrant: the frozen base's inputs need no requires_grad hack and LoRA grads flow through
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=names, bias="none", task_type="CAUSAL_LM")
    if gptq_lora.prepare_quant_linears(model, cache=_cache_base(model, cfg)):
        gptq_lora.register(lora)
    torch.manual_seed(cfg.seed)  # LoRA's A is randomly initialised (B = 0): seed it so runs repeat
    return get_peft_model(model, lora)


def _cache_base(model: nn.Module, cfg: FinetuneConfig) -> bool:
    from sources.compute import compute_dtype

    return gptq_lora.base_cache_fits(model, compute_dtype(cfg.device, cfg.dtype), cfg.device, cfg.cache_base)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (NF4 weights count as packed uint8 + their quant state)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += sum(x.numel() * x.element_size() for x in _state_tensors(state))
    return total


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes of the 4-bit linear weights alone (packed + quant state): the part a LoRD base shrinks."""
    import bitsandbytes as bnb

    total = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            total += w.numel() * w.element_size()
            state = getattr(w, "quant_state", None)
            if state is not None:
                total += sum(x.numel() * x.element_size() for x in _state_tensors(state))
    return total


def _state_tensors(state: Any) -> list[torch.Tensor]:
    out = [state.absmax, getattr(state, "code", None)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        out += [nested.absmax, nested.code]
    return [t for t in out if isinstance(t, torch.Tensor)]


def _is_linear(module: nn.Module) -> bool:
    # bnb Linear4bit subclasses nn.Linear; GPTQ layers do not, so they are recognised by name
    return isinstance(module, nn.Linear) or type(module).__name__ in ("QuantLinear", "GPTQLinear")


def _check_all_quantized(model: nn.Module, targets: tuple[str, ...], model_dir: Path) -> None:
    import bitsandbytes as bnb

    left = [n for n in target_module_names(model, targets)
            if not isinstance(model.get_submodule(n), bnb.nn.Linear4bit)]
    if left:
        raise FinetuneError(f"{model_dir}: {len(left)} target linears were not quantized to NF4 (e.g. {left[:3]}); "
                            f"its modeling code may build layers outside from_pretrained. Use base='float' or fix "
                            f"the checkpoint's modeling code.")
