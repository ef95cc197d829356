"""Which code a compression step hurts: held-out ppl of several checkpoints on three kinds of text.

Why: on the default preset the float LoRD checkpoint is +4.1% stdlib ppl yet passes 49/164 HumanEval problems
where dense passes 65 and vocab + GPTQ-4 (+9.3% ppl) 53 (quality.json). Stdlib ppl may not see what HumanEval
needs. Domains (none is ever calibrated on):
* ``stdlib``: the flow's held-out split of the CPython stdlib (the evaluate stage's protocol);
* ``project``: the held-out split of another project's code (an installed pure-Python package, recursive);
* ``humaneval``: the 164 HumanEval prompts followed by their canonical solutions (docstring -> code, the
  benchmark's own text; measured, never trained or calibrated on).
Each checkpoint's ``bpb_increase`` (bits per byte: comparable across tokenizers, unlike ppl per token once the
vocabulary is trimmed) is against the first ``--models`` entry (dense). Writes bench/results/domain_ppl.json.

    OMP_NUM_THREADS=2 flock /tmp/lord-heavy.lock .venv/bin/python bench/domain_ppl.py \
        --models dense=qwen2.5-coder-0.5b lord=runs/decompose/<key> gptq=runs/quantize/<key>
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench.common import write_results  # noqa: E402

DOMAINS = ("stdlib", "project", "humaneval")


def humaneval_files(tmp: Path) -> list[Path]:
    """One file per problem: prompt + canonical solution, in file order."""
    from sources.humaneval import load_humaneval

    files = []
    for i, p in enumerate(load_humaneval()):
        f = tmp / f"{i:03d}.py"
        f.write_text(p.prompt + p.canonical_solution, encoding="utf-8")
        files.append(f)
    return files


def package_dir(name: str) -> Path:
    from sources.instructions import package_root

    root = package_root(name)
    if root is None:
        raise SystemExit(f"package {name!r} is not installed (pick another with --project)")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", required=True, metavar="LABEL=SPEC",
                    help="checkpoints (any lord load spec); the first is the reference (dense)")
    ap.add_argument("--project", default="networkx", help="installed package whose held-out files are 'project'")
    ap.add_argument("--n-windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    ap.add_argument("--name", default="domain_ppl", help="results name (bench/results/<name>.json)")
    args = ap.parse_args()
    from evaluation.perplexity import PerplexityConfig, perplexity
    from sources import code_split, load_model
    from sources.compute import compute_dtype

    cfg = PerplexityConfig(seq_len=args.seq_len, n_windows=args.n_windows, batch_size=4)
    models = [m.split("=", 1) for m in args.models]
    if any(len(m) != 2 for m in models):
        raise SystemExit("--models entries are LABEL=SPEC")
    with tempfile.TemporaryDirectory() as tmp:
        every = {"stdlib": lambda: code_split().heldout,
                 "project": lambda: code_split(package_dir(args.project)).heldout,
                 "humaneval": lambda: humaneval_files(Path(tmp))}
        domains = {d: every[d]() for d in args.domains}
        records: list[dict] = []
        ref: dict[str, float] = {}
        for label, spec in models:
            model, tok = load_model(spec, dtype=compute_dtype("cpu", "auto"))  # as the evaluate stage computes
            for domain, files in domains.items():
                t0 = time.perf_counter()
                res = perplexity(model, tok, files, cfg, progress=False)
                ref.setdefault(domain, res.bits_per_byte)
                rec = {"model": label, "spec": spec, "domain": domain, "ppl": round(res.ppl, 4),
                       "bits_per_byte": round(res.bits_per_byte, 5), "n_tokens": res.n_tokens,
                       "bpb_increase": round(res.bits_per_byte / ref[domain] - 1, 4),
                       "seconds": round(time.perf_counter() - t0, 1)}
                print(rec, flush=True)
                records.append(rec)
            del model
            gc.collect()
    write_results(args.name, {"ppl": cfg.to_dict(), "compute_dtype": str(compute_dtype("cpu", "auto")), "reference": models[0][0], "project": args.project,
                                 "domains": {"stdlib": "CPython stdlib held-out split (evaluate stage)",
                                             "project": f"held-out split of the installed {args.project} package",
                                             "humaneval": "164 x (prompt + canonical solution), in order"}},
                  records)


if __name__ == "__main__":
    main()
