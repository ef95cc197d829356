"""Where a small cut costs quality: the default preset's LoRD point with each group kind left dense in turn,
and with the groups the time model calls slow left dense (``skip_slow``, lord.plans.plan_fast_groups).

Every plan removes the same share of the (vocabulary-trimmed) model's parameters; the factors are computed
once from one statistics file and applied per plan; held-out ppl on the stdlib held-out split (never calibrated
on), 8 x 512 windows as the flow's evaluate stage. Writes bench/results/speed_plan.json.

Run on a flow's artifacts (the preset's vocab stage and its calibration statistics):
    OMP_NUM_THREADS=2 flock /tmp/lord-heavy.lock .venv/bin/python bench/speed_plan.py \
        --model runs/vocab/<key> --stats runs/calibrate/<key>
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench.common import write_results  # noqa: E402

KEEP_DENSE = ((), ("qkv", "o"), ("qkv",), ("o",), ("qkv", "o", "down"), ("qkv", "o", "gate_up"))


def main() -> None:
    import torch

    import lord
    from evaluation.perplexity import PerplexityConfig, perplexity
    from flows.presets import PRESETS
    from lord.model_ops import linear_params
    from lord.plans import rank_plan
    from lord.speed import is_slow
    from lord.stages import STATS_FILE
    from lord.stats import load_stats
    from sources import code_split, load_model

    preset = PRESETS["default"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the model the preset factors (a flow's runs/vocab/<key>)")
    ap.add_argument("--stats", type=Path, required=True, help="its statistics (a flow's runs/calibrate/<key>)")
    ap.add_argument("--reduction", type=float, default=preset["decompose"]["reduction"])
    ap.add_argument("--n-windows", type=int, default=preset["evaluate"]["n_windows"])
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok = load_model(args.model)
    groups = lord.find_groups(model)
    stats_file = args.stats / STATS_FILE if args.stats.is_dir() else args.stats
    stats, _ = load_stats(stats_file, [g.name for g in groups])
    facts = lord.factorize_groups(model, groups, stats, ("lord",))["lord"]
    del stats
    total, lin = lord.count_params(model), linear_params(model)
    kinds = sorted({g.kind for g in groups})
    cfg = PerplexityConfig(seq_len=preset["evaluate"]["seq_len"], n_windows=args.n_windows, batch_size=4)
    files = code_split().heldout
    plans: dict[str, dict] = {}
    for dense_kinds in KEEP_DENSE:
        sub = [g for g in groups if g.kind not in dense_kinds]
        ranks = rank_plan(sub, total, "uniform", reduction=args.reduction)
        plans["uniform" + (" dense:" + "+".join(dense_kinds) if dense_kinds else "")] = {
            g.name: ranks.get(g.name) for g in groups}
    plans["uniform skip_slow"] = rank_plan(groups, total, "uniform", reduction=args.reduction, skip_slow=True)
    records = [{"plan": "dense", "ppl": perplexity(model, tok, files, cfg).ppl, "param_reduction": 0.0}]
    print(records[0], flush=True)
    for label, ranks in plans.items():
        cut = copy.deepcopy(model)
        rep = lord.apply_ranks(cut, groups, facts, ranks, total, lin)
        t0 = time.perf_counter()
        ppl = perplexity(cut, tok, files, cfg).ppl
        rec = {"plan": label, "ppl": ppl, "ppl_increase": ppl / records[0]["ppl"] - 1,
               "param_reduction": rep.metrics["param_reduction"],
               "linear_param_reduction": rep.metrics["linear_param_reduction"],
               "n_groups_factored": rep.metrics["n_groups_factored"],
               "n_groups_slow": sum(is_slow(g.m, g.n, ranks.get(g.name), len(g.members)) for g in groups),
               "rank_by_kind": {k: next((ranks[g.name] for g in groups if g.kind == k), None) for k in kinds},
               "eval_seconds": round(time.perf_counter() - t0, 1)}
        print(rec, flush=True)
        records.append(rec)
        del cut
        write_results("speed_plan", {"model": args.model, "stats": str(args.stats), "reduction": args.reduction,
                                     "ppl": {**cfg.__dict__, "heldout": "stdlib held-out split"},
                                     "plans": "uniform parity-fraction plan over the groups not left dense; "
                                              "skip_slow: lord.plans.plan_fast_groups"}, records)


if __name__ == "__main__":
    main()
