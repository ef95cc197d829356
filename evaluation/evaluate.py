"""The evaluation stage: held-out perplexity (+ HumanEval pass@k when asked) of any model spec, written to
an artifact dir. This is what the pipeline runs after every stage that produced a model."""

from __future__ import annotations

import gc
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from artifacts import atomic_dir, write_json_atomic
from sources import SourceError, code_split, load_model, resolve_model_dir
from sources.compute import check_dtype_name, compute_dtype, dtype_name
from sources.models import weights_bytes

from .errors import EvalError
from .perplexity import PerplexityConfig, perplexity


@dataclass(frozen=True)
class EvalConfig:
    seq_len: int = 512
    n_windows: int = 16
    stride: int | None = None
    batch_size: int = 4
    heldout_root: str | None = None  # None: the CPython stdlib split (sources.corpus.code_split)
    humaneval_problems: int = 0  # 0: skip HumanEval; N: the first N of the 164 problems
    humaneval_n: int = 1  # samples per problem (1 with temperature 0 = greedy pass@1)
    humaneval_temperature: float = 0.0
    humaneval_max_new_tokens: int = 384
    humaneval_batch_size: int = 8
    humaneval_workers: int = 2  # parallel sandboxed executions
    humaneval_cache: bool = True  # a dense model's result is reused across runs (evaluation.humaneval)
    humaneval_timeout_seconds: float = 10.0  # wall clock per completion
    allow_execution: bool = False  # generated code runs only when the caller opts in
    device: str = "cpu"
    dtype: str = "auto"  # compute dtype of every forward here (sources/compute.py); losses stay float32

    def __post_init__(self) -> None:
        try:
            check_dtype_name(self.dtype)
        except SourceError as e:
            raise EvalError(str(e)) from e
        self.ppl_config()  # validates the perplexity fields
        if not 0 <= self.humaneval_problems <= 164:
            raise EvalError(f"humaneval_problems={self.humaneval_problems} must be in [0, 164] (0 skips HumanEval)")
        if self.humaneval_n < 1:
            raise EvalError(f"humaneval_n={self.humaneval_n} must be >= 1")
        if self.humaneval_temperature < 0:
            raise EvalError(f"humaneval_temperature={self.humaneval_temperature} must be >= 0")
        if self.humaneval_n > 1 and self.humaneval_temperature == 0:
            raise EvalError("humaneval_n > 1 needs humaneval_temperature > 0 (greedy samples are identical)")
        if self.humaneval_workers < 1 or self.humaneval_timeout_seconds <= 0:
            raise EvalError(f"humaneval_workers={self.humaneval_workers} must be >= 1 and humaneval_timeout_seconds="
                            f"{self.humaneval_timeout_seconds} > 0")
        if self.humaneval_problems and not self.allow_execution:
            raise EvalError("HumanEval runs generated code: set allow_execution=True (--allow-code-execution) "
                            "to opt in, or humaneval_problems=0 to skip it")

    def ppl_config(self) -> PerplexityConfig:
        return PerplexityConfig(seq_len=self.seq_len, n_windows=self.n_windows, stride=self.stride,
                                batch_size=self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_to_dir(model: str, cfg: EvalConfig, out_dir: Path) -> dict[str, Any]:
    """Evaluate ``model`` (any ``sources.load_model`` spec) and write ``metrics.json`` into ``out_dir``."""
    t0 = time.perf_counter()
    split = code_split(cfg.heldout_root)
    # evaluation writes no weights, so the model is loaded straight in the compute dtype
    dtype = compute_dtype(cfg.device, cfg.dtype)
    net, tok = load_model(model, device=cfg.device, dtype=dtype)
    res = perplexity(net, tok, split.heldout, cfg.ppl_config())
    metrics: dict[str, Any] = {
        "compute_dtype": dtype_name(dtype),
        "ppl": res.ppl, "bits_per_byte": res.bits_per_byte, "ppl_n_tokens": res.n_tokens,
        "ppl_seconds": res.seconds, "params": logical_params(net), "tied_embeddings": tied_embeddings(net),
        "size_mb": model_size_mb(model), "heldout_digest": split.digest,
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if cfg.humaneval_problems:
            from .generate import GenerationConfig
            from .humaneval import HumanEvalConfig, humaneval_to_dir
            from .sandbox import SandboxConfig

            gen = GenerationConfig(max_new_tokens=cfg.humaneval_max_new_tokens, batch_size=cfg.humaneval_batch_size,
                                   n_samples=cfg.humaneval_n, temperature=cfg.humaneval_temperature)
            ks = tuple(k for k in (1, 10, 100) if k <= cfg.humaneval_n)
            box = SandboxConfig(workers=cfg.humaneval_workers, wall_seconds=cfg.humaneval_timeout_seconds)
            he_cfg = HumanEvalConfig(limit=cfg.humaneval_problems, ks=ks, generation=gen, sandbox=box,
                                     allow_execution=cfg.allow_execution, dtype=cfg.dtype)
            # beside out_dir, not inside the temp dir: its partial completions survive a crash and resume
            he_dir = out_dir.with_name(f"{out_dir.name}.humaneval")
            metrics.update(humaneval_to_dir(model, he_cfg, he_dir, loaded=(net, tok), cache=cfg.humaneval_cache))
            shutil.copytree(he_dir, tmp / "humaneval")
            shutil.rmtree(he_dir, ignore_errors=True)
        del net
        gc.collect()
        metrics["seconds"] = time.perf_counter() - t0
        write_json_atomic(tmp / "metrics.json", metrics)
        write_json_atomic(tmp / "config.json", cfg.to_dict())
    return metrics


def logical_params(net: Any) -> int:
    """Weights the model computes with: its parameters, plus ``out x in`` (+ bias) for every layer that
    stores its weight packed in buffers (GPTQ ``qweight``): quantization shrinks bytes, not parameters, so a
    quantized model's parameter reduction stays its decomposition's."""
    n = sum(p.numel() for p in net.parameters())
    for module in net.modules():
        if "qweight" in getattr(module, "_buffers", {}) and not isinstance(getattr(module, "weight", None),
                                                                          torch.nn.Parameter):
            bias = module._buffers.get("bias")
            n += module.in_features * module.out_features + (bias.numel() if bias is not None else 0)
    return n


def tied_embeddings(net: Any) -> bool:
    """Whether the head and the token embedding are one tensor (then counted once in ``params``)."""
    head = net.get_output_embeddings() if hasattr(net, "get_output_embeddings") else None
    return head is not None and head.weight is net.get_input_embeddings().weight


def model_size_mb(model: str) -> float | None:
    """Bytes of weight files on disk (what a user downloads), None for a hub id."""
    where = resolve_model_dir(model)
    if not isinstance(where, Path):
        return None
    return round(weights_bytes(where) / 2**20, 2)

