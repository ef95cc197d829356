"""Save and load quantized models in the GPTQ v1 checkpoint layout.

Dense models: ``model.safetensors`` holds ``<module>.qweight/qzeros/scales/g_idx/bias`` for every quantized
linear and float16 tensors for the rest; ``quantize_config.json`` and ``config.json["quantization_config"]``
describe it as AutoGPTQ / GPTQModel / transformers+optimum expect (``checkpoint_format: gptq``). Factored
(LoRD) models carry the same tensors per factor (``q_proj.down.qweight``, ...) plus the ``lord`` rank map in
config.json; our loader rebuilds those, and so does GPTQModel through quant/gptqmodel_lord.py. Factors at
another width than ``bits`` (``down_bits``) are listed in ``quantization_config["dynamic"]`` the way GPTQModel
records per-module overrides.
``quant_layout.json`` lists every quantized module so our loader restores any of them, outliers included,
without guessing from tensor names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from quant.config import QuantConfig
from quant.errors import QuantError
from quant.qlinear import QuantLinear

WEIGHTS = "model.safetensors"
LAYOUT = "quant_layout.json"
STORAGE_DTYPE = torch.float16


def gptq_quantize_config(cfg: QuantConfig) -> dict[str, Any]:
    """The ``quantize_config.json`` / ``quantization_config`` dict of GPTQ v1 loaders."""
    return {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": cfg.act_order,
        "sym": cfg.sym,
        "damp_percent": cfg.damp_percent,
        "static_groups": False,
        "true_sequential": False,
        "model_file_base_name": "model",
    }


def save_quantized(model: nn.Module, tokenizer: Any, out_dir: Path, cfg: QuantConfig) -> Path:
    """Write weights, configs, layout and tokenizer into ``out_dir`` (an ``atomic_dir``); return the weights."""
    out_dir = Path(out_dir)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not modules:
        raise QuantError("the model has no QuantLinear modules: quantize it (quant.quantize_model) before saving.")
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        if t.data_ptr() in seen and t.is_floating_point():  # tied head: stored once, re-tied on load
            continue
        seen.add(t.data_ptr())
        owner = name.rpartition(".")[0]
        if owner in modules and name.endswith(("scales", "bias", "outlier_val")):
            t = t.to(torch.float16)
        elif t.is_floating_point():
            t = t.to(STORAGE_DTYPE)
        tensors[name] = t.detach().contiguous().cpu()
    weights = out_dir / WEIGHTS
    save_file(tensors, weights, metadata={"format": "pt"})

    qcfg = gptq_quantize_config(cfg)
    mixed = {n: m.bits for n, m in modules.items() if m.bits != cfg.bits}
    if mixed:  # GPTQModel / vLLM per-module overrides ("+:" regex -> fields); our loader reads quant_layout.json
        qcfg["dynamic"] = {f"+:^{re.escape(n)}$": {"bits": b} for n, b in sorted(mixed.items())}
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("auto_map", None)  # a LoRD dir's remote code is not copied: our loader rebuilds the factors
    config["quantization_config"] = qcfg
    config["dtype"] = "float16"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out_dir / "quantize_config.json").write_text(json.dumps(qcfg, indent=2, sort_keys=True))
    layout = {
        "format": "gptq-v1",
        "factored": bool(getattr(model.config, "lord", None)),
        "config": cfg.to_dict(),
        "modules": {
            n: {"in_features": m.in_features, "out_features": m.out_features, "bits": m.bits,
                "group_size": m.group_size, "bias": m.bias is not None, "n_outliers": m.n_outliers}
            for n, m in modules.items()
        },
    }
    (out_dir / LAYOUT).write_text(json.dumps(layout, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return weights


def load_quantized(
    path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, **_: Any
) -> tuple[nn.Module, Any]:
    """Rebuild the architecture from config.json (LoRD factors from its rank map), swap in QuantLinears
    per ``quant_layout.json`` and load the tensors. Float parameters are ``dtype`` (float32 on CPU).
    The tokenizer is None when the directory holds none (tiny test models)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / LAYOUT).is_file() or not (path / WEIGHTS).is_file():
        raise QuantError(f"{path} has no {LAYOUT} / {WEIGHTS}: not a quantized checkpoint written by quant/.")
    layout = json.loads((path / LAYOUT).read_text())
    dtype = dtype or (torch.float32 if str(device).startswith("cpu") else torch.bfloat16)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the modules; transformers must not call its GPTQ backend
    if getattr(config, "lord", None):
        from lord.modeling.modeling_lord import LORD_CLASSES

        model = LORD_CLASSES[config.model_type]._from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, spec in layout["modules"].items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, QuantLinear(
            spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"], spec["bias"],
            spec["n_outliers"],
        ))
    missing, unexpected = model.load_state_dict(load_file(path / WEIGHTS), strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise QuantError(
            f"{path / WEIGHTS} does not match the architecture in config.json: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}; the checkpoint is from another version, re-run quantize."
        )
    if tied:
        model.tie_weights()
    tok = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tok = AutoTokenizer.from_pretrained(path)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok
