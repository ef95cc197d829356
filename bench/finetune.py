"""QLoRA on a dense vs a LoRD-factored base: peak memory, seconds per step, eval loss and held-out ppl
before/after. Each training run happens in its own fresh process so peak RSS figures do not mix.

Run: flock /tmp/heavy.lock .venv/bin/python bench/finetune.py [--model smollm2-135m] [--steps 60]
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from common import RESULTS, write_results  # noqa: I001  (bench/ is on sys.path)

from artifacts import is_complete
from evaluation.perplexity import PerplexityConfig, perplexity
from finetune import FinetuneConfig, finetune_in_subprocess
from finetune.qlora import load_base
from sources import code_split, load_model
from sources.models import resolve_model_dir

PPL = PerplexityConfig(seq_len=256, n_windows=16, batch_size=4)
WORK = Path(__file__).resolve().parents[1] / "runs" / "bench_finetune"


def lord_base(model: str, reduction: float, plan: str) -> Path:
    """The LoRD checkpoint the comparison uses (built once with lord's own stages, then reused)."""
    from lord import CalibConfig, DecomposeConfig, collect_stats_to_file, decompose_to_dir

    stats = WORK / f"{model}-stats"
    out = WORK / f"{model}-lord-{plan}-{reduction}"
    if not (stats / "stats.safetensors").is_file():
        collect_stats_to_file(model, stats, CalibConfig(n_seqs=32, seq_len=256))
    if not is_complete(out):
        decompose_to_dir(model, stats, DecomposeConfig(method="lord", plan=plan, reduction=reduction), out)
    return out


def heldout_ppl(spec: str, files: list[Path]) -> float:
    model, tok = load_model(spec)
    ppl = perplexity(model, tok, files, PPL, progress=False).ppl
    del model
    gc.collect()
    return ppl


def nf4_ppl(spec: str, cfg: FinetuneConfig, files: list[Path]) -> float:
    """Held-out ppl of the frozen NF4 base itself (what QLoRA starts from)."""
    model, tok = load_base(resolve_model_dir(spec), cfg)
    with torch.compiler.set_stance("force_eager"):  # as in training (see finetune.train)
        ppl = perplexity(model, tok, files, PPL, progress=False).ppl
    del model
    gc.collect()
    return ppl


def params_of(spec: str) -> int:
    model, _ = load_model(spec)
    n = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reduction", type=float, default=0.2, help="LoRD whole-model parameter reduction")
    ap.add_argument("--plan", default="auto")
    ap.add_argument("--repeats", type=int, default=1, help="alternate dense/LoRD runs this many times")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute activations in backward, so weights are a larger share of peak memory")
    ap.add_argument("--seq-len", type=int, default=256, help="max tokens per training example")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    cfg = FinetuneConfig(steps=args.steps, n_examples=2000, n_eval=32, max_seq_len=args.seq_len, micro_batch_size=2,
                         grad_accum_steps=2, lr=2e-4, warmup_steps=max(1, args.steps // 10),
                         eval_every=max(1, args.steps // 3), lora_r=16, lora_alpha=32, seed=0,
                         gradient_checkpointing=args.gradient_checkpointing)
    t0 = time.perf_counter()
    bases = {"dense": args.model, "lord": str(lord_base(args.model, args.reduction, args.plan))}
    lord_seconds = time.perf_counter() - t0
    heldout = code_split().heldout
    runs: dict[str, list[dict]] = {k: [] for k in bases}
    for rep in range(args.repeats):
        for variant, spec in bases.items():  # alternated, so drift on the shared machine hits both
            out = WORK / f"ft-{variant}-{rep}"
            print(f"== {variant} (repeat {rep}) ==", flush=True)
            runs[variant].append(finetune_in_subprocess(spec, cfg, out, threads=threads))
    records = []
    for variant, spec in bases.items():
        ms = runs[variant]
        m = ms[0]
        rec = {
            "model": args.model, "variant": variant, "base": spec if variant == "lord" else "dense (dequantized GGUF)",
            "params": params_of(spec),
            "peak_rss_mb": round(_median([x["peak_rss_mb"] for x in ms]), 1),
            "train_peak_rss_mb": round(_median([x["train_peak_rss_mb"] for x in ms]), 1),
            "train_peak_above_start_mb": round(_median([x["train_peak_rss_mb"] - x["rss_start_mb"] for x in ms]), 1),
            "weight_mb": round(m["weight_mb"], 2), "quantized_weight_mb": round(m["quantized_weight_mb"], 2),
            "trainable_params": m["trainable_params"],
            "seconds_per_step": round(_median([x["seconds_per_step"] for x in ms]), 3),
            "steps": m["steps_done"], "examples_per_step": cfg.examples_per_step,
            "train_loss_first": round(m["train_loss_first"], 4), "train_loss_last": round(m["train_loss_last"], 4),
            "eval_loss_before": round(m["eval_loss_before"], 4), "eval_loss_after": round(m["eval_loss_after"], 4),
            "ppl_before": round(heldout_ppl(spec, heldout), 4),
            "ppl_nf4_base": round(nf4_ppl(spec, cfg, heldout), 4),
            "ppl_after": round(heldout_ppl(str(WORK / f"ft-{variant}-0"), heldout), 4),
        }
        print(json.dumps(rec), flush=True)
        records.append(rec)
    dense, lord = records
    ratios = {"ratio_of": "lord / dense",
              "peak_rss_ratio": round(lord["peak_rss_mb"] / dense["peak_rss_mb"], 4),
              "train_peak_rss_ratio": round(lord["train_peak_rss_mb"] / dense["train_peak_rss_mb"], 4),
              "train_peak_above_start_ratio": round(lord["train_peak_above_start_mb"]
                                                    / dense["train_peak_above_start_mb"], 4),
              "weight_mb_ratio": round(lord["weight_mb"] / dense["weight_mb"], 4),
              "quantized_weight_mb_ratio": round(lord["quantized_weight_mb"] / dense["quantized_weight_mb"], 4),
              "seconds_per_step_ratio": round(lord["seconds_per_step"] / dense["seconds_per_step"], 4),
              "params_ratio": round(lord["params"] / dense["params"], 4)}
    print(json.dumps(ratios, indent=2))
    protocol = {"heldout": "stdlib held-out split (sources.code_split)", "ppl": PPL.to_dict(),
                "finetune": cfg.to_dict(), "lord": {"plan": args.plan, "reduction": args.reduction,
                                                    "calib_seqs": 32, "calib_seq_len": 256},
                "repeats": args.repeats, "lord_build_seconds": round(lord_seconds, 1),
                "memory": "peak RSS (VmHWM) of a fresh process per run; train_* after a reset post-load",
                "note": "dense = the dequantized GGUF weights shipped in the package (already Q4-Q8 upstream)"}
    prev = RESULTS / "finetune.json"  # keep other models' runs (one model per invocation on this CPU)
    old = json.loads(prev.read_text()) if prev.is_file() else {}
    kept = [r for r in old.get("records", []) if r.get("model") != args.model]
    by_model = {k: v for k, v in old.get("ratios_by_model", {}).items() if k != args.model}
    if "ratios" in old and "ratios_by_model" not in old and kept:
        by_model[kept[0]["model"]] = old["ratios"]  # files written before ratios were kept per model
    protocols = {k: v for k, v in old.get("protocol_by_model", {}).items() if k != args.model}
    if "protocol" in old and "protocol_by_model" not in old and kept:
        protocols[kept[0]["model"]] = old["protocol"]
    write_results("finetune", protocol, kept + records, ratios=ratios,
                  ratios_by_model={**by_model, args.model: ratios},
                  protocol_by_model={**protocols, args.model: protocol})


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


if __name__ == "__main__":
    main()
