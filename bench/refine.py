"""The flow's ``refine`` stage (block-wise distillation of the float LoRD factors, finetune.blockwise) at one
budget on one LoRD checkpoint, over a small grid of learning rate x windows per step: which setting buys the
most held-out perplexity per CPU minute. Each arm starts from the same checkpoint; held-out ppl on the stdlib
held-out split (8 x 512, never calibrated or refined on). Writes bench/results/refine.json.

Run: OMP_NUM_THREADS=2 flock /tmp/lord-heavy.lock .venv/bin/python bench/refine.py \
         --lord runs/decompose/<key> --budget-minutes 5 --arms 1e-4:4 3e-4:4 3e-4:1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench.common import write_results  # noqa: E402
from bench.recovery import PPL, measure  # noqa: E402


def main() -> None:
    from finetune import BlockwiseConfig, FinetuneConfig, blockwise_to_dir
    from finetune.kd import resolve_teacher
    from sources import code_split

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lord", required=True, help="LoRD checkpoint dir (e.g. a flow's runs/decompose/<key>)")
    ap.add_argument("--budget-minutes", type=float, default=5.0)
    ap.add_argument("--arms", nargs="+", default=["1e-4:4", "3e-4:4", "3e-4:1"], help="LR:WINDOWS_PER_STEP")
    ap.add_argument("--n-seqs", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lord-refine-bench"))
    args = ap.parse_args()

    files = code_split().heldout
    args.work.mkdir(parents=True, exist_ok=True)
    teacher = resolve_teacher(args.lord, FinetuneConfig())
    dense, lord = measure(teacher, files), measure(args.lord, files)
    print("teacher", teacher, dense, "\nlord", lord, flush=True)
    records = [{"arm": "teacher", "ppl": dense["ppl"]}, {"arm": "lord", "ppl": lord["ppl"], "params": lord["params"],
                                                          "ppl_increase": lord["ppl"] / dense["ppl"] - 1}]
    for arm in args.arms:
        lr, batch = float(arm.split(":")[0]), int(arm.split(":")[1])
        cfg = BlockwiseConfig(budget_minutes=args.budget_minutes, lr=lr, batch_size=batch, n_seqs=args.n_seqs,
                              budget_clock="process")
        out = args.work / f"lr{lr:g}-b{batch}-{args.budget_minutes:g}min"
        t0 = time.perf_counter()
        report = blockwise_to_dir(args.lord, cfg, out, progress=False)
        wall = time.perf_counter() - t0
        after = measure(str(out), files)
        rec = {"arm": arm, "lr": lr, "windows_per_step": batch, "ppl": after["ppl"],
               "ppl_increase": after["ppl"] / dense["ppl"] - 1, "ppl_vs_lord": after["ppl"] / lord["ppl"],
               "steps_total": report["steps_total"], "rel_err_before_mean": report["rel_err_before_mean"],
               "rel_err_after_mean": report["rel_err_after_mean"], "budget_seconds": report["budget_seconds"],
               "wall_seconds": wall}
        print(json.dumps(rec), flush=True)
        records.append(rec)
        write_results("refine", {"lord": args.lord, "teacher": teacher, "budget_minutes": args.budget_minutes,
                                 "budget_clock": "process (CPU seconds / threads)", "n_seqs": args.n_seqs,
                                 "seq_len": 256, "heldout": "stdlib held-out split", "ppl": PPL.to_dict(),
                                 "arms": "LR:WINDOWS_PER_STEP, Adam on the factors, each from the same checkpoint"},
                      records)


if __name__ == "__main__":
    main()
