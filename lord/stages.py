"""Stage entry points for flows/ (docs/CONTRACTS.md): paths and a frozen config in, a metrics dict out."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from artifacts import atomic_dir, write_json_atomic
from lord.checkpoint import save_factored
from lord.config import CalibConfig, DecomposeConfig
from lord.errors import LordError
from lord.model_ops import decompose_model
from lord.plans import get_plan
from lord.stats import collect_stats, load_stats, model_fingerprint, save_stats
from lord.surgery import find_groups

STATS_FILE = "stats.safetensors"


def collect_stats_to_file(model: str, out: Path, cfg: CalibConfig) -> dict:
    """Calibration statistics of ``model`` on the corpus's calibration split, written to ``out`` (safetensors).

    ``out`` may be a file path or a directory (then ``out/stats.safetensors`` plus ``metrics.json``).
    """
    from sources import batches_digest, calibration_batches, code_split, load_model
    from sources.compute import compute_dtype, dtype_name

    out = Path(out)
    path = out / STATS_FILE if out.suffix != ".safetensors" else out
    m, tok = load_model(model)
    fingerprint = model_fingerprint(m)  # of the stored weights, before any cast to the compute dtype
    dtype = compute_dtype("cpu", cfg.dtype)
    m = m.to(dtype)  # forwards only; the hooks upcast each batch to fp32 and sum into fp64 (lord/stats.py)
    split = code_split(cfg.corpus)
    ids = calibration_batches(tok, split.calibration, n_seqs=cfg.n_seqs, seq_len=cfg.seq_len, seed=cfg.seed)
    groups = find_groups(m, cfg.targets, cfg.ignore)
    t0 = time.perf_counter()
    stats = collect_stats(m, groups, ids, batch_size=cfg.batch_size, statistic=cfg.statistic)
    seconds = time.perf_counter() - t0
    meta = {"model": str(model), "calibration_hash": batches_digest(ids), "corpus_digest": split.digest,
            "config": cfg.to_dict(), "model_type": m.config.model_type, "model_fingerprint": fingerprint,
            "compute_dtype": dtype_name(dtype)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_stats(tmp, stats, groups, meta)
    tmp.replace(path)
    metrics = {"stats_path": str(path), "n_groups": len(groups), "n_tokens": int(ids.numel()),
               "calibration_seconds": seconds, "compute_dtype": dtype_name(dtype), "calibration_hash": meta["calibration_hash"]}
    if path.parent == out:
        write_json_atomic(out / "metrics.json", metrics)
    return metrics


def decompose_to_dir(model: str, stats: Path, cfg: DecomposeConfig, out_dir: Path) -> dict:
    """Factor ``model`` with the statistics file (or dir holding it) and write a loadable checkpoint dir."""
    from sources import calibration_batches, code_split, load_model

    stats = Path(stats)
    if stats.is_dir():
        stats = stats / STATS_FILE
    m, tok = load_model(model)
    groups = find_groups(m, cfg.targets, cfg.ignore)
    group_stats, meta = load_stats(stats, [g.name for g in groups])
    stale = (meta["model_fingerprint"] != model_fingerprint(m) if "model_fingerprint" in meta
             else meta.get("model") != str(model) and meta.get("model_type") != m.config.model_type)
    if stale:
        raise LordError(f"statistics in {stats} are stale: collected on {meta.get('model')!r} "
                        f"({meta.get('model_type')}), whose weights differ from {model!r}'s (model fingerprint "
                        f"mismatch); recollect them for this model (lord calibrate --model {model})")
    thin = sorted(g.name for g in groups if group_stats[g.name].n_tokens < g.n)
    if thin:
        # G = X^T X has rank <= n_tokens: directions the calibration never saw look free to cut
        warnings.warn(f"calibration has {group_stats[thin[0]].n_tokens} tokens but {len(thin)} groups read wider "
                      f"inputs (e.g. {thin[0]}): their Gram is rank-deficient and their error is underestimated; "
                      f"calibrate with n_seqs * seq_len >= {max(g.n for g in groups)}", stacklevel=2)
    sens_ids = val_ids = None
    plan = get_plan(cfg.plan)
    if plan.needs_sensitivity or plan.needs_model_loss:
        sens_ids = calibration_batches(tok, code_split(cfg.corpus).calibration, n_seqs=cfg.sensitivity_seqs,
                                       seq_len=cfg.sensitivity_seq_len, seed=cfg.sensitivity_seed)
    if plan.needs_model_loss:  # an independent batch re-scores the search's finalists (lord/search.py)
        val_ids = calibration_batches(tok, code_split(cfg.corpus).calibration, n_seqs=cfg.sensitivity_seqs,
                                      seq_len=cfg.sensitivity_seq_len, seed=cfg.sensitivity_seed + 1000)
    calib_ids = None
    if cfg.calibration == "sequential":  # the walk replays the statistics' own tokens (checked by their hash)
        calib_ids = calibration_ids_of(tok, meta, stats)
    report = decompose_model(m, group_stats, cfg, sensitivity_ids=sens_ids, validation_ids=val_ids,
                             calibration_ids=calib_ids)
    info = {"method": cfg.method, "plan": cfg.plan, "config": cfg.to_dict(), "source_model": str(model),
            "stats_model": meta.get("model"), "calibration_hash": meta.get("calibration_hash")}
    metrics = {**report.metrics, "method": cfg.method, "plan": cfg.plan, "rank_deficient_groups": len(thin),
               "calibration_hash": meta.get("calibration_hash")}
    # per-group weights, for flows to log (lord/sensitivity.py); timings live in metrics.json: the checkpoint's
    # files must be bit-identical on a recompute, so content-addressed downstream stages keep their cache keys
    sens = report.plan.to_json(timings=False) if report.plan is not None else None
    extra = {"rank_map.json": report.groups, **({"sensitivity.json": sens} if sens is not None else {})}
    write_lord_dir(m, tok, Path(out_dir), report.groups, info, metrics, str(model), extra)
    return metrics


def write_lord_dir(model, tok, out_dir: Path, groups: dict, info: dict, metrics: dict, source: str,
                   extra: dict | None = None) -> None:
    """A factored model as a LoRD checkpoint dir, atomically: weights + config (``save_factored``), metrics.json,
    ``extra`` JSON files by name, and the artifact meta naming its ``source``."""
    from sources.artifact import write_artifact_meta

    with atomic_dir(Path(out_dir)) as tmp:
        save_factored(model, tok, tmp, groups, info)
        for name, doc in {**(extra or {}), "metrics.json": metrics}.items():
            (tmp / name).write_text(json.dumps(doc, indent=2, sort_keys=True))
        write_artifact_meta(tmp, "lord", source=source, **info)


def calibration_ids_of(tok, meta: dict, stats: Path):
    """The calibration batch the statistics were collected on, rebuilt from their recorded config."""
    from sources import batches_digest, calibration_batches, code_split

    cfg = meta.get("config") or {}
    try:
        ids = calibration_batches(tok, code_split(cfg.get("corpus")).calibration, n_seqs=cfg["n_seqs"],
                                  seq_len=cfg["seq_len"], seed=cfg["seed"])
    except KeyError as e:
        raise LordError(f"statistics in {stats} do not record their calibration config ({e}); recollect them "
                        "with lord calibrate") from e
    if meta.get("calibration_hash") and batches_digest(ids) != meta["calibration_hash"]:
        raise LordError(f"the calibration tokens of {stats} cannot be rebuilt (corpus changed: hash mismatch); "
                        "recollect the statistics")
    return ids
