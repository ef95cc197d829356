"""HumanEval on the default code model: greedy pass@1, batched vs unbatched tokens/s against the memory
bandwidth bound, sandbox throughput.

Run under the machine-wide lock:  OMP_NUM_THREADS=2 flock /tmp/lord-heavy.lock .venv/bin/python bench/humaneval.py

One run measures, on the same model load (compute dtype from sources/compute.py, ``--dtype``):
0. the machine: memory read bandwidth (a reduction over 1 GiB, 2 threads) and float32/bf16 GEMM rates; the
   batch-1 decode bound is bandwidth / bytes of weights read per token (every linear + the head);
1. the first ``--compare`` problems generated one by one (batch 1);
2. the first ``--limit`` problems in batches of ``--batch-size`` until ``--budget-minutes`` of generation:
   tokens/s against batch 1, and whether the shared problems' completions are identical (left padding and
   dropping finished rows must not change greedy text);
3. every completion executed in the sandbox -> pass@1 (greedy, unbiased estimator with n=1);
4. sandbox throughput: the 164 canonical solutions with 1 and with ``--workers`` workers (executions/s).
Tokens/s count generated tokens over wall time including each batch's prompt prefill.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import median_seconds, write_results  # noqa: E402
from evaluation.generate import GenerationConfig, generate_completions, prompt_text  # noqa: E402
from evaluation.humaneval import execute_completions, score  # noqa: E402
from evaluation.sandbox import Sandbox, SandboxConfig  # noqa: E402
from sources import load_model  # noqa: E402
from sources.compute import DTYPE_CHOICES, compute_dtype, describe, dtype_name  # noqa: E402
from sources.humaneval import load_humaneval  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--limit", type=int, default=164, help="first N of the 164 problems")
    ap.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="compute dtype (sources/compute.py)")
    ap.add_argument("--budget-minutes", type=float, default=11.0,
                    help="stop starting new batches after this much generation time; the subset is reported")
    ap.add_argument("--compare", type=int, default=4, help="first N problems also generated one by one")
    ap.add_argument("--batch-size", type=int, default=16)
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
    machine = measure_machine()
    print(f"machine: {machine}", flush=True)
    dtype = compute_dtype("cpu", args.dtype)
    model, tok = load_model(args.model, dtype=dtype)
    bytes_per_token = decode_bytes_per_token(model)
    bound_b1 = machine["read_gb_per_s"] * 1e9 / bytes_per_token

    single_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=1)
    t0 = time.perf_counter()
    single = generate_completions(model, tok, head, single_cfg)
    single_s = time.perf_counter() - t0
    single_tokens = sum(r["n_new_tokens"] for r in single)
    print(f"one by one ({len(head)} problems): {single_tokens / single_s:.2f} tok/s; "
          f"batch-1 bandwidth bound {bound_b1:.1f} tok/s", flush=True)

    args.work.mkdir(parents=True, exist_ok=True)
    work = args.work / f"batched-{args.max_new_tokens}-{args.batch_size}-{dtype_name(dtype)}.jsonl"
    work.unlink(missing_ok=True)  # timings must come from this run
    batched_cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    completions, batched_s, last_s, items = [], 0.0, 0.0, list(prompts.items())
    for b in range(0, len(items), args.batch_size):
        late = stop_by is not None and datetime.datetime.now(datetime.timezone.utc) > stop_by
        # stop before a chunk that would overrun the budget (the last chunk's time predicts the next one's)
        if late or single_s + batched_s + last_s > 60 * args.budget_minutes:
            print(f"generation budget of {args.budget_minutes} min used: stopping at {b} problems")
            break
        t0 = time.perf_counter()
        completions += generate_completions(model, tok, dict(items[b : b + args.batch_size]), batched_cfg,
                                            work, progress=False)
        last_s = time.perf_counter() - t0
        batched_s += last_s
        print(f"{len(completions)} problems generated in batches, {batched_s:.0f} s", flush=True)
    batched_tokens = sum(r["n_new_tokens"] for r in completions)
    by_id = {r["task_id"]: r for r in completions}
    same = sum(by_id[r["task_id"]]["completion"] == r["completion"] for r in single if r["task_id"] in by_id)
    print(f"batches of {args.batch_size}: {batched_tokens / batched_s:.2f} tok/s vs one by one "
          f"{single_tokens / single_s:.2f}; identical completions {same}/{len(head)}", flush=True)
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
         "compute_dtype": dtype_name(dtype),
         "generation_seconds": batched_s, "execution_seconds": exec_s,
         "n_new_tokens": batched_tokens, "tokens_per_second": batched_tokens / batched_s,
         "projected_164_generation_seconds": batched_s * 164 / len(problems),
         "prompt_tokens": sum(len(tok(prompt_text(tok, p))["input_ids"]) for p in prompts.values()),
         "finish_counts": {f: sum(r["finish"] == f for r in completions) for f in ("stop", "eos", "length")}},
        {"model": args.model, "variant": "batched-vs-unbatched", "n_problems": len(head),
         "n_problems_batched": len(problems),
         "batch_size": args.batch_size, "batched_tokens_per_second": batched_tokens / batched_s,
         "unbatched_tokens_per_second": single_tokens / single_s,
         "tokens_per_second_ratio": (batched_tokens / batched_s) / (single_tokens / single_s),
         "ratio_of": "tokens/s in batches (all generated problems) / one by one (the first n_problems), same run",
         "batched_seconds": batched_s, "unbatched_seconds": single_s,
         "identical_greedy_completions": same, "compute_dtype": dtype_name(dtype),
         "read_gb_per_s": machine["read_gb_per_s"], "weight_bytes_read_per_token": bytes_per_token,
         "batch1_bandwidth_bound_tokens_per_second": bound_b1,
         "unbatched_fraction_of_bandwidth_bound": (single_tokens / single_s) / bound_b1,
         "batched_fraction_of_bandwidth_bound": (batched_tokens / batched_s) / (bound_b1 * args.batch_size),
         "compute_bound_tokens_per_second": machine[f"gemm_gflop_per_s_{dtype_name(dtype)}"] * 1e9
         / (2 * bytes_per_token / model.dtype.itemsize)},
        *({"model": "canonical-solutions", "variant": f"sandbox-{w}-workers", "n_problems": len(canon),
           "workers": w, "executions_per_second": eps, "n_passed": ok} for w, (eps, ok) in throughput.items()),
    ]
    protocol = {
        "decoding": "greedy, no chat template, prompt right-stripped, left padding, KV cache",
        "stop_sequences": list(batched_cfg.stop_sequences), "max_new_tokens": args.max_new_tokens,
        "subset": f"first {len(problems)} of 164 problems", "threads": threads, "machine": machine,
        "compute_policy": describe("cpu", args.dtype),
        "decoder": "evaluation.generate: own KV-cache loop, prompts sorted by length, finished rows dropped",
        "sandbox": box.describe(),
        "note": "weights are the dequantized GGUF (Q5_0/Q6_K/Q8_0 of Qwen's AWQ release): see shared/DATA.md",
    }
    write_results("humaneval", protocol, records,
                  per_problem=[{**pp, "status": r["status"], "reason": r["reason"][:200]}
                               for pp, r in zip(per_problem, results, strict=True)])
    print(f"pass@1 {means['pass_at_1']:.3f} on {len(problems)} problems; "
          + "; ".join(f"sandbox {w} workers: {eps:.1f} exec/s" for w, (eps, _) in throughput.items()))


def measure_machine(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Memory read bandwidth (sum over ``gib`` GiB of float32, median of ``repeats``) and GEMM rates."""
    big = torch.ones(int(gib * 2**30 / 4))
    out = {"read_gb_per_s": gib * 2**30 / median_seconds(big.sum, repeats=repeats) / 1e9}
    del big
    for dt in (torch.float32, torch.bfloat16):  # a decode-sized GEMM: 16 rows x the 0.5B's MLP up-projection
        a, b = torch.randn(16, 896, dtype=dt), torch.randn(896, 4864, dtype=dt)
        seconds = median_seconds(functools.partial(torch.matmul, a, b))
        out[f"gemm_gflop_per_s_{dtype_name(dt)}"] = 2 * 16 * 896 * 4864 / seconds / 1e9
    return out


def decode_bytes_per_token(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads: every parameter, except an untied input embedding (only a row of
    it is gathered per token); a tied embedding is read whole by the head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not emb.weight:
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


if __name__ == "__main__":
    main()
