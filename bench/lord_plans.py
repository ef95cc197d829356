"""Which rank plan, measured: uniform vs Fisher-weighted ``auto`` vs the measured ``search`` plan at one
parameter reduction, per model, with held-out ppl and the calibration loss each plan was chosen by.

Run: flock /tmp/heavy.lock .venv/bin/python bench/lord_plans.py --models smollm2-135m qwen2.5-coder-0.5b
Writes bench/results/lord_plans.json (records of other models are kept).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time

import torch
from common import PPL_PROTOCOL, RESULTS, write_results  # noqa: I001  (bench/ is on sys.path)

import lord
from evaluation import perplexity
from lord.search import search_plan
from lord.sensitivity import fisher_sensitivities, weights_of
from sources import calibration_batches, code_split, load_model

CALIB = (32, 512)  # as bench/lord.py
SENS = lord.DecomposeConfig()  # the search/sensitivity batch: the library defaults (8 x 256, seed 1)


def run_model(name: str, reduction: float, windows: int, split) -> list[dict]:
    torch.manual_seed(0)
    model, tok = load_model(name)
    ids = calibration_batches(tok, split.calibration, n_seqs=CALIB[0], seq_len=CALIB[1], seed=0)
    groups = lord.find_groups(model)
    stats = lord.collect_stats(model, groups, ids, batch_size=4)
    facts = lord.factorize_groups(model, groups, stats, ("lord",))["lord"]
    del stats
    gc.collect()
    curves = {k: f.error_curve() for k, f in facts.items()}
    total = lord.count_params(model)
    sens_ids = calibration_batches(tok, split.calibration, n_seqs=SENS.sensitivity_seqs,
                                   seq_len=SENS.sensitivity_seq_len, seed=SENS.sensitivity_seed)
    t0 = time.perf_counter()
    sens = fisher_sensitivities(model, groups, facts, sens_ids)
    fisher_seconds = time.perf_counter() - t0
    auto = lord.rank_plan(groups, total, "auto", reduction, curves, weights=weights_of(sens))
    plans = {"uniform": lord.rank_plan(groups, total, "uniform", reduction), "auto": auto}
    val_ids = calibration_batches(tok, split.calibration, n_seqs=SENS.sensitivity_seqs,  # as lord.stages
                                  seq_len=SENS.sensitivity_seq_len, seed=SENS.sensitivity_seed + 1000)
    found, rep = search_plan(model, groups, facts, sens_ids, reduction * total, candidates={"auto": auto},
                             validation_ids=val_ids)
    plans["search"] = found
    calib_loss = {"uniform": rep["loss_uniform"],
                  "auto": next(h["loss"] for h in rep["history"] if h.get("candidate") == "auto"),
                  "search": rep["loss"]}
    best_types = min(h["loss"] for h in rep["history"] if "multipliers" in h)
    proto = {**PPL_PROTOCOL, "n_windows": windows}
    dense = perplexity(model, tok, split.heldout, **proto, progress=False).ppl
    records = []
    for plan, ranks in plans.items():
        factored = copy.deepcopy(model)
        report = lord.apply_ranks(factored, groups, facts, ranks, total)
        ppl = perplexity(factored, tok, split.heldout, **proto, progress=False).ppl
        del factored
        gc.collect()
        by_type: dict[str, list[float]] = {}
        for g in groups:
            r = ranks.get(g.name)
            by_type.setdefault(g.name.split(".")[-1], []).append(0.0 if r is None else 1 - r / min(g.m, g.n))
        rec = {"model": name, "method": "lord", "plan": plan, "target_param_reduction": reduction,
               "param_reduction": round(report.metrics["param_reduction"], 4),
               "n_groups_factored": report.metrics["n_groups_factored"],
               "ppl": round(ppl, 4), "ppl_dense": round(dense, 4), "ppl_increase": round(ppl / dense - 1, 4),
               "calibration_loss": round(calib_loss[plan], 4),
               "rank_reduction_by_type": {t: round(sum(v) / len(v), 3) for t, v in by_type.items()}}
        if plan == "search":
            rec.update(search_chosen=rep["chosen"], search_multipliers=rep["multipliers"],
                       search_best_types_loss=round(best_types, 4),
                       validation_loss={k: round(v, 4) for k, v in rep["validation_loss"].items()},
                       search_evaluations=rep["evaluations"], search_seconds=round(rep["seconds"], 1),
                       fisher_seconds=round(fisher_seconds, 1))
        print(json.dumps(rec), flush=True)
        records.append(rec)
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--reduction", type=float, default=0.2)
    ap.add_argument("--windows", type=int, default=8, help="held-out 512-token windows")
    args = ap.parse_args()
    split = code_split()
    prev = RESULTS / "lord_plans.json"
    records = [r for r in json.loads(prev.read_text())["records"] if r["model"] not in args.models] \
        if prev.is_file() else []
    for name in args.models:
        records += run_model(name, args.reduction, args.windows, split)
        write_results("lord_plans", {
            "heldout": "stdlib held-out split", "split_digest": split.digest, "ppl_seq_len": PPL_PROTOCOL["seq_len"],
            "n_windows": args.windows, "calibration": {"n_seqs": CALIB[0], "seq_len": CALIB[1]},
            "search_batch": {"n_seqs": SENS.sensitivity_seqs, "seq_len": SENS.sensitivity_seq_len,
                             "seed": SENS.sensitivity_seed},
            "calibration_loss": "mean next-token loss on the search batch with the plan's cut applied",
        }, records)


if __name__ == "__main__":
    main()
