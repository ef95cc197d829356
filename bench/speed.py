"""Inference speed of LoRD vs dense (the paper's speed figure): prefill time and KV-cache decode throughput.

For each embedded model and dtype, a dense model and factored copies at several rank reductions are timed in
one process, round-robin (every round times dense and each factored copy, in a rotated order) so machine noise
hits all of them; each figure is the median over the timed rounds after warm-ups. Factors come from a random
subspace (``down`` = random orthonormal rows, ``up = W down^T``): the same shapes and magnitudes as LoRD's
calibrated factors, hence the same time, without the calibration. Untouched tensors (embeddings, head, norms,
dense groups) are shared with the dense model, so several copies fit in memory.

* prefill: one forward of a [1, L] prompt into a fresh ``DynamicCache`` returning the next token's logits only
  (``logits_to_keep=1``, what ``generate`` does), L = 512 and 1024.
* decode: a [B, 32] prompt is prefilled (not timed), then ``steps`` single-token forwards with the cache are
  timed; tokens/s = B * steps / seconds, B = 1 and 8.

Run (heavy): OMP_NUM_THREADS=2 flock /tmp/lord-heavy.lock .venv/bin/python bench/speed.py
``--profile`` prints a torch.profiler table of dense vs factored (-20% of the linear parameters) instead.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import RESULTS, merge_records  # noqa: I001  (bench/ is on sys.path)

# bench/lord.py would shadow the lord package: drop bench/ from the path once common is imported
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
from transformers import DynamicCache  # noqa: E402

from flows.presets import PRESETS  # noqa: E402
from lord.model_ops import linear_params  # noqa: E402
from lord.modules import factored_modules  # noqa: E402
from lord.plans import rank_plan  # noqa: E402
from lord.ranks import plan_summary, round_down_ranks  # noqa: E402
from lord.speed import is_slow  # noqa: E402
from lord.surgery import Group, factor_group, find_groups, stacked_weight  # noqa: E402
from sources import load_model  # noqa: E402

MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b")
RANK_REDUCTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)  # the paper's axis: every group at r = (1 - rho) min(m, n)
LINEAR_REDUCTIONS = (0.2,)  # the target point: uniform plan at -20% of the linear parameters
# the default preset's LoRD share of all parameters (uniform plan). The preset applies it to the vocabulary-trimmed
# model (2.5% of 416.6M on the 0.5B), here to the untrimmed one (2.5% of 494.0M): slightly lower ranks, same groups
PRESET_REDUCTION = PRESETS["default"]["decompose"]["reduction"]
PRESET_SKIP_SLOW = PRESETS["default"]["decompose"].get("skip_slow", False)
PRESET_TARGETS = tuple(PRESETS["default"]["decompose"].get("targets", ("*",)))
DECODE_PROMPT = 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@torch.no_grad()
def factored_copy(dense: torch.nn.Module, groups: list[Group], ranks: dict[str, int | None],
                  seed: int = 0) -> torch.nn.Module:
    """A copy of ``dense`` with every ranked group factored by random-subspace factors; all other tensors are
    shared with ``dense`` (not copied)."""
    memo = {id(t): t for t in [*dense.parameters(), *dense.buffers()]}
    model = copy.deepcopy(dense, memo)
    gen = torch.Generator().manual_seed(seed)
    for g in groups:
        r = ranks.get(g.name)
        if r is None:
            continue
        w, _ = stacked_weight(model, g)
        down = torch.linalg.qr(torch.randn(g.n, r, generator=gen))[0].T.contiguous()  # r x n, orthonormal rows
        factor_group(model, g, w @ down.T, down)
    return model


def size_mb(model: torch.nn.Module) -> float:
    """Parameter bytes (tied tensors once) in MB: what the safetensors file holds."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6


def _new_cache(model: torch.nn.Module) -> DynamicCache:
    return DynamicCache(config=model.config)


@torch.inference_mode()
def prefill_seconds(model: torch.nn.Module, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, cache=_new_cache(model), use_cache=True, logits_to_keep=1)
    return time.perf_counter() - t0


@torch.inference_mode()
def decode_tokens_per_second(model: torch.nn.Module, prompt: torch.Tensor, steps: torch.Tensor) -> float:
    """``steps`` [B, S] fed one column at a time after prefilling ``prompt`` [B, P]; tokens/s of the S steps."""
    cache = _new_cache(model)
    model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
    t0 = time.perf_counter()
    for i in range(steps.shape[1]):
        model(input_ids=steps[:, i:i + 1], cache=cache, use_cache=True)
    return steps.numel() / (time.perf_counter() - t0)


def measure_once(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for length in (512, 1024):
        if f"prefill_{length}" in inputs:
            out[f"prefill_ms_{length}"] = 1e3 * prefill_seconds(model, inputs[f"prefill_{length}"])
    for b in (1, 8):
        out[f"decode_tokens_per_second_b{b}"] = decode_tokens_per_second(
            model, inputs[f"prompt_b{b}"], inputs[f"steps_b{b}"])
    return out


def make_inputs(vocab: int, decode_steps: int, prefill_lengths: tuple[int, ...], seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    def ids(*shape: int) -> torch.Tensor:
        return torch.randint(100, vocab - 100, shape, generator=gen)
    inputs = {f"prefill_{n}": ids(1, n) for n in prefill_lengths}
    for b in (1, 8):
        inputs[f"prompt_b{b}"] = ids(b, DECODE_PROMPT)
        inputs[f"steps_b{b}"] = ids(b, decode_steps)
    return inputs


def round_robin(models: dict[str, torch.nn.Module], inputs: dict, rounds: int, warmup: int,
                log: Callable[[str], None] = print) -> dict[str, dict[str, float]]:
    """Median of each figure over ``rounds`` timed rounds; each round visits every model, order rotated."""
    names = list(models)
    for name in names:  # warm-up: allocator, thread pool, page-in, on short inputs
        for _ in range(warmup):
            measure_once(models[name], {k: v[:, :64] if k.startswith("prefill") else v[:, :4]
                                        for k, v in inputs.items()})
    samples: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            samples[name].append(measure_once(models[name], inputs))
            log(f"  round {i} {name}: " + ", ".join(f"{k}={v:.1f}" for k, v in samples[name][-1].items()))
    return {n: {k: statistics.median(s[k] for s in ss) for k in ss[0]} for n, ss in samples.items()}


def configs(groups: list[Group], total: int, rank_reductions: tuple[float, ...],
            linear_reductions: tuple[float, ...], rank_multiple: int, preset: bool = True,
            preset_groups: list[Group] | None = None) -> dict[str, dict]:
    """Named rank maps: the paper's rank-reduction axis, the target linear reductions, the default preset (over
    all groups, and over ``preset_groups``: the ones its ``targets`` select)."""
    lin = sum(g.m * g.n for g in groups)  # every group is targeted here: = lord.model_ops.linear_params
    out = {}
    for rho in rank_reductions:
        out[f"rank_reduction={rho:g}"] = rank_plan(groups, total, "uniform", rank_reduction=rho)
    for p in linear_reductions:
        out[f"linear_reduction={p:g}"] = rank_plan(groups, total, "uniform", reduction=p * lin / total)
    if preset:
        out[f"preset_reduction={PRESET_REDUCTION:g}"] = rank_plan(groups, total, "uniform",
                                                                  reduction=PRESET_REDUCTION)
        if preset_groups is not None:  # what the preset runs: its targeted groups, the slow ones left dense
            ranks = rank_plan(preset_groups, total, "uniform", reduction=PRESET_REDUCTION, skip_slow=PRESET_SKIP_SLOW)
            out[f"preset_reduction={PRESET_REDUCTION:g},preset_groups"] = {g.name: ranks.get(g.name) for g in groups}
    if rank_multiple > 1:  # the target points again with every rank rounded down to the multiple
        out |= {f"{k},rank_multiple={rank_multiple}": round_down_ranks(groups, v, rank_multiple)
                for k, v in out.items() if k.startswith("linear_reduction")}
    return out


def bench_model(name: str, dtypes: list[str], args: argparse.Namespace, log: Callable[[str], None] = print
                ) -> list[dict]:
    dense, _ = load_model(name)
    groups = find_groups(dense)
    total = sum(p.numel() for p in dense.parameters())
    lin = linear_params(dense)
    own = PRESET_SKIP_SLOW or PRESET_TARGETS != ("*",)
    plans = configs(groups, total, tuple(args.rank_reductions), tuple(args.linear_reductions), args.rank_multiple,
                    args.preset, find_groups(dense, PRESET_TARGETS) if own else None)
    records = []
    for dname in dtypes:
        dense.to(DTYPES[dname])
        models = {"dense": dense}
        summaries = {}
        for label, ranks in plans.items():
            models[label] = factored_copy(dense, groups, ranks)
            summaries[label] = dict(plan_summary(groups, ranks, total, lin), n_groups_slow=sum(
                is_slow(g.m, g.n, ranks.get(g.name), len(g.members)) for g in groups))
        lengths = tuple(args.prefill_lengths_bf16 if dname == "bfloat16" else args.prefill_lengths)
        inputs = make_inputs(dense.config.vocab_size, args.decode_steps, lengths)
        log(f"{name} {dname}: {len(models)} models, prefill lengths {lengths}")
        t0 = time.perf_counter()
        medians = round_robin(models, inputs, args.rounds, args.warmup, log)
        log(f"{name} {dname}: {time.perf_counter() - t0:.0f} s")
        base = dict(medians["dense"], size_mb=size_mb(dense))
        for label, model in models.items():
            s = summaries.get(label, {"rank_reduction_mean": 0.0, "params_removed": 0, "n_groups_factored": 0,
                                      "n_groups_slow": 0})
            rec = {"model": name, "dtype": dname, "variant": "dense" if label == "dense" else "lord", "plan": label,
                   "rank_reduction": round(s["rank_reduction_mean"], 4),
                   "linear_param_reduction": round(s["params_removed"] / lin, 4),  # = plan_summary's
                   "param_reduction": round(s["params_removed"] / total, 4),
                   "n_groups_factored": s["n_groups_factored"], "n_groups_slow_modelled": s["n_groups_slow"],
                   "n_params": sum(p.numel() for p in model.parameters())}
            figures = dict(medians[label], size_mb=size_mb(model))
            rec.update({k: round(v, 3) for k, v in figures.items()})
            rec.update({f"{k}_ratio": round(figures[k] / v, 4) for k, v in base.items()})
            records.append(rec)
        del models
        gc.collect()
    del dense
    gc.collect()
    return records


def profile(name: str, dname: str, linear_reduction: float, rank_multiple: int) -> None:
    """torch.profiler op table (by input shape) for dense and factored prefill 512 and 8 decode steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    dense, _ = load_model(name)
    dense.to(DTYPES[dname])
    groups = find_groups(dense)
    total = sum(p.numel() for p in dense.parameters())
    ranks = rank_plan(groups, total, "uniform", reduction=linear_reduction * linear_params(dense) / total)
    if rank_multiple > 1:
        ranks = round_down_ranks(groups, ranks, rank_multiple)
    fact = factored_copy(dense, groups, ranks)
    print(f"factored groups {len(factored_modules(fact))} modules; ranks "
          f"{sorted({r for r in ranks.values() if r is not None})}")
    inputs = make_inputs(dense.config.vocab_size, 4, (128,))
    for label, model in (("dense", dense), ("lord", fact)):
        measure_once(model, {k: v[:, :16] if k.startswith("prefill") else v[:, :2] for k, v in inputs.items()})
        with tprofile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            prefill_seconds(model, inputs["prefill_128"])
        print(f"== {label} prefill 128\n" + prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=30, max_shapes_column_width=60))
        with tprofile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            decode_tokens_per_second(model, inputs["prompt_b1"], inputs["steps_b1"])
        print(f"== {label} decode b1 (prefill {DECODE_PROMPT} + 4 steps)\n" + prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=30, max_shapes_column_width=60))


def write_plot(records: list[dict], path: Path) -> Path:
    """Relative prefill time, decode time and size vs rank reduction (the paper's figure), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in records})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for dname, style in (("float32", "-"), ("bfloat16", "--")):
            rows = sorted((r for r in records if r["model"] == model and r["dtype"] == dname
                           and r["variant"] == "lord"), key=lambda r: r["rank_reduction"])
            if not rows:
                continue
            x = [100 * r["rank_reduction"] for r in rows]  # mean over factored groups
            for key, label, color, inv in (("prefill_ms_512_ratio", "prefill 512", "C0", False),
                                           ("prefill_ms_1024_ratio", "prefill 1024", "C1", False),
                                           ("decode_tokens_per_second_b1_ratio", "decode b1", "C2", True),
                                           ("decode_tokens_per_second_b8_ratio", "decode b8", "C3", True),
                                           ("size_mb_ratio", "size", "k", False)):
                ys = [(1 / r[key] if inv else r[key]) if r.get(key) else None for r in rows]
                if any(y is not None for y in ys):
                    ax.plot(x, ys, style, color=color, marker="o", ms=3, label=f"{label} ({dname})")
        ax.axhline(1.0, color="grey", lw=0.6)
        ax.set_title(f"{model}: LoRD relative to dense")
        ax.set_xlabel("mean rank reduction of the factored groups (%)")
        ax.set_ylabel("relative time / size (dense = 1)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def log_mlflow(path_json: Path, png: Path, records: list[dict], uri: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("lord-bench")
    with mlflow.start_run(run_name="speed"):
        for r in records:
            prefix = f"{r['model']}/{r['dtype']}/{r['plan']}".replace("=", "_").replace(",", ":")
            mlflow.log_metrics({f"{prefix}/{k}": float(v) for k, v in r.items()
                                if isinstance(v, int | float) and not isinstance(v, bool)})
        mlflow.log_artifact(str(path_json))
        mlflow.log_artifact(str(png))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--rank-reductions", nargs="*", type=float, default=list(RANK_REDUCTIONS))
    ap.add_argument("--linear-reductions", nargs="*", type=float, default=list(LINEAR_REDUCTIONS))
    ap.add_argument("--rank-multiple", type=int, default=1, help="also time the target points with every rank rounded down to this multiple")
    ap.add_argument("--preset", action=argparse.BooleanOptionalAction, default=True,
                    help=f"time the default preset's LoRD point ({PRESET_REDUCTION:g} of all parameters, uniform)")
    ap.add_argument("--prefill-lengths", nargs="*", type=int, default=[512, 1024])
    ap.add_argument("--prefill-lengths-bf16", nargs="*", type=int, default=[512, 1024])
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--plot-only", action="store_true", help="redraw speed.png from speed.json")
    ap.add_argument("--mlflow-uri", default=f"sqlite:///{RESULTS.parent.parent / 'mlflow.db'}",
                    help="'' to skip MLflow logging")
    args = ap.parse_args()
    if args.profile:
        for m in args.models:
            for d in args.dtypes:
                profile(m, d, LINEAR_REDUCTIONS[0], args.rank_multiple)
        return
    if args.plot_only:
        write_plot(json.loads((RESULTS / "speed.json").read_text())["records"], RESULTS / "speed.png")
        return
    protocol = {
        "factors": "random subspace (down = random orthonormal rows, up = W down^T): LoRD's shapes, hence its time",
        "plans": "rank_reduction=rho: uniform r = round((1 - rho) min(m, n)), groups not below parity stay dense "
                 "(the paper's axis); linear_reduction=p: uniform parity-fraction plan removing p of the linear "
                 f"(factorable) parameters; preset_reduction={PRESET_REDUCTION}: the default preset's LoRD share of all "
                 "parameters (of the vocabulary-trimmed model there), uniform plan over all groups; ',preset_groups': "
                 "the same over the preset's own targets, with its skip_slow",
        "rank_multiple": args.rank_multiple,
        "prefill": "[1, L] prompt into a fresh DynamicCache, logits_to_keep=1 (as generate), ms",
        "decode": f"[B, {DECODE_PROMPT}] prompt prefilled untimed, then {args.decode_steps} single-token steps "
                  "with the KV cache timed; tokens/s = B * steps / s",
        "rounds": args.rounds, "warmup": f"{args.warmup} short pass(es) per model (64-token prefills, 4 steps)",
        "order": "round-robin over dense and every factored copy, rotated each round, one process; median of rounds",
        "ratio": "<figure>_ratio = LoRD / dense in the same run (ms ratio < 1 and tokens/s ratio > 1 = faster)",
        "size_mb": "parameter bytes in the dtype, tied tensors once",
        "prefill_lengths": {"float32": args.prefill_lengths, "bfloat16": args.prefill_lengths_bf16},
    }
    path = RESULTS / "speed.json"
    for m in args.models:  # written after each (model, dtype): a run stopped by a time limit keeps what it measured
        for d in args.dtypes:
            path = merge_records("speed", bench_model(m, [d], args), protocol, key=("model", "dtype", "plan"))
    records = json.loads(path.read_text())["records"]
    png = write_plot(records, RESULTS / "speed.png")
    if args.mlflow_uri:
        log_mlflow(path, png, records, args.mlflow_uri)


if __name__ == "__main__":
    main()
