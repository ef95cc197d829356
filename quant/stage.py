"""The quantize stage as flows/ calls it: model spec in, artifact directory out (docs/CONTRACTS.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from artifacts import atomic_dir, write_json_atomic
from quant.checkpoint import save_quantized
from quant.config import QuantConfig
from quant.sequential import quantize_model


def quantize_to_dir(model: str, cfg: QuantConfig, out_dir: Path) -> dict[str, Any]:
    """Load ``model`` (anything ``sources.load_model`` accepts), quantize it, and write the checkpoint,
    ``metrics.json`` and ``lord_artifact.json`` atomically into ``out_dir``; return the metrics."""
    from sources import calibration_batches, code_split, load_model
    from sources.artifact import write_artifact_meta

    m, tok = load_model(model, device="cpu")
    ids = None
    split = None
    if cfg.method == "gptq":
        split = code_split(cfg.corpus)
        ids = calibration_batches(tok, split.calibration, n_seqs=cfg.n_seqs, seq_len=cfg.seq_len, seed=cfg.seed)
    report = quantize_model(m, cfg, ids)
    with atomic_dir(Path(out_dir)) as tmp:
        weights = save_quantized(m, tok, tmp, cfg)
        metrics = {
            **report.summary(),
            "bits": cfg.bits,
            "method": cfg.method,
            "size_mb": weights.stat().st_size / 2**20,
            "n_params": sum(p.numel() for p in m.parameters()),
        }
        write_json_atomic(tmp / "metrics.json", metrics)
        write_artifact_meta(
            tmp, "gptq", source=str(model), factored=bool(getattr(m.config, "lord", None)), config=cfg.to_dict(),
            calibration=None if split is None else {"digest": split.digest, "n_seqs": cfg.n_seqs,
                                                    "seq_len": cfg.seq_len, "seed": cfg.seed},
        )
    return metrics
