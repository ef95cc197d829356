"""LoRD vs plain SVD vs whitening, uniform vs budget vs spectrum vs auto (Fisher- or probe-weighted) rank plans,
at 10/20/30% whole-model parameter reduction: held-out ppl, decomposition wall time, calibration overhead, forward-time ratio; one run per model.

Run (heavy): flock /tmp/heavy.lock .venv/bin/python bench/lord.py --models smollm2-135m qwen2.5-coder-0.5b
Records of models not named on the command line are kept from the previous results file.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from common import PPL_PROTOCOL, RESULTS, write_results  # noqa: I001  (bench/ is on sys.path)

# this file is bench/lord.py: with bench/ first on sys.path, `import lord` would import this script itself
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
import lord  # noqa: E402
from artifacts import write_json_atomic  # noqa: E402
from evaluation import perplexity  # noqa: E402
from lord.sensitivity import Sensitivity, fisher_sensitivities, probe_sensitivities, weights_of  # noqa: E402
from sources import batches_digest, calibration_batches, code_split, load_model  # noqa: E402

REDUCTIONS = (0.1, 0.2, 0.3)
GRID = [("lord", "uniform"), ("lord", "budget"), ("lord", "spectrum"), ("lord", "auto"), ("whiten", "uniform"),
        ("whiten", "auto"), ("svd", "uniform"), ("svd", "auto")]
WEIGHTED = ("auto", "auto-probe")  # `auto` (Fisher weights, the library default) and with loss-probe weights
SENS = lord.DecomposeConfig()  # sensitivity probe batch and probe rank: the library defaults
CALIB = {"smollm2-135m": (32, 512), "qwen2.5-coder-0.5b": (32, 512)}  # (n_seqs, seq_len)
OVERHEAD_SEQS = 4  # sequences timed for the calibration overhead ratio (alternated with plain forwards)


@torch.no_grad()
def calibration_overhead(model, groups, ids: torch.Tensor, repeats: int = 2) -> dict:
    """Median seconds of plain forwards vs forwards with the statistics hooks on the same tokens, alternated.

    Both statistics are timed: ``auto`` (the default: output covariance for narrowing linears) and ``input``
    (the input Gram everywhere, the previous default).
    """
    times: dict[str, list[float]] = {"plain": [], "auto": [], "input": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, ids.shape[0], 4):
            model(input_ids=ids[i:i + 4], use_cache=False)
        times["plain"].append(time.perf_counter() - t0)
        for statistic in ("auto", "input"):
            t0 = time.perf_counter()
            lord.collect_stats(model, groups, ids, batch_size=4, progress=False, statistic=statistic)
            times[statistic].append(time.perf_counter() - t0)
    p, a, i = (statistics.median(times[k]) for k in ("plain", "auto", "input"))
    return {"plain_forward_seconds": p, "calibration_forward_seconds": a, "calibration_overhead_ratio": a / p,
            "calibration_forward_seconds_input_gram": i, "calibration_overhead_ratio_input_gram": i / p}


def run_model(name: str, split, grid: list[tuple[str, str]], reductions: tuple[float, ...],
              ppl_protocol: dict, on_record=lambda recs, summary: None) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    model, tok = load_model(name)
    n_seqs, seq_len = CALIB[name]
    ids = calibration_batches(tok, split.calibration, n_seqs=n_seqs, seq_len=seq_len, seed=0)
    groups = lord.find_groups(model)
    overhead = calibration_overhead(model, groups, ids[:OVERHEAD_SEQS])
    print(name, overhead, flush=True)
    t0 = time.perf_counter()
    stats = lord.collect_stats(model, groups, ids, batch_size=4)
    calib_seconds = time.perf_counter() - t0

    dense = perplexity(model, tok, split.heldout, **ppl_protocol)
    print(name, "dense ppl", dense.ppl, flush=True)
    total = lord.count_params(model)
    facts, fact_seconds = {}, {}
    for method in dict.fromkeys(m for m, _ in grid):
        t0 = time.perf_counter()
        facts[method] = lord.factorize_groups(model, groups, stats, (method,))[method]
        fact_seconds[method] = time.perf_counter() - t0
        print(name, method, "factorize seconds", round(fact_seconds[method], 1), flush=True)
    del stats
    gc.collect()
    sens_ids = calibration_batches(tok, split.calibration, n_seqs=SENS.sensitivity_seqs,
                                   seq_len=SENS.sensitivity_seq_len, seed=SENS.sensitivity_seed)
    weights, sens_summary = {}, {}  # (method, plan) -> group weights; auto: Fisher, auto-probe: loss probes
    for method, plan in grid:
        if plan not in WEIGHTED:
            continue
        if plan == "auto-probe":
            sens = probe_sensitivities(model, groups, facts[method], sens_ids, SENS.probe_fraction)
        else:
            sens = fisher_sensitivities(model, groups, facts[method], sens_ids)
        weights[method, plan] = weights_of(sens)
        key = f"{method}_{plan}"
        write_json_atomic(RESULTS / f"lord_sensitivity_{name}_{key}.json", sens.to_json())
        sens_summary[key] = {"seconds": round(sens.seconds, 1),
                             "file": f"lord_sensitivity_{name}_{key}.json"}
        if plan == "auto-probe":
            sens_summary[key]["delta_loss_by_type"] = _by_type(sens)
        print(name, key, "sensitivity", json.dumps(sens_summary[key]), flush=True)

    summary = {
        "model": name, "params_dense": total, "ppl_dense": round(dense.ppl, 4), "ppl_protocol": ppl_protocol,
        "grid": [list(g) for g in grid], "reductions": list(reductions),
        "calibration": {"n_seqs": n_seqs, "seq_len": seq_len, "hash": batches_digest(ids),
                        "seconds": round(calib_seconds, 2), **{k: round(v, 3) for k, v in overhead.items()}},
        "factorize_seconds": {k: round(v, 2) for k, v in fact_seconds.items()},
        "sensitivity": {"n_seqs": SENS.sensitivity_seqs, "seq_len": SENS.sensitivity_seq_len,
                        "seed": SENS.sensitivity_seed, "probe_fraction": SENS.probe_fraction, **sens_summary},
    }
    records = []
    for method, plan in grid:
        curves = {k: f.error_curve() for k, f in facts[method].items()}
        for reduction in reductions:
            ranks = lord.rank_plan(groups, total, "auto" if plan in WEIGHTED else plan, reduction, curves,
                                   weights=weights.get((method, plan)))
            factored = copy.deepcopy(model)
            t0 = time.perf_counter()
            report = lord.apply_ranks(factored, groups, facts[method], ranks, total)
            apply_seconds = time.perf_counter() - t0
            res = perplexity(factored, tok, split.heldout, **ppl_protocol, progress=False)
            m = report.metrics
            rec = {
                "model": name, "method": method, "plan": plan, "target_param_reduction": reduction,
                "param_reduction": round(m["param_reduction"], 4),
                "layer_param_reduction": round(m["layer_param_reduction"], 4),
                "rank_reduction": round(m["rank_reduction_mean"], 4),
                "n_groups_factored": m["n_groups_factored"], "n_groups": m["n_groups"],
                "ppl": round(res.ppl, 4), "ppl_dense": round(dense.ppl, 4),
                "ppl_increase": round(res.ppl / dense.ppl - 1, 4),
                "rel_output_error_mean": round(m["rel_output_error_mean"], 4),
                "decompose_seconds": round(fact_seconds[method] + apply_seconds, 2),
                "forward_ratio": round(res.seconds / dense.seconds, 3),
                "ratio_of": "held-out ppl pass seconds, factored / dense (same windows, same run)",
                "params": m["params_total_factored"], "params_dense": total,
                "sensitivity_weighted": plan in WEIGHTED,
            }
            print(json.dumps(rec), flush=True)
            uni = next((x for x in records if x["method"] == method and x["plan"] == "uniform"
                        and x["target_param_reduction"] == reduction), None)
            if plan != "uniform" and uni:
                print(f"{name} {method} {plan} @ {reduction:.0%}: ppl {rec['ppl']:.2f} vs uniform {uni['ppl']:.2f}; "
                      f"ppl-increase ratio {plan}/uniform = {rec['ppl_increase'] / uni['ppl_increase']:.3f}",
                      flush=True)
            records.append(rec)
            on_record(records, summary)  # partial results survive an interrupted run
            del factored
            gc.collect()
    return records, summary


def _by_type(sens: Sensitivity) -> dict:
    """Mean and range of the probe loss increase per group type (qkv, o_proj, gate_up, down_proj, ...)."""
    by: dict[str, list[float]] = {}
    for k, v in sens.groups.items():
        by.setdefault(k.rsplit(".", 1)[-1], []).append(v["delta_loss"])
    return {t: {"mean": round(statistics.mean(d), 5), "min": round(min(d), 5), "max": round(max(d), 5)}
            for t, d in by.items()}


def compare(records: list[dict]) -> list[dict]:
    """Targets of issue 3 per model and reduction: LoRD vs SVD ppl increase, auto vs uniform."""
    key = {(r["model"], r["method"], r["plan"], r["target_param_reduction"]): r for r in records}

    def ratio(a: dict | None, b: dict | None) -> float | None:
        return float(f"{a['ppl_increase'] / b['ppl_increase']:.3g}") if a and b else None

    out = []
    for (model, method, plan, red), r in sorted(key.items()):
        if method != "lord" or plan != "auto":
            continue
        uni = key.get((model, "lord", "uniform", red))
        svd = key.get((model, "svd", plan, red))
        svd_uni = key.get((model, "svd", "uniform", red))
        spec = key.get((model, "lord", "spectrum", red))
        probe = key.get((model, "lord", "auto-probe", red))
        out.append({
            "model": model, "target_param_reduction": red,
            "lord_over_svd_ppl_increase_auto": ratio(r, svd),
            "lord_over_svd_ppl_increase_uniform": ratio(uni, svd_uni),
            "auto_over_uniform_ppl_increase_lord": ratio(r, uni),
            "spectrum_over_uniform_ppl_increase_lord": ratio(spec, uni),
            "auto_probe_over_uniform_ppl_increase_lord": ratio(probe, uni),
        })
    return out


def plot(records: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for method in ("lord", "whiten", "svd"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in sorted({r["model"] for r in records}):
            dense = next(r["ppl_dense"] for r in records if r["model"] == model)
            for plan, style in (("uniform", "--o"), ("budget", ":s"), ("spectrum", "-.d"), ("auto-probe", ":v"),
                                ("auto", "-^")):
                pts = sorted((r["param_reduction"], r["ppl"]) for r in records
                             if r["model"] == model and r["method"] == method and r["plan"] == plan)
                if pts:
                    ax.plot([0] + [p[0] for p in pts], [dense] + [p[1] for p in pts], style,
                            label=f"{model} {plan}")
        ax.set_yscale("log")
        ax.set_xlabel("whole-model parameter reduction")
        ax.set_ylabel("held-out ppl (stdlib, 512-token windows)")
        ax.set_title(f"{method}: ppl vs parameter reduction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = RESULTS / f"lord_ppl_{method}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path.name)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    ap.add_argument("--grid", nargs="+", help="method:plan pairs (default: all of GRID)")
    ap.add_argument("--reductions", nargs="+", type=float, default=list(REDUCTIONS))
    ap.add_argument("--windows", type=int, default=PPL_PROTOCOL["n_windows"], help="held-out 512-token windows")
    ap.add_argument("--replot", action="store_true", help="recompute comparisons and figures from lord.json only")
    ap.add_argument("--overhead-only", action="store_true",
                    help="re-measure the calibration overhead of --models only; update their summaries in lord.json")
    args = ap.parse_args()
    if args.overhead_only:
        doc = json.loads((RESULTS / "lord.json").read_text())
        for s in doc["models"]:
            if s["model"] in args.models:
                model, tok = load_model(s["model"])
                ids = calibration_batches(tok, code_split().calibration, n_seqs=CALIB[s["model"]][0],
                                          seq_len=CALIB[s["model"]][1], seed=0)
                overhead = calibration_overhead(model, lord.find_groups(model), ids[:OVERHEAD_SEQS])
                print(s["model"], overhead, flush=True)
                s["calibration"].update({k: round(v, 3) for k, v in overhead.items()})
        write_json_atomic(RESULTS / "lord.json", doc)
        return
    if args.replot:
        doc = json.loads((RESULTS / "lord.json").read_text())
        doc.update(comparisons=compare(doc["records"]), figures=plot(doc["records"]))
        write_json_atomic(RESULTS / "lord.json", doc)
        return
    grid = [tuple(g.split(":")) for g in args.grid] if args.grid else GRID
    ppl_protocol = {**PPL_PROTOCOL, "n_windows": args.windows}
    split = code_split()
    prev = RESULTS / "lord.json"
    records, summaries, prev_summaries = [], [], {}
    if prev.is_file():
        old = json.loads(prev.read_text())
        for r in old.get("records", []):  # before loss-probe weighting, `auto` was today's `spectrum`
            if r["plan"] == "auto" and not r.get("sensitivity_weighted"):
                r["plan"] = "spectrum"
        # keep every record this run does not recompute (other models, or grid entries not run now)
        records = [r for r in old.get("records", []) if r["model"] not in args.models
                   or (r["method"], r["plan"]) not in grid]
        summaries = [s for s in old.get("models", []) if s["model"] not in args.models]
        prev_summaries = {s["model"]: s for s in old.get("models", [])}
    def write(recs: list[dict], summary: dict) -> None:
        protocol = {
            "heldout": "stdlib top-level *.py, held-out split", "split_digest": split.digest,
            "ppl": "per model in models[].ppl_protocol (seq_len 512, n_windows as run)",
            "calibration": {k: {"n_seqs": v[0], "seq_len": v[1]} for k, v in CALIB.items()},
            "calibration_overhead": f"{OVERHEAD_SEQS} seqs, plain forward vs Gram hooks, alternated x2, median",
            "grid_and_reductions": "per model in models[]", "damping_whiten": 0.01,
            "param_reduction": "params removed / all model params (embeddings + head, tied counted once)",
            "rank_reduction": "mean over factored groups of 1 - r/min(m, n)",
            "note": "embedded weights were Q4-Q8 GGUF before we got them; dense = dequantized float32",
        }
        before = prev_summaries.get(summary["model"], {}).get("sensitivity", {})
        summary["sensitivity"] = {**before, **summary["sensitivity"]}  # probes of grid entries not rerun
        allrecs = records + recs
        write_results("lord", protocol, allrecs, models=summaries + [summary], comparisons=compare(allrecs),
                      figures=plot(allrecs))

    for name in args.models:
        recs, summary = run_model(name, split, grid, tuple(args.reductions), ppl_protocol, write)
        records += recs
        summaries.append(summary)


if __name__ == "__main__":
    main()
