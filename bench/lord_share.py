"""How many groups a small cut should go to: the default preset's LoRD point (2.5% of the vocabulary-trimmed model,
down_proj only) spread uniformly over all 24 layers, over the k least sensitive ones (Fisher weight, the
``search`` plan's ``least-sensitive`` candidates, lord/search.py), and as the Fisher-weighted ``auto`` plan.

Why: every factored group first gives up the ranks between full and parity before it saves a parameter, so a
small cut is cheaper in fewer groups cut deeper; which groups is the sensitivity's job. The factors are computed
once from one statistics file; the Fisher pass runs on the preset's sensitivity batch (calibration tokens);
held-out ppl on the stdlib held-out split (never calibrated on), 8 x 512 windows as the flow's evaluate stage.
Writes bench/results/lord_share.json.

Run on a flow's artifacts (the preset's vocab stage and its calibration statistics):
    OMP_NUM_THREADS=2 flock /tmp/lord-heavy.lock .venv/bin/python bench/lord_share.py \
        --model runs/vocab/<key> --stats runs/calibrate/<key> [--reduction 0.1 --targets '*']
Records are merged by (reduction, targets): each point is replaced by its latest run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench.common import RESULTS, write_results  # noqa: E402

FRACTIONS = (0.75, 0.5, 1 / 3, 0.25, 1 / 6)  # of the groups; the search plan tries 1/2, 1/3, 1/4


def main() -> None:
    from bench.plan_bench import load_base, plan_parser
    from flows.presets import PRESETS
    from lord.config import DecomposeConfig
    from lord.errors import LordError
    from lord.plans import PlanContext, auto_over_share, rank_plan
    from lord.ranks import removal_target
    from lord.search import least_sensitive_ranks
    from lord.sensitivity import fisher_sensitivities
    from lord.sequential import MODES
    from lord.stages import STATS_FILE, calibration_ids_of
    from lord.stats import load_stats
    from sources import calibration_batches, code_split

    preset = PRESETS["default"]
    ap = plan_parser(__doc__, preset)
    ap.add_argument("--targets", nargs="+", default=list(preset["decompose"]["targets"]))
    ap.add_argument("--auto-fractions", nargs="*", type=float, default=[],
                    help="also the auto plan over the least sensitive share of the groups")
    ap.add_argument("--only", nargs="*", default=None, help="evaluate only plans whose label starts with these")
    ap.add_argument("--calibration", default="parallel", choices=["parallel", *(f"sequential-{m}" for m in MODES)],
                    help="sequential-*: fit the plan's factors layer by layer on the flow's calibration tokens "
                         "(lord/sequential.py) instead of the one-shot factors; labelled '<plan> [<calibration>]'")
    args = ap.parse_args()
    base = load_base(args.model, args.stats, preset, args.n_windows, tuple(args.targets))
    groups, total = base.groups, base.total
    curves = {g.name: base.facts[g.name].error_curve() for g in groups}
    dc = DecomposeConfig()
    sens_ids = calibration_batches(base.tok, code_split().calibration, n_seqs=dc.sensitivity_seqs,
                                   seq_len=dc.sensitivity_seq_len, seed=dc.sensitivity_seed)
    sens = fisher_sensitivities(base.model, groups, base.facts, sens_ids)
    weights = sens.weights
    target = removal_target(groups, total, args.reduction, "uniform")
    plans = {"uniform all": rank_plan(groups, total, "uniform", reduction=args.reduction),
             "auto (Fisher-weighted curves)": rank_plan(groups, total, "auto", reduction=args.reduction,
                                                        curves=curves, weights=weights)}
    plans.update(least_sensitive_ranks(groups, weights, target, FRACTIONS))
    ctx = PlanContext(groups, total, args.reduction, None, curves, weights)
    for frac in args.auto_fractions:  # the auto plan's error curves, over the least sensitive share only
        try:
            label, sub = auto_over_share(ctx, frac)
        except LordError as e:
            print(f"auto over {frac:.3g} of the groups: {e}", flush=True)
            continue
        plans[label] = sub
    sequential = None
    if args.calibration != "parallel":  # the tokens the statistics were collected on, rebuilt from their record
        stats_file = args.stats / STATS_FILE if args.stats.is_dir() else args.stats
        ids = calibration_ids_of(base.tok, load_stats(stats_file, [])[1], stats_file)
        sequential = (ids, args.calibration.removeprefix("sequential-"))
        plans = {f"{label} [{args.calibration}]": r for label, r in plans.items()}
    point = {"reduction": args.reduction, "targets": args.targets}
    old = RESULTS / "lord_share.json"
    measured = [label for label in plans if args.only is None or label.startswith(tuple(args.only))]
    # other (reduction, targets) points stay, and with --only this point's other plans too
    kept = [r for r in (json.loads(old.read_text())["records"] if old.exists() else [])
            if {k: r.get(k) for k in point} != point or (args.only is not None and r["plan"] not in measured
                                                         and r["plan"] != "dense")]
    records = [{**point, "plan": "dense", "ppl": base.dense_ppl(), "param_reduction": 0.0}]
    print(records[0], flush=True)
    for label in measured:
        ranks = plans[label]
        rec = {**point, "plan": label, **base.evaluate(ranks, records[0]["ppl"], sequential),
               "ranks": {g.name: ranks.get(g.name) for g in groups if ranks.get(g.name) is not None}}
        print({k: v for k, v in rec.items() if k != "ranks"}, flush=True)
        records.append(rec)
        write_results("lord_share", {"model": args.model, "stats": str(args.stats),
                                     "sensitivity": {**sens.meta, "weights": weights},
                                     "ppl": {**base.cfg.__dict__, "heldout": "stdlib held-out split"},
                                     "plans": "uniform parity-fraction plan over all groups or the k with the "
                                              "lowest Fisher weight (lord.search.least_sensitive_ranks); auto: "
                                              "lord.plans Auto"}, kept + records)


if __name__ == "__main__":
    main()
