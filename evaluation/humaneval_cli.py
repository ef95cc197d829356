"""Command-line flags for HumanEval, shared by ``lord eval --humaneval`` (flows/cli.py) and
``python -m evaluation.humaneval_cli --model M --out DIR``.

Executing model code is refused unless ``--allow-code-execution`` is given (as in
bigcode-evaluation-harness); the pipeline sets ``allow_execution=True`` itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sources.compute import DTYPE_CHOICES

from .generate import GenerationConfig
from .humaneval import HumanEvalConfig, humaneval_to_dir
from .sandbox import SandboxConfig


def add_humaneval_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("HumanEval")
    g.add_argument("--limit", type=int, default=None, help="first N of the 164 problems (default: all)")
    g.add_argument("--task-ids", default=None, help="comma-separated ids, e.g. HumanEval/0,HumanEval/5")
    g.add_argument("--n", type=int, default=1, help="samples per problem (n > 1 needs --temperature > 0)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--k", default="1", help="comma-separated k for pass@k, each <= n")
    g.add_argument("--max-new-tokens", type=int, default=384)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--workers", type=int, default=2, help="parallel sandboxed executions")
    g.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per execution")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default=argparse.SUPPRESS,
                   help="compute dtype (auto: bf16 where the CPU/GPU multiplies it natively, else float32)")
    g.add_argument("--allow-code-execution", action="store_true",
                   help="run model-generated code (in the sandbox); refused without this flag")


def config_from_args(args: argparse.Namespace) -> HumanEvalConfig:
    """Build (and validate) the config; errors are EvalError with the field, value and a fix."""
    return HumanEvalConfig(
        limit=args.limit,
        task_ids=tuple(t.strip() for t in args.task_ids.split(",")) if args.task_ids else None,
        ks=tuple(int(k) for k in str(args.k).split(",")),
        generation=GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                    n_samples=args.n, temperature=args.temperature, top_p=args.top_p),
        sandbox=SandboxConfig(wall_seconds=args.timeout, workers=args.workers),
        allow_execution=args.allow_code_execution,
        dtype=getattr(args, "dtype", "auto"),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="HumanEval pass@k of a model, executed in the sandbox")
    ap.add_argument("--model", required=True, help="embedded name, HF dir, artifact dir or .gguf")
    ap.add_argument("--out", type=Path, required=True, help="artifact dir to write (atomically)")
    add_humaneval_args(ap)
    args = ap.parse_args(argv)
    metrics = humaneval_to_dir(args.model, config_from_args(args), args.out)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
