"""Render the latest bench/results/*.json as markdown tables into README.md (between the results markers).

Run: .venv/bin/python bench/readme_table.py   (make bench runs it last)
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"
ORDER = ["benchmark", "baseline", "lord", "quant", "finetune", "humaneval", "reliability"]
# Columns worth a glance per benchmark; anything else stays in the json.
COLUMNS: dict[str, list[str]] = {
    "baseline": ["model", "params", "non_embedding_params", "ppl", "bits_per_byte", "forward_seconds_per_512_tokens",
                 "load_gguf_seconds", "load_cached_seconds"],
}
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


def render() -> str:
    files = sorted(RESULTS.glob("*.json"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else 99, p.stem))
    out = []
    for path in files:
        doc = json.loads(path.read_text())
        recs = doc.get("records", [])
        if not recs:
            continue
        cols = COLUMNS.get(doc.get("benchmark", path.stem))
        if cols is None:  # generic: keys in first-seen order, scalar values only, at most 12
            cols = []
            for r in recs:
                cols += [k for k, v in r.items() if k not in cols and not isinstance(v, (dict, list))]
            cols = cols[:12]
        env = doc.get("environment", {})
        out.append(f"**{path.stem}** (`bench/results/{path.name}`, {doc.get('created', '?')}, torch "
                   f"{env.get('torch', '?')}, {env.get('threads', '?')} threads, {env.get('device', '?')})\n")
        out.append(table(recs, cols) + "\n")
    return "\n".join(out)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the {START} / {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render()}\n{END}{tail}")
    print("README results section updated")


if __name__ == "__main__":
    main()
