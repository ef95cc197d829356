"""HumanEval of several variants on the same problems, side by side: pass@1 of each, and per problem where a
variant passes what the reference fails or the reverse. Reads the output dirs of ``lord eval --humaneval``
(each ran with the same generation config, checked here), so a long generation is not repeated to compare.

    lord eval --model qwen2.5-coder-0.5b --out /tmp/he/dense --no-ppl --humaneval --limit 40 --allow-code-execution
    lord eval --model DIR --out /tmp/he/trimmed ...   (same flags)
    python bench/humaneval_compare.py --name vocab_humaneval dense=/tmp/he/dense trimmed=/tmp/he/trimmed
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import write_results  # noqa: E402
from evaluation.paired import compare_outcomes, load_outcomes  # noqa: E402


def load(where: Path) -> dict[str, Any]:
    d = where / "humaneval" if (where / "humaneval").is_dir() else where
    rates = load_outcomes(d)
    if rates is None:
        raise SystemExit(f"{where}: no HumanEval results.jsonl")
    cfg = json.loads((d / "config.json").read_text())
    metrics = json.loads((d / "metrics.json").read_text())
    return {"rates": rates, "config": cfg, "metrics": metrics}


def compare(runs: dict[str, dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """One record per variant: problems it does better / worse on than the reference and the paired test's p
    (greedy runs: McNemar's exact test, plus the ``gained`` / ``lost`` ids; several samples a problem: the
    sign-flip test of the mean per-problem pass@1 difference; evaluation.paired)."""
    ref = runs[reference]
    gen = {k: v for k, v in ref["config"]["generation"].items() if k != "batch_size"}
    records = []
    for name, run in runs.items():
        if {k: v for k, v in run["config"]["generation"].items() if k != "batch_size"} != gen:
            raise SystemExit(f"{name}: generation config differs from {reference}'s; not comparable")
        if set(run["rates"]) != set(ref["rates"]):
            raise SystemExit(f"{name}: evaluated other problems than {reference}")
        m = run["metrics"]
        rec = {"variant": name, "model": m.get("model"), "generation_seconds": m.get("generation_seconds"),
               "n_new_tokens": m.get("n_new_tokens")}
        c = compare_outcomes(ref["rates"], run["rates"])
        rec.update({k: c[k] for k in ("n_problems", "pass_at_1", "n_better", "n_worse", "test")},
                   p_value=round(c["p_value"], 4),
                   pass_at_1_change_problems=round((c["pass_at_1"] - c["pass_at_1_reference"]) * c["n_problems"], 2))
        if c["test"] == "mcnemar":
            rec.update(n_passed=c["n_passed"], gained=c["gained"], lost=c["lost"])
        records.append(rec)
    return records


def _line(r: dict[str, Any], reference: str) -> str:
    if r["test"] == "mcnemar":
        return (f"{r['variant']}: {r['n_passed']}/{r['n_problems']} (pass@1 {r['pass_at_1']:.3f}), "
                f"{len(r['gained'])} gained, {len(r['lost'])} lost vs {reference} (McNemar p={r['p_value']:.3g})")
    return (f"{r['variant']}: pass@1 {r['pass_at_1']:.3f} on {r['n_problems']}, better on {r['n_better']}, worse on "
            f"{r['n_worse']} vs {reference} (sign-flip p={r['p_value']:.3g})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", required=True, help="results name (bench/results/<name>.json)")
    ap.add_argument("runs", nargs="+", metavar="VARIANT=DIR", help="the first is the reference")
    ap.add_argument("--pair", nargs="*", default=[], metavar="A:B",
                    help="also compare B against A (e.g. one model under two batch sizes: the churn floor)")
    ap.add_argument("--describe", nargs="*", default=[], metavar="VARIANT=TEXT", help="what each variant is")
    ap.add_argument("--group", nargs="*", default=[], metavar="NAME=V1,V2,...",
                    help="a summary record over variants that differ only by a seed (mean, sd, min, max passes "
                         "and each member's paired p), plus a strip plot bench/results/<name>_groups.png")
    ap.add_argument("--quality-stage", nargs="*", default=[], metavar="VARIANT=STAGE",
                    help="also set pass_at_1 / n_problems on the 0.5B's quality.json record of STAGE")
    args = ap.parse_args()
    pairs = [r.split("=", 1) for r in args.runs]
    runs = {name: load(Path(d)) for name, d in pairs}
    records = compare(runs, pairs[0][0])
    for r in records:
        print(_line(r, pairs[0][0]))
    extra = []
    for pair in args.pair:
        a, b = pair.split(":", 1)
        rec = compare({a: runs[a], b: runs[b]}, a)[-1]
        extra.append({"reference": a, **rec})
        print(_line(rec, a))
    groups = [group_record(g, records) for g in args.group]
    for g in groups:
        print(f"{g['variant']}: {g['n_passed_mean']:.1f} +- {g['n_passed_sd']:.1f} passed over {g['n_members']} seeds "
              f"(min {g['n_passed_min']}, max {g['n_passed_max']}; {pairs[0][0]} {g['reference_n_passed']})")
    if groups:
        plot_groups(args.name, groups, records, pairs[0][0])
    records += groups
    first = runs[pairs[0][0]]["config"]
    write_results(args.name, {"reference": pairs[0][0], "dirs": dict(pairs), "generation": first["generation"],
                              "limit": first.get("limit"), "sandbox": first.get("sandbox"),
                              "variants": dict(d.split("=", 1) for d in args.describe)}, records,
                  **({"pairs": extra} if extra else {}))
    if args.quality_stage:
        into_quality(records, dict(q.split("=", 1) for q in args.quality_stage), args.name)


def group_record(spec: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sd, min and max of the passes of the variants in ``spec`` (NAME=V1,V2,...): one configuration's
    spread over calibration seeds, the noise floor a single HumanEval run of it cannot show."""
    import statistics

    name, _, members = spec.partition("=")
    by_variant = {r["variant"]: r for r in records}
    missing = [m for m in members.split(",") if m not in by_variant]
    if not members or missing:
        raise SystemExit(f"--group {spec!r}: unknown variants {missing or '(none given)'}")
    rows = [by_variant[m] for m in members.split(",")]
    passed = [r["n_passed"] for r in rows]
    ref = records[0]
    return {"variant": name, "group": True, "members": [r["variant"] for r in rows], "n_members": len(rows),
            "n_problems": rows[0]["n_problems"], "n_passed_mean": round(statistics.mean(passed), 2),
            "n_passed_sd": round(statistics.stdev(passed), 2) if len(passed) > 1 else 0.0,
            "n_passed_min": min(passed), "n_passed_max": max(passed),
            "pass_at_1": round(statistics.mean(r["pass_at_1"] for r in rows), 4),
            "reference_n_passed": ref["n_passed"], "p_values": [r["p_value"] for r in rows]}


def plot_groups(name: str, groups: list[dict[str, Any]], records: list[dict[str, Any]], reference: str) -> None:
    """Passes of every member of every group (one column each), the reference as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import RESULTS

    by_variant = {r["variant"]: r for r in records}
    fig, ax = plt.subplots(figsize=(max(4.8, 1.8 + 1.6 * len(groups)), 4.2))
    for i, g in enumerate(groups):
        ys = [by_variant[m]["n_passed"] for m in g["members"]]
        ax.scatter([i] * len(ys), ys, s=40, zorder=3)
        ax.errorbar([i + 0.15], [g["n_passed_mean"]], yerr=[g["n_passed_sd"]], fmt="_", color="black", capsize=4)
    ax.axhline(records[0]["n_passed"], ls="--", color="gray", label=f"{reference} {records[0]['n_passed']}")
    ax.set_xticks(range(len(groups)), [g["variant"] for g in groups], rotation=15)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(f"HumanEval problems passed (of {groups[0]['n_problems']}, greedy)")
    ax.set_title("each column: one config, several calibration seeds", fontsize=10)
    ax.legend(loc="lower left")
    fig.tight_layout()
    out = RESULTS / f"{name}_groups.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def into_quality(records: list[dict[str, Any]], stages: dict[str, str], name: str) -> None:
    """pass@1 on the quality.json records of the named stages (the HumanEval columns of issue 14's table)."""
    from bench.common import RESULTS, write_json_atomic

    path = RESULTS / "quality.json"
    doc = json.loads(path.read_text())
    by_variant = {r["variant"]: r for r in records}
    for variant, stage in stages.items():
        hits = [q for q in doc["records"] if q.get("stage") == stage and q.get("from_stage") is None]
        if len(hits) != 1:
            raise SystemExit(f"quality.json has {len(hits)} records of stage {stage!r}; expected one")
        hits[0].update(pass_at_1=by_variant[variant]["pass_at_1"], n_problems=by_variant[variant]["n_problems"],
                       humaneval_from=f"bench/results/{name}.json")
    write_json_atomic(path, doc)


if __name__ == "__main__":
    main()
