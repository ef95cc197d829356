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

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench.common import write_results  # noqa: E402

KEEP_DENSE = ((), ("qkv", "o"), ("qkv",), ("o",), ("qkv", "o", "down"), ("qkv", "o", "gate_up"))


def main() -> None:
    from bench.plan_bench import load_base, plan_parser
    from flows.presets import PRESETS
    from lord.plans import rank_plan
    from lord.speed import is_slow

    preset = PRESETS["default"]
    args = plan_parser(__doc__, preset).parse_args()
    base = load_base(args.model, args.stats, preset, args.n_windows)
    groups, total = base.groups, base.total
    kinds = sorted({g.kind for g in groups})
    plans: dict[str, dict] = {}
    for dense_kinds in KEEP_DENSE:
        sub = [g for g in groups if g.kind not in dense_kinds]
        ranks = rank_plan(sub, total, "uniform", reduction=args.reduction)
        plans["uniform" + (" dense:" + "+".join(dense_kinds) if dense_kinds else "")] = {
            g.name: ranks.get(g.name) for g in groups}
    plans["uniform skip_slow"] = rank_plan(groups, total, "uniform", reduction=args.reduction, skip_slow=True)
    records = [{"plan": "dense", "ppl": base.dense_ppl(), "param_reduction": 0.0}]
    print(records[0], flush=True)
    for label, ranks in plans.items():
        rec = {"plan": label, **base.evaluate(ranks, records[0]["ppl"]),
               "n_groups_slow": sum(is_slow(g.m, g.n, ranks.get(g.name), len(g.members)) for g in groups),
               "rank_by_kind": {k: next((ranks[g.name] for g in groups if g.kind == k), None) for k in kinds}}
        print(rec, flush=True)
        records.append(rec)
        write_results("speed_plan", {"model": args.model, "stats": str(args.stats), "reduction": args.reduction,
                                     "ppl": {**base.cfg.__dict__, "heldout": "stdlib held-out split"},
                                     "plans": "uniform parity-fraction plan over the groups not left dense; "
                                              "skip_slow: lord.plans.plan_fast_groups"}, records)


if __name__ == "__main__":
    main()
