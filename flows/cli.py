"""The ``lord`` command: run the pipeline, serve it, compare runs, and front the library stages.

    lord run --preset smoke|default|full [--model M] [--reduction F] [--bits 8 4] [--no-finetune] ...
    lord serve [--stop]
    lord compare [--experiment NAME] [--last N]
    lord calibrate|decompose|quantize|finetune|eval MODEL --out DIR [--set field=value ...]

Prefect and MLflow are imported only by the subcommands that need them, so ``lord --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from flows.errors import FlowError
from flows.presets import PRESETS, STAGES, SUPPORTED_BITS

LIB_STAGES = {"calibrate": "calibrate", "decompose": "decompose", "quantize": "quantize",
              "finetune": "finetune", "eval": "evaluate"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FlowError as e:
        print(f"lord: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # library errors (LordError, QuantError, ...) carry their own fix
        if type(e).__name__.endswith("Error") and type(e).__module__.split(".")[0] in (
                "lord", "quant", "finetune", "evaluation", "sources", "artifacts"):
            print(f"lord: error: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        raise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lord", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the lord-pipeline flow locally and print the summary table")
    r.add_argument("--preset", choices=sorted(PRESETS), default="default")
    r.add_argument("--model", help="embedded name, hub id or local dir (default: the preset's)")
    r.add_argument("--reduction", type=_fraction, help="target parameter reduction of decompose, in (0, 1)")
    r.add_argument("--bits", type=int, nargs="+", choices=SUPPORTED_BITS, help="GPTQ widths, e.g. --bits 8 4")
    for stage in STAGES:
        r.add_argument(f"--no-{stage}", dest=stage, action="store_false", help=f"skip the {stage} stage")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override one stage config field, e.g. --set evaluate.humaneval_problems=5")
    r.add_argument("--runs-dir", default="runs")
    r.add_argument("--experiment", default="lord-pipeline")
    r.set_defaults(func=_cmd_run)

    s = sub.add_parser("serve", help="start (or --stop) local Prefect + MLflow servers and a worker")
    s.add_argument("--stop", action="store_true", help="stop the services started by `lord serve`")
    s.add_argument("--prefect-port", type=int)
    s.add_argument("--mlflow-port", type=int)
    s.add_argument("--no-deploy", dest="deploy", action="store_false", help="do not run `prefect deploy --all`")
    s.set_defaults(func=_cmd_serve)

    c = sub.add_parser("compare", help="MLflow pipeline runs side by side")
    c.add_argument("--experiment", default="lord-pipeline")
    c.add_argument("--last", type=int, default=4, help="how many recent runs (default 4)")
    c.add_argument("--runs", nargs="+", metavar="RUN_ID", help="explicit MLflow run ids instead of --last")
    c.set_defaults(func=_cmd_compare)

    for cmd, stage in LIB_STAGES.items():
        lp = sub.add_parser(cmd, help=f"run the {stage} stage once, without Prefect or MLflow")
        lp.add_argument("model", help="embedded name, hub id, local dir or artifact dir")
        lp.add_argument("--out", required=True, type=Path, help="output artifact dir (written atomically)")
        if stage == "decompose":
            lp.add_argument("--stats", type=Path, required=True, help="calibration stats (lord calibrate output)")
            lp.add_argument("--reduction", type=_fraction, help="target parameter reduction in (0, 1)")
        if stage == "quantize":
            lp.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4)
        lp.add_argument("--preset", choices=sorted(PRESETS), default="default", help="config defaults to start from")
        lp.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
        lp.set_defaults(func=_cmd_stage, stage=stage)
    return p


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected a fraction in (0, 1)") from e
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"{v} is outside (0, 1); e.g. 0.2 removes 20% of the parameters")
    return v


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: list[str], stage: str | None = None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise FlowError(f"--set {item!r}: expected FIELD=VALUE, e.g. --set evaluate.humaneval_problems=5.")
        if stage is None:
            st, dot, field = key.partition(".")
            if not dot or st not in STAGES:
                raise FlowError(f"--set {item!r}: expected STAGE.FIELD=VALUE with STAGE in {list(STAGES)}.")
        else:
            st, field = stage, key
        out.setdefault(st, {})[field] = _parse_value(value)
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from flows.pipeline import lord_pipeline
    from flows.summary import format_table

    result = lord_pipeline(
        preset=args.preset, model=args.model, reduction=args.reduction, bits=args.bits,
        calibrate=args.calibrate, decompose=args.decompose, quantize=args.quantize, finetune=args.finetune,
        evaluate=args.evaluate, overrides=parse_overrides(args.overrides) or None, runs_dir=args.runs_dir,
        experiment=args.experiment,
    )
    print()
    print(f"lord-pipeline ({result['preset']}, {result['model']})")
    print(format_table(result["rows"], ["variant", "params", "size_mb", "ppl", "ppl_increase", "pass_at_1"]))
    print()
    stages = [{"stage": s["label"], "status": "cached" if s["cached"] or s["reused"] else "computed",
               "seconds": s["seconds"], "dir": s["dir"]} for s in result["stages"]]
    print(format_table(stages))
    print()
    print(f"MLflow run {result['mlflow_run_id']}; browse with:\n  {_ui_command(result['tracking_uri'])}")
    print(f"compare runs: lord compare --experiment {args.experiment}")
    return 0


def _ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"


def _cmd_serve(args: argparse.Namespace) -> int:
    from flows import serve

    root = Path.cwd()
    if args.stop:
        stopped = serve.stop(root)
        print(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop")
        return 0
    state = serve.start(root, args.prefect_port, args.mlflow_port, deploy=args.deploy)
    print(serve.describe(state, root))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from flows.compare import compare_table

    print(compare_table(args.experiment, last=args.last, run_ids=args.runs))
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from flows.stages import STATS_FILE, build_config, run_stage

    stage = args.stage
    kwargs = dict(PRESETS[args.preset][stage])
    if stage == "decompose" and args.reduction is not None:
        kwargs["reduction"] = args.reduction
    if stage == "quantize":
        kwargs["bits"] = args.bits
    kwargs.update(parse_overrides(args.overrides, stage).get(stage, {}))
    cfg = build_config(stage, kwargs)
    inputs = {"model": args.model}
    if stage == "decompose":
        stats = args.stats / STATS_FILE if args.stats.is_dir() else args.stats
        if not stats.is_file():
            raise FlowError(f"--stats {args.stats}: no {STATS_FILE} there; run `lord calibrate MODEL --out DIR` first.")
        inputs["stats"] = str(stats)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    metrics = run_stage(stage, json.loads(json.dumps(cfg.to_dict(), default=str)), inputs, args.out)
    print(json.dumps(metrics, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
