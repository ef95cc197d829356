"""``lord decompose`` / ``lord calibrate`` without the pipeline (``python -m lord ...``).

flows/ owns the ``lord`` console script; it can mount these subcommands with ``add_commands(subparsers)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lord.config import CalibConfig, DecomposeConfig
from lord.decompose import METHODS
from lord.plans import PLANS
from lord.sequential import MODES
from lord.stats import STATISTICS


def add_commands(sub: argparse._SubParsersAction) -> None:
    cal = sub.add_parser("calibrate", help="collect per-group input Grams (stats.safetensors)")
    _calib_args(cal)
    cal.add_argument("--out", type=Path, required=True, help="stats file (.safetensors) or directory")
    cal.set_defaults(func=_calibrate)

    dec = sub.add_parser("decompose", help="factor a model with LoRD (or a baseline) into a checkpoint dir")
    _calib_args(dec)
    dec.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    dec.add_argument("--stats", type=Path, help="existing statistics (default: collect into <out>.stats/)")
    dec.add_argument("--method", choices=METHODS, default="lord")
    dec.add_argument("--plan", choices=tuple(PLANS), default="search")
    dec.add_argument("--reduction", type=float, default=0.1, help="whole-model parameter reduction in (0, 1)")
    dec.add_argument("--rank-reduction", type=float, help="uniform plan only: 1 - r/min(m, n) for every group")
    dec.add_argument("--damping", type=float, default=0.01, help="whitening damping (fraction of mean diag G)")
    dec.add_argument("--sensitivity", choices=("fisher", "probe"), default="fisher",
                     help="plan auto: how group sensitivity is measured (fisher: one backward pass)")
    dec.add_argument("--calibration", choices=("parallel", "sequential"), default="parallel",
                     help="sequential: layer by layer, each group fitted on the compressed model's inputs "
                          "toward the dense output (error compensation)")
    dec.add_argument("--sequential-mode", choices=MODES, default="compensate",
                     help="compensate: best candidate per group on held-out calibration tokens; stable: the same "
                          "without the ridge regressions; stats: LoRD on the compressed inputs")
    dec.add_argument("--skip-slow", action="store_true",
                     help="leave dense the groups that would save parameters but not time (near parity) and "
                          "re-plan the cut over the rest")
    dec.set_defaults(func=_decompose)


def _calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen2.5-coder-0.5b", help="embedded name, HF dir, .gguf or hub id")
    p.add_argument("--n-seqs", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--targets", nargs="+", default=["*"], help="group name globs, e.g. '*.mlp.*'")
    p.add_argument("--ignore", nargs="*", default=[])
    p.add_argument("--statistic", choices=STATISTICS, default="auto",
                   help="auto: output covariance for narrowing linears (cheaper); input: input Gram everywhere")


def _calib_cfg(a: argparse.Namespace) -> CalibConfig:
    return CalibConfig(n_seqs=a.n_seqs, seq_len=a.seq_len, seed=a.seed, targets=tuple(a.targets),
                       ignore=tuple(a.ignore), statistic=a.statistic)


def _calibrate(a: argparse.Namespace) -> dict:
    from lord.stages import collect_stats_to_file

    return collect_stats_to_file(a.model, a.out, _calib_cfg(a))


def _decompose(a: argparse.Namespace) -> dict:
    from lord.stages import collect_stats_to_file, decompose_to_dir

    cfg = DecomposeConfig(method=a.method, plan=a.plan, reduction=None if a.rank_reduction else a.reduction,
                          rank_reduction=a.rank_reduction, targets=tuple(a.targets), ignore=tuple(a.ignore),
                          damping=a.damping, sensitivity=a.sensitivity, calibration=a.calibration,
                          sequential_mode=a.sequential_mode, skip_slow=a.skip_slow)
    stats = a.stats
    if stats is None:
        stats = a.out.with_name(a.out.name + ".stats")
        collect_stats_to_file(a.model, stats, _calib_cfg(a))
    return decompose_to_dir(a.model, stats, cfg, a.out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="lord", description="LoRD low-rank decomposition of code LLMs")
    add_commands(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    print(json.dumps(args.func(args), indent=2, sort_keys=True, default=str))
