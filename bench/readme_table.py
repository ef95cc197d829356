"""Render the latest bench/results/*.json as markdown tables: every benchmark into docs/RESULTS.md, and the
short headline tables (the `make run` summary, HumanEval-164 stage by stage) into README.md, each between its
results markers. The README stays a five-minute read; the full tables are one link away.

Run: .venv/bin/python bench/readme_table.py   (make bench runs it last)
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
ORDER = ["make_run", "baseline", "lord", "lord_plans", "quant", "finetune", "humaneval", "reliability",
         "deployment_check", "quant_interop"]
# Columns worth a glance per benchmark; anything else stays in the json.
COLUMNS: dict[str, list[str]] = {
    "baseline": ["model", "params", "non_embedding_params", "ppl", "bits_per_byte", "forward_seconds_per_512_tokens",
                 "load_gguf_seconds", "load_cached_seconds"],
    "lord": ["model", "method", "plan", "param_reduction", "rank_reduction", "n_groups_factored", "ppl", "ppl_dense",
             "ppl_increase", "forward_ratio", "decompose_seconds"],
    "lord_plans": ["model", "plan", "param_reduction", "n_groups_factored", "ppl", "ppl_dense", "ppl_increase",
                   "calibration_loss", "search_chosen", "search_evaluations", "search_seconds"],
    "make_run": ["preset", "variant", "params", "param_reduction", "size_mb", "ppl", "ppl_increase", "pass_at_1"],
    "quant": ["model", "base", "variant", "group_size", "ppl", "ppl_increase", "size_mb", "avg_bits_per_weight",
              "outlier_fraction", "quantize_seconds"],
    "finetune": ["model", "variant", "params", "peak_rss_mb", "quantized_weight_mb", "seconds_per_step", "eval_loss_before",
                 "eval_loss_after", "ppl_before", "ppl_nf4_base", "ppl_after"],
    "humaneval": ["model", "variant", "n_problems", "pass_at_1", "n_passed", "tokens_per_second_ratio",
                  "executions_per_second"],
    "reliability": ["variant", "bad_inputs_tried", "bad_inputs_rejected", "sandbox_attacks_tried",
                    "sandbox_attacks_contained", "kill_points_tried", "resumes_matched"],
    "speed": ["model", "dtype", "plan", "linear_param_reduction", "rank_reduction", "prefill_ms_512_ratio",
              "prefill_ms_1024_ratio", "decode_tokens_per_second_b1_ratio", "decode_tokens_per_second_b8_ratio",
              "decode_tokens_per_second_b1", "size_mb", "size_mb_ratio"],
    "quant_interop": ["case", "loader", "bits", "group_size", "ok", "weight_max_rel_err", "logits_rel_err_vs_ours_bf16"],
    "lord_share": ["reduction", "plan", "n_groups_factored", "param_reduction", "ppl", "ppl_increase"],
    "domain_ppl": ["model", "domain", "ppl", "bits_per_byte", "bpb_increase", "n_tokens"],
    "quant_grid": ["base", "variant", "ppl_float", "ppl", "ppl_ratio_vs_float", "size_mb", "quantize_seconds"],
    "quality": ["stage", "plan", "param_reduction", "size_mb", "ppl", "ppl_increase", "n_passed", "n_problems",
                "pass_at_1", "passed_also_by_dense"],
    "kd_speed": ["variant", "steps", "seconds_per_step", "speedup_ratio", "peak_rss_mb", "peak_rss_ratio",
                 "eval_loss_before", "eval_loss_after"],
    "humaneval_noise": ["variant", "n_problems", "pass_at_1", "n_passed", "n_worse", "n_better", "p_value", "test"],
}
# The README's short tables: the main command's summary and HumanEval on all 164 problems under the current
# prompt protocol (stop 28 on); everything else is in docs/RESULTS.md.
HEADLINE = ["make_run", "quality"]
HEADLINE_KEEP = {"quality": lambda r: r.get("humaneval_prompt") == "auto" and r.get("n_problems") == 164}
# Records worth a row (the rest stay in the json): reliability's detail rows are many.
KEEP = {"reliability": lambda r: r.get("variant") == "summary"}
# Sort so a table reads as a sweep.
SORT = {"lord": lambda r: (r.get("model", ""), r.get("method", ""), r.get("plan", ""), r.get("param_reduction", 0))}
SKIP = {"environment", "protocol", "records", "benchmark", "created"}


def fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v / 1e6:.1f}M"
    return str(v)


def table(records: list[dict], columns: list[str]) -> str:
    cols = [c for c in columns if any(c in r for r in records)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def render(names: list[str] | None = None, image_prefix: str = "../") -> str:
    """Tables of every results file (or only ``names``); image links relative to the page they go in."""
    files = sorted(RESULTS.glob("*.json"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    if names is not None:
        files = [p for p in files if p.stem in names]
    out = []
    for path in files:
        doc = json.loads(path.read_text())
        name = doc.get("benchmark", path.stem)
        recs = [r for r in doc.get("records", []) if KEEP.get(name, lambda _: True)(r)]
        if names is not None and name in HEADLINE_KEEP:
            recs = [r for r in recs if HEADLINE_KEEP[name](r)]
        if name in SORT:
            recs = sorted(recs, key=SORT[name])
        if not recs:
            continue
        cols = COLUMNS.get(name)
        if cols is None:  # generic: keys in first-seen order, scalar values only, at most 12
            cols = []
            for r in recs:
                cols += [k for k, v in r.items() if k not in cols and not isinstance(v, (dict, list))]
            cols = cols[:12]
        env = doc.get("environment", {})
        out.append(f"**{path.stem}** (`bench/results/{path.name}`, {doc.get('created', '?')}, torch "
                   f"{env.get('torch', '?')}, {env.get('threads', '?')} threads, {env.get('device', '?')})\n")
        out.append(table(recs, cols) + "\n")
        for png in sorted(RESULTS.glob(f"{path.stem}_*.png")):
            out.append(f"![{png.stem}]({image_prefix}bench/results/{png.name})\n")
    return "\n".join(out)


def replace_between(path: Path, body: str) -> None:
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{body}\n{END}{tail}")


def main() -> None:
    replace_between(ROOT / "docs" / "RESULTS.md", render())
    replace_between(ROOT / "README.md", render(HEADLINE, image_prefix=""))
    print("docs/RESULTS.md and the README's headline tables updated")


if __name__ == "__main__":
    main()
