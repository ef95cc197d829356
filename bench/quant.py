"""Quantization benchmark: held-out ppl, size on disk and wall time of GPTQ-8/4, RTN-4 and GPTQ-4 + outliers,
on the dense model and (with --lord-reduction) on its LoRD-factored version.

Every quantized point goes through the real stage and loader (``quantize_to_dir`` -> ``load_model(dir)``), so
the ppl is that of the checkpoint on disk. Ratios (GPTQ-4 ppl increase / RTN-4's) are taken inside one run.

Run: flock /tmp/heavy.lock .venv/bin/python bench/quant.py [--models smollm2-135m qwen2.5-coder-0.5b]
     [--lord-reduction 0.2]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path

import torch
from common import PPL_PROTOCOL, RESULTS, write_results  # noqa: I001  (bench/ is on sys.path)

from evaluation import perplexity
from quant import QuantConfig, quantize_to_dir
from sources import code_split, load_model, resolve_model_dir

# (variant, method, bits, outlier_threshold); group size and calibration are shared (--group-size, --calib-*)
VARIANTS = [  # cheapest first: a run cut short on the shared CPU keeps the RTN-4 / GPTQ-4 comparison
    ("rtn4", "rtn", 4, None),
    ("gptq4", "gptq", 4, None),
    ("gptq8", "gptq", 8, None),
    ("gptq4_outliers", "gptq", 4, 0.2),
]


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 2**20


def ppl_of(spec: str | Path, split) -> tuple[float, float]:
    model, tok = load_model(spec)
    res = perplexity(model, tok, split.heldout, **PPL_PROTOCOL)
    del model
    gc.collect()
    return res.ppl, res.seconds


def run_base(name: str, base: str | Path, base_label: str, args, split, ppl_dense: float, work: Path,
             save) -> list[dict]:
    """The float base and every chosen quantized variant of it, as records (``save`` after each one, so a
    run cut short on the shared CPU still leaves its finished points)."""
    group_size = args.group_size or auto_group_size(name)
    ppl_base = ppl_dense if base == name else ppl_of(base, split)[0]  # the dense ppl is measured once
    size_base = dir_mb(resolve_model_dir(base) if isinstance(base, str) else base)
    records = [{"model": name, "base": base_label, "variant": "fp32", "method": "none", "bits": 32,
                "ppl": round(ppl_base, 4), "ppl_dense": round(ppl_dense, 4),
                "ppl_increase": round(ppl_base / ppl_dense - 1, 5), "size_mb": round(size_base, 1)}]
    print(records[-1])
    save(records)
    for variant, method, bits, thr in VARIANTS:
        if variant not in args.variants:
            continue
        cfg = QuantConfig(bits=bits, group_size=group_size, method=method, outlier_threshold=thr,
                          n_seqs=args.calib_seqs, seq_len=args.calib_len, act_order=args.act_order)
        out = work / f"{name}-{base_label}-{variant}"
        t0 = time.perf_counter()
        metrics = quantize_to_dir(str(base), cfg, out)
        stage_seconds = time.perf_counter() - t0
        ppl, _ = ppl_of(out, split)
        rec = {"model": name, "base": base_label, "variant": variant, "method": method, "bits": bits,
               "group_size": group_size, "act_order": args.act_order, "outlier_threshold": thr,
               "ppl": round(ppl, 4), "ppl_base": round(ppl_base, 4), "ppl_dense": round(ppl_dense, 4),
               "ppl_increase": round(ppl / ppl_base - 1, 5), "size_mb": round(metrics["size_mb"], 1),
               "size_ratio_vs_fp32": round(metrics["size_mb"] / size_base, 4),
               "quantize_seconds": round(metrics["quantize_seconds"], 1),
               "stage_seconds": round(stage_seconds, 1),
               "outlier_fraction": round(metrics["outlier_fraction"], 6),
               "avg_bits_per_weight": round(metrics["avg_bits_per_weight"], 4)}
        print(rec)
        records.append(rec)
        shutil.rmtree(out, ignore_errors=True)
        add_ratios(records)
        save(records)
    return records


def add_ratios(records: list[dict]) -> None:
    """GPTQ-4 ppl increase over RTN-4's, both measured in this run on the same base."""
    rtn = next((r["ppl_increase"] for r in records if r["variant"] == "rtn4"), None)
    for r in records:
        if r["variant"].startswith("gptq4") and rtn is not None:
            r["ppl_increase_ratio_vs_rtn4"] = round(r["ppl_increase"] / rtn, 4) if rtn > 0 else None


def auto_group_size(name: str) -> int:
    """Largest of 128/64/32 dividing the dense model's decoder input dims (hidden, MLP): SmolLM2's 576 is not
    a multiple of 128. LoRD ranks need not divide it (their last group is shorter)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve_model_dir(name))
    dims = {cfg.hidden_size, cfg.intermediate_size or 4 * cfg.hidden_size}
    return next((g for g in (128, 64, 32) if all(d % g == 0 for d in dims)), -1)


def lord_dir(name: str, reduction: float, args, work: Path) -> Path:
    from lord.config import CalibConfig, DecomposeConfig
    from lord.stages import collect_stats_to_file, decompose_to_dir

    out = work / f"{name}-lord{int(reduction * 100)}-{args.lord_plan}"
    if not (out / "MANIFEST.json").is_file():
        stats = work / f"{name}-stats"
        collect_stats_to_file(name, stats, CalibConfig(n_seqs=args.calib_seqs, seq_len=args.calib_len))
        decompose_to_dir(name, stats, DecomposeConfig(reduction=reduction, plan=args.lord_plan), out)
    return out


def merge_previous(name: str, records: list[dict], models: set[str]) -> list[dict]:
    """Keep earlier records of *other* models (runs per model are separate on this shared CPU; every ratio
    is still taken inside one model's run)."""
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        return records
    old = json.loads(path.read_text()).get("records", [])
    return [r for r in old if r.get("model") not in models] + records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--group-size", type=int, default=None,
                    help="default: 128 if it divides every quantized input dim of the model, else 64, 32, -1")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--calib-seqs", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--lord-reduction", type=float, default=None)
    ap.add_argument("--lord-plan", default="uniform",
                    help="rank plan of the LoRD base (uniform: best measured on qwen, bench/results/lord.json)")
    ap.add_argument("--lord-models", nargs="*", default=None, help="models to factor (default: all --models)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lord-bench-quant"))
    ap.add_argument("--name", default="quant", help="results file name (smoke runs: something else)")
    ap.add_argument("--variants", nargs="+", default=[v[0] for v in VARIANTS], choices=[v[0] for v in VARIANTS])
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    split = code_split()
    done: list[dict] = []

    def save(current: list[dict]) -> None:
        write(args, split, done + current)

    for name in args.models:
        ppl_dense, _ = ppl_of(name, split)
        done += run_base(name, name, "dense", args, split, ppl_dense, args.work, save)
        if args.lord_reduction and (args.lord_models is None or name in args.lord_models):
            base = lord_dir(name, args.lord_reduction, args, args.work)
            done += run_base(name, base, f"lord{int(args.lord_reduction * 100)}", args, split, ppl_dense,
                             args.work, save)


def write(args, split, records: list[dict]) -> None:
    records = merge_previous(args.name, records, {r["model"] for r in records})
    write_results(args.name, {
        "heldout": "stdlib top-level *.py, path-hash split 25% held out", "split_digest": split.digest,
        **PPL_PROTOCOL, "bos": False, "calib_seqs": args.calib_seqs, "calib_seq_len": args.calib_len,
        "group_size": args.group_size or "auto: 128 if it divides the hidden and MLP dims, else 64",
        "act_order": args.act_order, "sym": True, "damp_percent": 0.01,
        "quantized": "every nn.Linear inside the decoder layers (LoRD: both factors); embeddings and head "
                     "stay float16 in the checkpoint",
        "lord_reduction": args.lord_reduction, "lord_plan": args.lord_plan,
        "size_mb": "bytes of *.safetensors in the checkpoint dir (fp32 base: its float32 safetensors)",
        "note": "embedded weights were Q4-Q8 GGUF (the 0.5B from an int4 AWQ release) before we got them; "
                "dense = dequantized float32, so 4-bit grids look unusually harmless on the 0.5B",
        "torch_threads": torch.get_num_threads(),
        "variants": {v[0]: {"method": v[1], "bits": v[2], "outlier_threshold": v[3]} for v in VARIANTS},
    }, records)


if __name__ == "__main__":
    main()
