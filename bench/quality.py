"""Does the compressed model still write code? Held-out ppl of the tied Qwen2.5-Coder-0.5B cut by LoRD, one-shot
(``parallel``) vs error-compensating (``sequential``), per rank plan, at whole-model parameter reductions.

Stages (shared file bench/results/quality.json; other benches add gptq4 / recovered-* stages to it):
* ``dense``: the model itself; ``dense-tie`` (``--tie-check``): the GGUF's two copies of the tied matrix;
* ``parallel``: today's one-shot LoRD (every group from the dense model's statistics);
* ``sequential``: layer by layer on the compressed model's inputs toward the dense output, best candidate per
  group on held-out calibration sequences (lord/sequential.py, lord/regression.py);
* ``sequential-stats``: layer by layer, plain LoRD on the compressed inputs (no dense target).
Plans (ranks from the dense statistics, the same for every stage): ``uniform`` (every group at one fraction of
its parity rank), ``no-gate_up`` / ``o+down`` (uniform over some group kinds, the others left dense), ``auto``
(Fisher-weighted, lord/plans.py). Calibration and held-out code come from disjoint stdlib files.

Run: OMP_NUM_THREADS=2 flock /tmp/lord-heavy.lock .venv/bin/python bench/quality.py --reductions 0.1 0.2
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from common import PPL_PROTOCOL, RESULTS, merge_records, one_shot_factors  # noqa: I001  (bench/ is on sys.path)

import lord
from evaluation import perplexity
from lord.model_ops import linear_params
from lord.sensitivity import fisher_sensitivities, weights_of
from lord.sequential import sequential_decompose
from sources import calibration_batches, code_split, load_model

MODEL = "qwen2.5-coder-0.5b"
KIND_PLANS = {"uniform": None, "no-gate_up": ("qkv", "o", "down"), "o+down": ("o", "down"),
              "gate_up": ("gate_up",), "mlp": ("gate_up", "down"), "no-o": ("qkv", "gate_up", "down")}
STAGES = ("parallel", "sequential", "sequential-stats")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reductions", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--plans", nargs="+", default=["uniform"], choices=[*KIND_PLANS, "auto", "spectrum"])
    ap.add_argument("--stages", nargs="+", default=["parallel", "sequential"], choices=STAGES)
    ap.add_argument("--windows", type=int, default=8, help="held-out 512-token windows (>= 8)")
    ap.add_argument("--calib-seqs", type=int, default=16, help="calibration windows of 512 tokens")
    ap.add_argument("--tie-check", action="store_true", help="also measure the untied GGUF and both tied copies")
    ap.add_argument("--variants", nargs="+", default=None, metavar="PLAN:REDUCTION:STAGE",
                    help="run exactly these, in this order (instead of the reductions x plans x stages grid)")
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--model", default=MODEL, help="embedded name (a tiny one for a smoke run)")
    ap.add_argument("--results", default="quality", help="results name (bench/results/<name>.json)")
    ap.add_argument("--save", type=Path, default=None,
                    help="also save each variant as a LoRD checkpoint dir <save>/<plan>-<reduction>-<stage>")
    args = ap.parse_args()
    if not args.plot_only:
        run(args)
    plot(args.model, args.results)


def run(args: argparse.Namespace) -> None:
    split = code_split()
    proto = {**PPL_PROTOCOL, "n_windows": args.windows}
    protocol = {"lord_quality": {
        "heldout": "stdlib held-out split (files never used for calibration)", "split_digest": split.digest,
        "ppl": proto, "calibration": {"n_seqs": args.calib_seqs, "seq_len": 512, "seed": 0},
        "sequential": "every 4th calibration sequence held out to choose each group's candidate",
        "plans": "ranks from the dense statistics; the same ranks for every stage",
        "fisher_batch": {"n_seqs": 8, "seq_len": 256, "seed": 1}}}
    if args.tie_check:
        merge_records(args.results, tie_check(args.model, split, proto), protocol)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    load_seconds = time.perf_counter() - t0
    dense = perplexity(model, tok, split.heldout, **proto, progress=False).ppl
    total, linear = lord.count_params(model), linear_params(model)
    base = {"model": args.model, "params_dense": total, "ppl_dense": round(dense, 4)}
    merge_records(args.results, [{**base, "stage": "dense", "plan": "dense", "param_reduction": 0.0,
                               "linear_param_reduction": 0.0, "params": total, "ppl": round(dense, 4),
                               "ppl_increase": 0.0, "seconds": round(load_seconds, 1),
                               "tied_embeddings": True}], protocol)
    print(f"dense ppl {dense:.4f}, {total:,} params ({linear:,} in factorable linears)", flush=True)
    t0 = time.perf_counter()
    groups, facts, ids = one_shot_factors(model, tok, split.calibration, args.calib_seqs)
    gc.collect()
    one_shot_seconds = time.perf_counter() - t0
    print(f"parallel statistics + factorization: {one_shot_seconds:.0f} s", flush=True)
    curves = {k: f.error_curve() for k, f in facts.items()}
    variants = [(p, float(r), s) for p, r, s in (v.split(":") for v in args.variants)] if args.variants else \
        [(p, r, s) for r in args.reductions for p in args.plans for s in args.stages]
    weights = None
    for plan, reduction, stage in variants:
        if plan == "auto" and weights is None:
            sens_ids = calibration_batches(tok, split.calibration, n_seqs=8, seq_len=256, seed=1)
            weights = weights_of(fisher_sensitivities(model, groups, facts, sens_ids, progress=False))
        ranks = plan_ranks(groups, total, plan, reduction, curves, weights)
        save = (args.save / f"{plan}-{reduction:g}-{stage}", args.model, plan) if args.save else None
        rec = run_variant(model, tok, split, proto, groups, facts, ranks, ids, stage, total, linear, save)
        rec["seconds"] = round(rec["seconds"] + one_shot_seconds, 1)  # the plan needs the dense stats
        rec.update(base, plan=plan, target_param_reduction=reduction, ppl_increase=round(rec["ppl"] / dense - 1, 4))
        print(json.dumps(rec), flush=True)
        merge_records(args.results, [rec], protocol)


def plan_ranks(groups: list, total: int, plan: str, reduction: float, curves: dict,
               weights: dict | None) -> dict:
    """Ranks of ``plan`` removing ``reduction`` of all parameters; kinds a plan leaves out stay dense."""
    if plan in ("auto", "spectrum"):
        return lord.rank_plan(groups, total, plan, reduction, curves, weights=weights if plan == "auto" else None)
    kinds = KIND_PLANS[plan]
    chosen = [g for g in groups if kinds is None or g.kind in kinds]
    ranks = dict.fromkeys((g.name for g in groups), None)
    ranks.update(lord.rank_plan(chosen, total, "uniform", reduction))
    return ranks


def run_variant(model, tok, split, proto: dict, groups: list, facts: dict, ranks: dict, ids: torch.Tensor,
                stage: str, total: int, linear: int, save: tuple[Path, str, str] | None = None) -> dict:
    cut = copy.deepcopy(model)
    t0 = time.perf_counter()
    extra: dict = {}
    if stage == "parallel":
        lord.apply_ranks(cut, groups, facts, ranks, total, linear)
    else:
        mode = "stats" if stage == "sequential-stats" else "compensate"
        report = sequential_decompose(cut, groups, ranks, ids, mode=mode, progress=False)
        extra["chosen"] = report.chosen_counts()
        extra["walk_seconds"] = round(report.seconds, 1)
    seconds = time.perf_counter() - t0
    summary = lord.plan_summary(groups, ranks, total, linear)
    params = lord.count_params(cut)
    ppl = perplexity(cut, tok, split.heldout, **proto, progress=False).ppl
    if save is not None:
        out, source, plan = save
        _save(cut, tok, groups, ranks, stage, out, source, metrics={**summary, "plan": plan, "calibration": stage})
    del cut
    gc.collect()
    return {"stage": stage, "param_reduction": round(summary["param_reduction"], 4),
            "linear_param_reduction": round(summary["linear_param_reduction"], 4), "params": params,
            "n_groups_factored": summary["n_groups_factored"], "ppl": round(ppl, 4), "seconds": seconds, **extra}


def _save(cut, tok, groups: list, ranks: dict, stage: str, out: Path, source: str, metrics: dict) -> None:
    """The cut model as a LoRD checkpoint dir (the stage's format), for recovery / GPTQ / HumanEval benches."""
    from lord.stages import write_lord_dir

    rank_map = {g.name: {"members": list(g.members), "rank": ranks[g.name]} for g in groups}
    info = {"method": "lord", "plan": "bench/quality.py", "calibration": stage, "source_model": source}
    write_lord_dir(cut, tok, out, rank_map, info, metrics, source)
    print(f"saved {out}", flush=True)


def tie_check(name: str, split, proto: dict) -> list[dict]:
    """Held-out ppl of the GGUF as stored (two copies) and tied on each copy: which one the cache should use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sources.embedded import EMBEDDED, assemble_gguf
    from sources.models import tie_shared_copy

    emb = EMBEDDED[name]
    records = []
    with tempfile.TemporaryDirectory() as d:
        gguf = assemble_gguf(emb, Path(d))
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    copies = {"embedding": embedding.weight.detach().clone(), "head": head.weight.detach().clone()}
    rel = float((copies["embedding"] - copies["head"]).norm() / copies["head"].norm())
    for label in ("untied", "tied-head", "tied-embedding"):
        if label != "untied":
            tie_shared_copy(model, label.removeprefix("tied-"))
            with torch.no_grad():
                embedding.weight.copy_(copies[label.removeprefix("tied-")])
        ppl = perplexity(model, tok, split.heldout, **proto, progress=False).ppl
        records.append({"model": name, "stage": "dense-tie", "plan": label, "param_reduction": 0.0,
                        "params": lord.count_params(model), "ppl": round(ppl, 4), "copies_rel_difference": round(rel, 4)})
        print(json.dumps(records[-1]), flush=True)
        if label != "untied":  # untie again for the next copy
            embedding.weight = torch.nn.Parameter(copies["embedding"].clone())
            head.weight = torch.nn.Parameter(copies["head"].clone())
    return records


def plot(name: str = MODEL, results: str = "quality") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = RESULTS / f"{results}.json"
    if not path.is_file():
        return
    records = [r for r in json.loads(path.read_text())["records"] if r.get("model") == name]
    dense = next((r["ppl"] for r in records if r["stage"] == "dense"), None)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple, list] = {}
    for r in records:
        if r["stage"] in ("dense", "dense-tie") or r.get("ppl") is None:
            continue
        series.setdefault((r["stage"], r.get("plan")), []).append((r["param_reduction"], r["ppl"]))
    for (stage, plan), pts in sorted(series.items()):
        pts.sort()
        ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{stage} / {plan}")
    if dense:
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense {dense:.2f}")
    ax.set_xlabel("parameters removed (% of all, tied embedding counted once)")
    ax.set_ylabel("held-out ppl (stdlib, 512-token windows)")
    ax.set_title(f"{name}: ppl vs parameter reduction per stage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = RESULTS / f"{results}_ppl.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
