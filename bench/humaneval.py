"""HumanEval on the default code model: greedy pass@1, batched vs unbatched tokens/s, sandbox throughput.

Run under the machine-wide lock:  flock /tmp/heavy.lock .venv/bin/python bench/humaneval.py [--limit 40]

One run measures, on the same model load:
1. the first ``--compare`` problems generated as one batch and one by one (same greedy config): tokens/s of
   each, their ratio, and whether the completions are identical (left padding must not change greedy text);
2. the rest of the first ``--limit`` problems in batches of ``--batch-size`` (resumable work file);
3. every completion executed in the sandbox -> pass@1 (greedy, unbiased estimator with n=1);
4. sandbox throughput: the 164 canonical solutions with 1 and with ``--workers`` workers (executions/s).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import write_results  # noqa: E402
from evaluation.generate import GenerationConfig, generate_completions  # noqa: E402
from evaluation.humaneval import execute_completions, score  # noqa: E402
from evaluation.sandbox import Sandbox, SandboxConfig  # noqa: E402
from sources import load_model  # noqa: E402
from sources.humaneval import load_humaneval  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--limit", type=int, default=40, help="first N of the 164 problems")
    ap.add_argument("--budget-minutes", type=float, default=25.0,
                    help="stop starting new batches after this much generation time; the subset is reported")
    ap.add_argument("--compare", type=int, default=6, help="problems generated both batched and unbatched")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/lord-bench-humaneval"))
    ap.add_argument("--stop-by", default=None, help="UTC wall clock HH:MM after which no new batch starts")
    args = ap.parse_args()
    stop_by = None
    if args.stop_by:
        now = datetime.datetime.now(datetime.timezone.utc)
        hh, mm = map(int, args.stop_by.split(":"))
        stop_by = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    torch.set_num_threads(threads)

    problems = load_humaneval(limit=args.limit)
    prompts = {p.task_id: p.prompt for p in problems}
    head = dict(list(prompts.items())[: args.compare])
    rest = dict(list(prompts.items())[args.compare :])
    model, tok = load_model(args.model)

    batched_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.compare)
    single_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=1)
    t0 = time.perf_counter()
    batched = generate_completions(model, tok, head, batched_cfg)
    batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    single = generate_completions(model, tok, head, single_cfg)
    single_s = time.perf_counter() - t0
    batched_tokens = sum(r["n_new_tokens"] for r in batched)
    single_tokens = sum(r["n_new_tokens"] for r in single)
    same = sum(a["completion"] == b["completion"] for a, b in zip(batched, single, strict=True))
    print(f"batch of {len(head)}: {batched_tokens / batched_s:.1f} tok/s; one by one: "
          f"{single_tokens / single_s:.1f} tok/s; identical completions {same}/{len(head)}")

    args.work.mkdir(parents=True, exist_ok=True)
    rest_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    rest_out, rest_s, items = [], 0.0, list(rest.items())
    for b in range(0, len(items), args.batch_size):
        late = stop_by is not None and datetime.datetime.now(datetime.timezone.utc) > stop_by
        if late or batched_s + single_s + rest_s > 60 * args.budget_minutes:
            print(f"generation budget of {args.budget_minutes} min used: stopping at {len(head) + b} problems")
            break
        t0 = time.perf_counter()
        rest_out += generate_completions(model, tok, dict(items[b : b + args.batch_size]), rest_cfg,
                                         args.work / f"rest-{args.max_new_tokens}.jsonl", progress=False)
        rest_s += time.perf_counter() - t0
        print(f"{len(head) + len(rest_out)} problems generated, {batched_s + single_s + rest_s:.0f} s", flush=True)
    completions = batched + rest_out
    problems = problems[: len(completions)]

    box = Sandbox(SandboxConfig(workers=args.workers), allow_execution=True)
    t0 = time.perf_counter()
    results = execute_completions(problems, completions, box)
    exec_s = time.perf_counter() - t0
    per_problem, means = score(problems, results, (1,))

    canon = [p.program(p.canonical_solution) for p in load_humaneval()]
    throughput = {}
    for workers in sorted({1, args.workers}):
        sb = Sandbox(SandboxConfig(workers=workers), allow_execution=True)
        t0 = time.perf_counter()
        ok = sum(r.passed for r in sb.run_many(canon, progress=False))
        throughput[workers] = (len(canon) / (time.perf_counter() - t0), ok)

    statuses = {s: sum(r["status"] == s for r in results) for s in ("passed", "failed", "timeout", "killed")}
    records = [
        {"model": args.model, "variant": "greedy", "n_problems": len(problems),
         "problems": f"HumanEval/0..HumanEval/{len(problems) - 1} (first {len(problems)} of 164)",
         "pass_at_1": means["pass_at_1"], "n_passed": statuses["passed"], "status_counts": statuses,
         "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
         "generation_seconds": batched_s + rest_s, "execution_seconds": exec_s,
         "n_new_tokens": sum(r["n_new_tokens"] for r in completions)},
        {"model": args.model, "variant": "batched-vs-unbatched", "n_problems": len(head),
         "batch_size": len(head), "batched_tokens_per_second": batched_tokens / batched_s,
         "unbatched_tokens_per_second": single_tokens / single_s,
         "tokens_per_second_ratio": (batched_tokens / batched_s) / (single_tokens / single_s),
         "ratio_of": "batched / unbatched tokens per second, same problems, same run",
         "batched_seconds": batched_s, "unbatched_seconds": single_s,
         "identical_greedy_completions": same},
        *({"model": "canonical-solutions", "variant": f"sandbox-{w}-workers", "n_problems": len(canon),
           "workers": w, "executions_per_second": eps, "n_passed": ok} for w, (eps, ok) in throughput.items()),
    ]
    protocol = {
        "decoding": "greedy, no chat template, prompt right-stripped, left padding, KV cache",
        "stop_sequences": list(rest_cfg.stop_sequences), "max_new_tokens": args.max_new_tokens,
        "subset": f"first {len(problems)} of 164 problems", "threads": threads,
        "sandbox": box.describe(),
        "note": "weights are the dequantized GGUF (Q5_0/Q6_K/Q8_0 of Qwen's AWQ release): see shared/DATA.md",
    }
    write_results("humaneval", protocol, records,
                  per_problem=[{**pp, "status": r["status"], "reason": r["reason"][:200]}
                               for pp, r in zip(per_problem, results, strict=True)])
    print(f"pass@1 {means['pass_at_1']:.3f} on {len(problems)} problems; "
          + "; ".join(f"sandbox {w} workers: {eps:.1f} exec/s" for w, (eps, _) in throughput.items()))


if __name__ == "__main__":
    main()
