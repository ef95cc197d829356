"""The ``lord`` command: run the pipeline, serve it, compare runs, and front the library stages.

    lord run --preset smoke|default|full [--model M] [--reduction F] [--bits 8 4] [--no-finetune] ...
    lord serve [--stop]
    lord compare [--experiment NAME] [--last N]
    lord sweep --reductions 0.1 0.2 --plans uniform auto --bits 4 8 [--workers 2 | --dask-address tcp://...]
    lord retrain --corpus DIR [--data FILE] [--max-ppl-ratio R]; lord models; lord promote NAME VERSION
    lord calibrate|decompose|quantize|finetune|eval --model M --out DIR [stage flags | --set FIELD=VALUE]
    lord vocab --model M --keep N|--coverage F [--corpus DIR] --out DIR

Prefect, MLflow and torch are imported only by the subcommands that need them, so ``lord --help`` is instant:
the library subcommands are parsed by a stub first and their full parsers (which import their packages) are
built only when one of them is chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from artifacts.errors import PipelineError
from flows.errors import FlowError
from flows.presets import OPTIONAL_STAGES, PRESETS, STAGES, SUPPORTED_BITS

# sources.compute.DTYPE_CHOICES, spelled here so the parser does not import torch (a test keeps them equal)
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
# Subcommands whose parsers import their library packages (torch): listed with their help, built on demand.
LIBRARY_COMMANDS = {
    "calibrate": "collect per-group input Grams (stats.safetensors)",
    "decompose": "factor a model with LoRD (or a baseline) into a checkpoint dir",
    "quantize": "GPTQ/RTN-quantize a model (or a LoRD checkpoint) into a dir",
    "vocab": "trim a byte-level BPE model's vocabulary to the tokens code uses",
    "finetune": "QLoRA-finetune a model (or a quantized/LoRD dir) into an adapter dir",
    "eval": "held-out perplexity (+ --humaneval pass@k in the sandbox) of a model",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, _ = _parser(full=False).parse_known_args(argv)
    if getattr(args, "command", None) in LIBRARY_COMMANDS:
        args = _parser(full=True).parse_args(argv)
    else:
        args = _parser(full=False).parse_args(argv)
    if getattr(args, "dtype", None):  # the process-wide compute dtype (sources/compute.py), for every stage
        from sources.compute import DTYPE_ENV

        os.environ[DTYPE_ENV] = args.dtype
    try:
        result = args.func(args)
        if isinstance(result, dict):  # library subcommands return their metrics
            print(json.dumps(result, indent=2, sort_keys=True, default=str))
            return 0
        return int(result or 0)
    except FlowError as e:
        print(f"lord: error: {e}", file=sys.stderr)
        return 2
    except PipelineError as e:  # library errors (LordError, QuantError, ...) carry their own fix
        print(f"lord: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def _parser(full: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lord", description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=argparse.SUPPRESS,
                   help="compute dtype of every forward (auto: bf16 where the CPU/GPU multiplies it natively, "
                        "else float32); artifacts keep their stored dtype")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the lord-pipeline flow locally and print the summary table")
    r.add_argument("--preset", choices=sorted(PRESETS), default="default")
    r.add_argument("--model", help="embedded name, hub id or local dir (default: the preset's)")
    r.add_argument("--reduction", type=_fraction, help="target parameter reduction of decompose, in (0, 1)")
    r.add_argument("--bits", type=int, nargs="+", choices=SUPPORTED_BITS, help="GPTQ widths, e.g. --bits 8 4")
    for stage in STAGES:
        if stage in OPTIONAL_STAGES:
            r.add_argument(f"--{stage}", action=argparse.BooleanOptionalAction, default=None,
                           help=f"run (or skip) the optional {stage} stage (default: as the preset says)")
        else:
            r.add_argument(f"--no-{stage}", dest=stage, action="store_false", help=f"skip the {stage} stage")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="override one stage config field, e.g. --set evaluate.humaneval_problems=5")
    r.add_argument("--dtype", choices=DTYPE_CHOICES, default=argparse.SUPPRESS,
                   help="compute dtype of every stage's forwards (default auto); same as `lord --dtype`")
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

    _scale_commands(sub)
    if full:
        _library_commands(sub)
    else:
        for name, text in LIBRARY_COMMANDS.items():
            stub = sub.add_parser(name, help=text, add_help=False)
            stub.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def _scale_commands(sub: argparse._SubParsersAction) -> None:
    """Sweeps on Dask, gated retraining and the Model Registry (flows/sweep.py, retrain.py, registry.py)."""
    w = sub.add_parser("sweep", help="a grid of reduction x plan x bits x vocab as one flow on a Dask cluster")
    w.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    w.add_argument("--model", help="embedded name, hub id or local dir (default: the preset's)")
    w.add_argument("--reductions", type=_fraction, nargs="+", default=[0.1], metavar="F")
    w.add_argument("--plans", nargs="+", default=["uniform"], help="rank plans (lord/plans.py PLANS)")
    w.add_argument("--bits", type=int, nargs="+", default=[4], choices=(0, *SUPPORTED_BITS),
                   help="GPTQ widths; 0 = the float LoRD model (no quantization)")
    w.add_argument("--vocab", choices=("off", "on", "both"), default="off", help="trim the vocabulary first")
    w.add_argument("--workers", type=int, default=2, help="local Dask workers, 1 thread each (0: run serially)")
    w.add_argument("--dask-address", help="use a running Dask scheduler, e.g. tcp://10.0.0.5:8786")
    w.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.FIELD=VALUE")
    w.add_argument("--runs-dir", default="runs", help="artifact cache; on a multi-machine cluster a shared path")
    w.add_argument("--experiment", default="lord-sweep")
    w.set_defaults(func=_cmd_sweep)

    t = sub.add_parser("retrain", help="pipeline on your corpus/data, register the model, gate the champion alias")
    t.add_argument("--preset", choices=sorted(PRESETS), default="full")
    t.add_argument("--model")
    t.add_argument("--corpus", help="directory of .py files (calibration + held-out split)")
    t.add_argument("--data", help="instruction JSONL for finetuning")
    t.add_argument("--reduction", type=_fraction)
    t.add_argument("--bits", type=int, nargs="+", choices=SUPPORTED_BITS)
    t.add_argument("--no-finetune", dest="finetune", action="store_false")
    t.add_argument("--max-ppl-ratio", type=float, default=1.0, help="gate: ppl <= champion's x this")
    t.add_argument("--min-pass1-delta", type=float, default=0.0, help="gate: pass@1 >= champion's + this")
    t.add_argument("--registered-model", help="registry name (default lord-<model>-<preset>)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.FIELD=VALUE")
    t.add_argument("--runs-dir", default="runs")
    t.add_argument("--experiment", default="lord-retrain")
    t.set_defaults(func=_cmd_retrain)

    m = sub.add_parser("models", help="registered models: versions, aliases, gate outcomes")
    m.add_argument("--name", help="one registered model (default: all)")
    m.set_defaults(func=_cmd_models)

    pr = sub.add_parser("promote", help="move an alias (default champion) to a model version by hand")
    pr.add_argument("name")
    pr.add_argument("version", type=_positive)
    pr.add_argument("--alias", default="champion")
    pr.set_defaults(func=_cmd_promote)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from flows.summary import format_table
    from flows.sweep import lord_sweep

    vocab = {"off": [False], "on": [True], "both": [False, True]}[args.vocab]
    result = lord_sweep(preset=args.preset, model=args.model, reductions=args.reductions, plans=args.plans,
                        bits=args.bits, vocab=vocab, overrides=parse_overrides(args.overrides) or None,
                        n_workers=args.workers, dask_address=args.dask_address, runs_dir=args.runs_dir,
                        experiment=args.experiment)
    print(format_table(result["rows"], ["variant", "n_params", "size_mb", "ppl", "ppl_increase", "pass_at_1",
                                        "stages_computed", "pareto_size_ppl", "pareto_params_pass1"]))
    print(f"\n{result['executor']}: shared stages {result['shared_seconds']:.1f} s, points "
          f"{result['points_seconds']:.1f} s, wall {result['wall_seconds']:.1f} s; MLflow run {result['mlflow_run_id']}")
    return 0


def _cmd_retrain(args: argparse.Namespace) -> int:
    from flows.retrain import lord_retrain

    r = lord_retrain(preset=args.preset, model=args.model, corpus=args.corpus, data=args.data,
                     reduction=args.reduction, bits=args.bits, finetune=args.finetune,
                     overrides=parse_overrides(args.overrides) or None, max_ppl_ratio=args.max_ppl_ratio,
                     min_pass_at_1_delta=args.min_pass1_delta, registered_model=args.registered_model,
                     runs_dir=args.runs_dir, experiment=args.experiment)
    print(f"{r['registered_model']} v{r['version']}: {'promoted to champion' if r['promoted'] else 'not promoted'}"
          f" ({r['reason']}); champion is v{r['champion']}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from flows.registry import list_models
    from flows.summary import format_table

    rows = list_models(args.name)
    print(format_table(rows) if rows else "no registered models (run `lord retrain` first)")
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from flows.registry import promote

    print(promote(args.name, str(args.version), args.alias))
    return 0


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
        **{stage: getattr(args, stage) for stage in STAGES}, overrides=parse_overrides(args.overrides) or None,
        runs_dir=args.runs_dir, experiment=args.experiment,
    )
    print()
    print(f"lord-pipeline ({result['preset']}, {result['model']})")
    print(format_table(result["rows"], ["variant", "params", "param_reduction", "size_mb", "ppl", "ppl_increase",
                                        "pass_at_1", "he_lost", "he_gained", "he_p"]))
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
    return (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {uri} "
            "--host 127.0.0.1 --port 5000 --workers 1")


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


def _library_commands(sub: argparse._SubParsersAction) -> None:
    """The stages without Prefect or MLflow: each package's own flags where it ships them (lord.cli,
    evaluation.humaneval_cli), else preset defaults + ``--set FIELD=VALUE`` onto the stage config."""
    from lord.cli import add_commands as add_lord_commands

    add_lord_commands(sub)  # lord calibrate, lord decompose

    q = sub.add_parser("quantize", help=LIBRARY_COMMANDS["quantize"])
    q.add_argument("--model", required=True, help="embedded name, HF dir or artifact dir")
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4)
    q.add_argument("--group-size", type=int, help="columns per grid; -1 = per output channel (default: preset's)")
    q.add_argument("--act-order", action="store_true", help="GPTQ in order of decreasing Hessian diagonal")
    q.add_argument("--outliers", type=float, metavar="THRESHOLD",
                   help="SpQR-style outliers: keep weights whose scaled error exceeds THRESHOLD in float (e.g. 0.2)")
    q.add_argument("--method", choices=("gptq", "rtn"), help="default gptq; rtn is the round-to-nearest baseline")
    q.add_argument("--preset", choices=sorted(PRESETS), default="default", help="config defaults to start from")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="any QuantConfig field, e.g. --set group_size=64 --set outlier_threshold=0.2")
    q.set_defaults(func=_cmd_quantize)

    v = sub.add_parser("vocab", help=LIBRARY_COMMANDS["vocab"])
    v.add_argument("--model", required=True, help="embedded name, HF dir or dense artifact dir")
    v.add_argument("--out", type=Path, required=True)
    size = v.add_mutually_exclusive_group(required=True)
    size.add_argument("--keep", type=_positive, help="vocabulary size after trimming (bytes/special tokens included)")
    size.add_argument("--coverage", type=float, help="keep the most used tokens covering this fraction, e.g. 0.999")
    v.add_argument("--corpus", help="directory of .py files to count token use on (default: calibration split)")
    v.add_argument("--packages", nargs="*", default=[], metavar="PKG",
                   help="installed packages whose code is counted too, e.g. numpy torch (see --package-kb)")
    v.add_argument("--package-kb", type=_positive, default=2048, help="KB of code counted per package")
    v.set_defaults(func=_cmd_vocab)

    f = sub.add_parser("finetune", help=LIBRARY_COMMANDS["finetune"])
    f.add_argument("--model", required=True)
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--data", help="instruction JSONL ({instruction, output} per line; default: built-in set)")
    f.add_argument("--steps", type=_positive, default=100)
    f.add_argument("--lora-r", type=_positive, default=16)
    f.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="any FinetuneConfig field, e.g. --set lr=1e-4")
    f.set_defaults(func=_cmd_finetune)

    e = sub.add_parser("eval", help=LIBRARY_COMMANDS["eval"])
    e.add_argument("--model", required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--seq-len", type=_positive, default=512)
    e.add_argument("--n-windows", type=_positive, default=16)
    e.add_argument("--no-ppl", dest="ppl", action="store_false", help="skip held-out perplexity")
    e.add_argument("--humaneval", action="store_true", help="also HumanEval pass@k (flags below) into OUT/humaneval")
    from evaluation.humaneval_cli import add_humaneval_args

    add_humaneval_args(e)
    e.set_defaults(func=_cmd_eval)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from e
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return v


def _cmd_quantize(args: argparse.Namespace) -> dict[str, Any]:
    from flows.stages import build_config
    from quant import quantize_to_dir

    flags = {"group_size": args.group_size, "outlier_threshold": args.outliers, "method": args.method,
             "act_order": True if args.act_order else None}
    kwargs = {**PRESETS[args.preset]["quantize"], "bits": args.bits,
              **{k: v for k, v in flags.items() if v is not None},
              **parse_overrides(args.overrides, "quantize").get("quantize", {})}
    return quantize_to_dir(args.model, build_config("quantize", kwargs), args.out)


def _cmd_vocab(args: argparse.Namespace) -> dict[str, Any]:
    from vocab import VocabConfig, trim_to_dir

    cfg = VocabConfig(keep=args.keep, coverage=args.coverage, corpus=args.corpus, packages=tuple(args.packages),
                      package_kb=args.package_kb)
    return trim_to_dir(args.model, cfg, args.out)


def _cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    from finetune.cli import run_finetune

    extra = parse_overrides(args.overrides, "finetune").get("finetune", {})
    # a --set of steps / lora_r wins over the flag's default (`--set steps=null`: bounded by budget_minutes alone)
    return run_finetune(args.model, args.out, data=args.data, **{"steps": args.steps, "lora_r": args.lora_r, **extra})


def _cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    if not (args.ppl or args.humaneval):
        raise FlowError("lord eval with --no-ppl and no --humaneval has nothing to do; drop --no-ppl or add --humaneval.")
    metrics: dict[str, Any] = {}
    if args.humaneval:  # validated (opt-in, limits) before the perplexity pass spends any time
        from evaluation.humaneval import humaneval_to_dir
        from evaluation.humaneval_cli import config_from_args

        he_cfg = config_from_args(args)
        if not he_cfg.allow_execution:
            raise FlowError("--humaneval runs model-generated code: add --allow-code-execution to opt in "
                            "(it runs in the sandbox), or drop --humaneval.")
    if args.ppl:
        from evaluation import EvalConfig, evaluate_to_dir

        metrics.update(evaluate_to_dir(args.model, EvalConfig(seq_len=args.seq_len, n_windows=args.n_windows),
                                       args.out / "ppl"))
    if args.humaneval:
        metrics.update(humaneval_to_dir(args.model, he_cfg, args.out / "humaneval"))
    return metrics


if __name__ == "__main__":
    sys.exit(main())
