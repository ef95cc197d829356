"""Recovery of a LoRD-compressed model at one compute budget: distillation from the dense teacher (KD, top-k
logits) vs instruction SFT, both LoRA on the frozen NF4 base, each in a fresh process.

Both runs get the same budget on the *process* clock (CPU seconds / threads), so a busy shared CPU does not
hand one of them more compute. Held-out perplexity on code the pipeline never calibrates or distils on (the
stdlib held-out split, 8 x 512). Writes bench/results/recovery.json (curves, steps, timings) and the
recovered-kd / recovered-sft records of bench/results/quality.json.

Run: OMP_NUM_THREADS=2 flock /tmp/lord-heavy.lock .venv/bin/python bench/recovery.py \
         --lord /tmp/h14kd/lord10 --budget-minutes 7
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from common import QUALITY_KEY, merge_records, write_results  # noqa: I001  (bench/ is on sys.path)

from evaluation.evaluate import logical_params
from evaluation.perplexity import PerplexityConfig, perplexity
from finetune import FinetuneConfig, finetune_in_subprocess
from lord.model_ops import linear_params
from sources import code_split, load_model

PPL = PerplexityConfig(seq_len=512, n_windows=8, batch_size=4)


def measure(spec: str, files: list[Path], dense: bool = False) -> dict[str, float]:
    """Held-out ppl and parameters of one model (+ its factorable linear parameters for the dense one)."""
    model, tok = load_model(spec)
    t0 = time.perf_counter()
    ppl = perplexity(model, tok, files, PPL, progress=False).ppl
    out = {"ppl": ppl, "params": logical_params(model), "ppl_seconds": time.perf_counter() - t0}
    if dense:
        out["linear_params"] = linear_params(model)
    del model
    gc.collect()
    return out


def blockwise_run(args: argparse.Namespace, files: list[Path], dense: dict, lord: dict) -> tuple[dict, dict]:
    """(B) the LoRD factors themselves refined layer by layer against the dense layers (float, no LoRA)."""
    from finetune.blockwise import BlockwiseConfig, blockwise_to_dir

    out = args.work / f"blockwise-{args.budget_minutes:g}min"
    cfg = BlockwiseConfig(budget_minutes=args.budget_minutes, lr=args.blockwise_lr, budget_clock="process",
                          n_seqs=args.kd_seqs, seq_len=256)
    t0 = time.perf_counter()
    report = blockwise_to_dir(args.lord, cfg, out, progress=False)
    wall = time.perf_counter() - t0
    after = measure(str(out), files)
    print("blockwise", {k: report[k] for k in ("budget_seconds", "seconds", "n_tokens")}, after)
    rec = {"stage": "recovered-blockwise", "params": after["params"], "ppl": after["ppl"],
           "ppl_increase": after["ppl"] / dense["ppl"] - 1, "seconds": report["budget_seconds"]}
    det = {"objective": "blockwise", "budget_minutes": args.budget_minutes, "budget_clock": "process",
           "lr": args.blockwise_lr, "ppl_lord": lord["ppl"], "ppl_after": after["ppl"], "ppl_dense": dense["ppl"],
           "stage_wall_seconds": wall, **report}
    return rec, det


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense", default="qwen2.5-coder-0.5b")
    ap.add_argument("--lord", required=True, help="LoRD checkpoint dir (its lord_artifact.json names the dense source)")
    ap.add_argument("--plan", default="uniform")
    ap.add_argument("--budget-minutes", type=float, default=7.0)
    ap.add_argument("--objectives", nargs="+", default=["kd", "sft", "blockwise"])
    ap.add_argument("--blockwise-lr", type=float, default=1e-4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/h14kd/recovery"))
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--kd-seqs", type=int, default=32, help="KD training windows (teacher logits cached)")
    ap.add_argument("--n-eval", type=int, default=4)
    ap.add_argument("--lord-stage", default="parallel", choices=["parallel", "sequential"],
                    help="how --lord was decomposed (recorded; sequential records are kept apart from parallel ones)")
    ap.add_argument("--results", default="recovery", help="results name (bench/results/<name>.json)")
    args = ap.parse_args()

    files = code_split().heldout
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "measured.json"
    measured = json.loads(cache.read_text()) if cache.is_file() else {}
    for name, spec in (("dense", args.dense), ("lord", args.lord)):
        if name not in measured:
            measured[name] = measure(spec, files, dense=name == "dense")
            cache.write_text(json.dumps(measured, indent=2))
        print(name, measured[name])
    dense, lord = measured["dense"], measured["lord"]
    common = {"model": Path(args.dense).name, "plan": args.plan, "ppl_dense": dense["ppl"],
              "param_reduction": 1 - lord["params"] / dense["params"],
              "linear_param_reduction": (dense["params"] - lord["params"]) / dense["linear_params"],
              "pass_at_1": None, "n_problems": 0}
    if args.lord_stage != "parallel":
        common["from_stage"] = args.lord_stage
    records, details = [], []
    for objective in args.objectives:
        if objective == "blockwise":
            rec, det = blockwise_run(args, files, dense, lord)
            records.append({**common, **rec})
            details.append(det)
            write(args, common, dense, lord, records, details)
            continue
        cfg = FinetuneConfig(
            objective=objective, budget_minutes=args.budget_minutes, budget_clock="process", steps=None,
            base="nf4", max_seq_len=256, micro_batch_size=1, grad_accum_steps=2, lr=args.lr,
            warmup_steps=2, eval_every=25, early_stop_patience=0, lora_r=16, lora_alpha=32,
            n_eval=args.n_eval, kd_n_seqs=args.kd_seqs + args.n_eval, kd_top_k=32, n_examples=800)
        out = args.work / f"{objective}-{args.budget_minutes:g}min"
        t0 = time.perf_counter()
        m = finetune_in_subprocess(args.lord, cfg, out, threads=None, progress=False)
        wall = time.perf_counter() - t0
        after = measure(str(out), files)
        print(objective, {k: m[k] for k in ("steps_done", "eval_loss_before", "eval_loss_after", "train_seconds")},
              after)
        records.append({**common, "stage": f"recovered-{objective}", "params": after["params"], "ppl": after["ppl"],
                        "ppl_increase": after["ppl"] / dense["ppl"] - 1, "seconds": m["train_seconds"]})
        details.append({"objective": objective, "budget_minutes": args.budget_minutes, "budget_clock": "process",
                        "ppl_lord": lord["ppl"], "ppl_after": after["ppl"], "ppl_dense": dense["ppl"],
                        "stage_wall_seconds": wall, "teacher": m["data"].get("teacher"),
                        **{k: m.get(k) for k in ("steps_done", "seconds_per_step", "train_seconds", "budget_stop",
                                                 "eval_loss_before", "eval_loss_after", "train_loss_first",
                                                 "train_loss_last", "total_seconds", "peak_rss_mb",
                                                 "n_train_examples", "curve")}})
        write(args, common, dense, lord, records, details)


def write(args: argparse.Namespace, common: dict, dense: dict, lord: dict, records: list, details: list) -> None:
    """Results so far (called after every arm, so a run cut short keeps what it measured)."""
    base = {**common, "stage": args.lord_stage, "params": lord["params"], "ppl": lord["ppl"],
            "ppl_increase": lord["ppl"] / dense["ppl"] - 1, "seconds": None}
    protocol = {"heldout": "stdlib held-out split (never calibrated or distilled on)", **PPL.to_dict(),
                "budget_minutes": args.budget_minutes, "budget_clock": "process (CPU seconds / threads)",
                "base": "NF4 + LoRA r16 on all linears, compute dtype by sources.compute, eval of the merged float "
                        "model", "lord": args.lord, "lr": args.lr, "kd_windows": args.kd_seqs,
                "threads": torch.get_num_threads()}
    write_results(args.results, protocol, [base] + records, details=details)
    merge_records("quality", records, protocol={args.results: protocol}, key=(*QUALITY_KEY, "from_stage"))


if __name__ == "__main__":
    main()
