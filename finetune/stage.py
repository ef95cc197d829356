"""The fine-tuning stage: ``finetune_to_dir(model, cfg, out_dir) -> metrics`` (docs/CONTRACTS.md).

model -> NF4 base (+ LoRA) -> train (instruction SFT, or distillation from the dense teacher: finetune.kd) ->
adapter (+ merged float model) in one atomic artifact directory, with metrics: losses before/after, the
per-step loss curve (+ loss_curve.png), peak memory, seconds per step.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch

from artifacts import atomic_dir, write_json_atomic
from sources.artifact import ARTIFACT_FILE, artifact_kind, read_artifact_meta, write_artifact_meta

from . import memory
from .checkpoint import base_reference
from .config import FinetuneConfig
from .curves import plot_curve
from .data import load_instructions, tokenize_split, validate_jsonl
from .kd import code_windows, kd_windows, resolve_teacher, teacher_targets, train_kd
from .merge import merge_to_float
from .qlora import (
    attach_lora,
    load_base,
    quantized_weight_bytes,
    trainable_parameters,
    weight_bytes,
)
from .train import autocast, describe, train

# files save_pretrained does not write but a base artifact may need (LoRD rank maps, modeling code)
_SKIP_COPY = {"MANIFEST.json", "metrics.json", ARTIFACT_FILE, "model.safetensors", "model.safetensors.index.json"}


def instruction_records(cfg: FinetuneConfig) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """The user's JSONL (validated) or the default docstring -> function set; plus what identifies it."""
    if cfg.data:
        digest = validate_jsonl(Path(cfg.data))
        return load_instructions(Path(cfg.data)), {"source": str(cfg.data), "sha256": digest}
    from sources.instructions import InstructionConfig, build_instructions

    inst = build_instructions(InstructionConfig(max_examples=cfg.n_examples, seed=cfg.seed))
    return inst.records, {"source": "sources.instructions (docstring -> function)", "sha256": inst.digest,
                          "package_versions": inst.package_versions, "n_candidates": inst.n_candidates}


def finetune_to_dir(model: str, cfg: FinetuneConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """QLoRA-tune ``model`` (anything ``sources.load_model`` takes) and write the artifact to ``out_dir``."""
    from sources.models import resolve_model_dir

    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    model_dir = resolve_model_dir(model)
    kind = artifact_kind(Path(model_dir)) if isinstance(model_dir, Path) else "dense"
    rss_start = memory.rss_mb()
    targets = None
    if cfg.objective == "kd":  # the teacher runs (or is read from its cache) before the student is loaded
        from transformers import AutoTokenizer

        ids, data_meta = kd_windows(AutoTokenizer.from_pretrained(model_dir), cfg)
        targets = teacher_targets(resolve_teacher(model, cfg), ids, cfg, progress=progress)
        data_meta = {**data_meta, "sha256": targets.meta["ids"], "teacher": targets.meta}
    else:
        records, data_meta = instruction_records(cfg)
    base, tok = load_base(model_dir, cfg)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    peft_model = attach_lora(base, cfg)
    init_meta = {"lora_init": cfg.lora_init}
    if cfg.lora_init == "eora":
        from .eora import eora_init, reference_dir

        init_ids = targets.ids[:cfg.init_n_seqs] if targets is not None else init_windows(tok, cfg)
        init_meta = eora_init(peft_model, reference_dir(Path(model_dir), kind), init_ids, cfg.micro_batch_size,
                              lambda: autocast(cfg))
    n_trainable, n_total = trainable_parameters(peft_model)
    load_peak = memory.peak_rss_mb()
    peak_reset = memory.reset_peak_rss()
    memory.reset_cuda_peak(cfg.device)
    if targets is not None:
        result = train_kd(peft_model, targets, cfg, progress=progress)
        n_eval = cfg.n_eval
        sizes = {"n_train_examples": targets.ids.shape[0] - n_eval, "n_eval_examples": n_eval,
                 "n_truncated": 0, "n_dropped": 0}
    else:
        split = tokenize_split(records, tok, cfg.max_seq_len, cfg.n_eval, cfg.seed)
        result = train(peft_model, split.train, split.eval, cfg, tok.pad_token_id, progress=progress)
        sizes = {"n_train_examples": len(split.train), "n_eval_examples": len(split.eval),
                 "n_truncated": split.n_truncated, "n_dropped": split.n_dropped}
    train_peak = memory.peak_rss_mb()
    metrics: dict[str, Any] = {
        "model": str(model), "base_dir": str(model_dir), "base_kind": kind, **base_quant(kind, Path(model_dir), cfg),
        "objective": cfg.objective, "base_cached": _base_cached(peft_model),
        **init_meta, **describe(result),
        "train_loss_reduction": result.train_loss_first - result.train_loss_last,
        **sizes,
        "trainable_params": n_trainable, "total_params": n_total, "weight_mb": weight_bytes(peft_model) / 2**20,
        "quantized_weight_mb": quantized_weight_bytes(peft_model) / 2**20,
        "rss_start_mb": rss_start, "load_peak_rss_mb": load_peak,
        "train_peak_rss_mb": train_peak if peak_reset else None,
        "peak_rss_mb": max(x for x in (load_peak, train_peak) if x is not None) if load_peak else None,
        "cuda_peak_mb": memory.cuda_peak_mb(cfg.device),
        "data": data_meta,
    }
    remote = kind == "lord"
    merged = cfg.merge and kind != "gptq"
    # training that kept a zero start (best_step 0) leaves an adapter adding nothing: ship no weights for it, so
    # the artifact deploys as its base (no LoRA matmuls, no adapter bytes or parameters counted)
    dropped = not merged and adapter_is_zero(peft_model)
    metrics["adapter_dropped"] = dropped
    with atomic_dir(Path(out_dir)) as tmp:
        if not dropped:
            peft_model.save_pretrained(tmp / "adapter")
        tok.save_pretrained(tmp / "adapter")
        if merged:
            float_model = merge_to_float(peft_model, Path(model_dir), tmp / "adapter", trust_remote_code=remote)
            float_model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            _copy_base_extras(Path(model_dir), tmp)
            del float_model
        else:
            shutil.copy2(Path(model_dir) / "config.json", tmp / "config.json")  # so the dir reads as a model
        write_artifact_meta(
            tmp, "adapter", source=str(model), base=base_reference(model_dir, Path(out_dir), str(model)),
            base_kind=kind, base_artifact=read_artifact_meta(Path(model_dir)) if kind != "dense" else None,
            merged=merged, trust_remote_code=remote, adapter=None if dropped else "adapter",
            data_sha256=data_meta["sha256"],
            config=cfg.to_dict(),
        )
        write_json_atomic(tmp / "finetune_config.json", cfg.to_dict())
        plot_curve(result, tmp / "loss_curve.png", title=f"{cfg.objective} recovery of {Path(str(model)).name}")
        metrics["total_seconds"] = time.perf_counter() - t_start
        write_json_atomic(tmp / "metrics.json", metrics)
    return metrics


def adapter_is_zero(model: torch.nn.Module) -> bool:
    """Whether every LoRA ``B`` is exactly zero, i.e. the adapter's update ``B A`` is nothing."""
    bs = [p for n, p in model.named_parameters() if "lora_B" in n]
    return bool(bs) and all(not p.detach().any() for p in bs)


def init_windows(tokenizer: Any, cfg: FinetuneConfig) -> torch.Tensor:
    """``init_n_seqs`` calibration windows (the stdlib's calibration split, or ``cfg.data`` when it is code) for
    the adapter's initial statistics when the objective brings no code windows of its own (SFT)."""
    from sources.corpus import is_code_spec

    return code_windows(tokenizer, cfg.data if cfg.data and is_code_spec(cfg.data) else None, cfg.init_n_seqs,
                        cfg)[0]


def _base_cached(model: torch.nn.Module) -> bool | None:
    """Whether the GPTQ base kept a dequantized copy of its layers while training (None: not a GPTQ base)."""
    from .gptq_lora import quant_linear_type

    cls = quant_linear_type()
    flags = [m.cache for m in model.modules() if cls is not None and isinstance(m, cls)]
    return all(flags) if flags else None


def base_quant(kind: str, model_dir: Path, cfg: FinetuneConfig) -> dict[str, Any]:
    """What the frozen base actually was during training: a GPTQ artifact keeps its own integer weights
    (``cfg.base`` and ``double_quant`` do not apply); otherwise NF4 (with or without double quantization)
    or float, as configured."""
    if kind == "gptq":
        qcfg = (read_artifact_meta(model_dir) or {}).get("config", {})
        return {"base_quant": "gptq", "base_bits": qcfg.get("bits"), "base_group_size": qcfg.get("group_size")}
    if cfg.base == "nf4":
        return {"base_quant": "nf4", "double_quant": cfg.double_quant}
    return {"base_quant": cfg.base}


def _copy_base_extras(model_dir: Path, out: Path) -> None:
    if not model_dir.is_dir():
        return
    for p in model_dir.iterdir():
        if p.is_file() and p.name not in _SKIP_COPY and not p.name.endswith(".safetensors") \
                and not (out / p.name).exists():
            shutil.copy2(p, out / p.name)

