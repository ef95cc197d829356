"""float32 vs bf16 compute on this machine: held-out perplexity of both embedded models on the same windows,
the calibration statistics' fidelity, and the speed of each stage's forwards, all in one run.

Run under the machine-wide lock:  OMP_NUM_THREADS=2 flock /tmp/lord-heavy.lock .venv/bin/python bench/precision.py

What ``auto`` picks here is recorded (sources/compute.py). On a CPU without AMX-BF16/AVX512-BF16 bf16 matmuls
are emulated and far slower than float32, so the windows are kept small (bf16 is timed once, float32 as the
median of 3): a ratio on identical tokens still shows whether bf16 changes the numbers, and the speed ratios
show what bf16 would cost or save per stage on this CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import median_seconds, write_results  # noqa: E402
from evaluation.perplexity import PerplexityConfig, perplexity  # noqa: E402
from lord.decompose import factorize, output_error  # noqa: E402
from lord.stats import collect_stats  # noqa: E402
from lord.surgery import find_groups  # noqa: E402
from sources import calibration_batches, code_split, load_model  # noqa: E402
from sources.compute import autocast, describe, dtype_name  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16)


def _timed(fn, dtype: torch.dtype) -> float:
    """float32: median of 3 after a warm-up; bf16 (slow when emulated): one warm call, one timed call."""
    return median_seconds(fn, repeats=3 if dtype == torch.float32 else 1, warmup=1)


def ppl_record(name: str, seq_len: int, n_windows: int) -> dict:
    split = code_split()
    cfg = PerplexityConfig(seq_len=seq_len, n_windows=n_windows, batch_size=n_windows)
    out: dict = {"model": name, "variant": "perplexity", "seq_len": seq_len, "n_windows": n_windows}
    for dt in DTYPES:
        model, tok = load_model(name, dtype=dt)
        t0 = time.perf_counter()
        res = perplexity(model, tok, split.heldout, cfg, progress=False)
        out[f"ppl_{dtype_name(dt)}"] = res.ppl
        out[f"seconds_{dtype_name(dt)}"] = time.perf_counter() - t0
        del model
    out["ppl_ratio"] = out["ppl_bfloat16"] / out["ppl_float32"]
    out["ratio_of"] = "bf16 / float32 ppl, same windows"
    out["bf16_speedup"] = out["seconds_float32"] / out["seconds_bfloat16"]
    print(out, flush=True)
    return out


def calibration_records(name: str, n_seqs: int, seq_len: int) -> list[dict]:
    """Calibration forwards in both dtypes: speed, Gram difference, and what bf16 Grams do to LoRD's error.

    The LoRD basis at half each group's width is solved from the bf16 Gram and scored on the float32 Gram
    (output error relative to the float32 solution's): 1.0 means the bf16 statistics lose nothing.
    """
    base, tok = load_model(name)
    ids = calibration_batches(tok, code_split().calibration, n_seqs=n_seqs, seq_len=seq_len, seed=0)
    groups = find_groups(base)
    stats, seconds = {}, {}
    for dt in DTYPES:
        model = load_model(name, dtype=dt)[0]
        t0 = time.perf_counter()
        stats[dt] = collect_stats(model, groups, ids, batch_size=n_seqs, progress=False, statistic="input")
        seconds[dt] = time.perf_counter() - t0
        del model
    gram_err, loss_ratio = [], []
    for g in groups:
        a, b = stats[torch.float32][g.name].gram.double(), stats[torch.bfloat16][g.name].gram.double()
        gram_err.append(float((a - b).norm() / a.norm()))
        w = torch.cat([base.get_submodule(m).weight.detach().double() for m in g.members])
        rank = max(1, min(w.shape) // 2)
        errs = []
        for gram in (a, b):
            up, down = factorize(w, gram, ("lord",))["lord"].factors(w, rank)
            errs.append(output_error(w, up @ down, a))
        loss_ratio.append(errs[1] / errs[0])
    rec = {"model": name, "variant": "calibration", "n_tokens": int(ids.numel()), "n_groups": len(groups),
           "seconds_float32": seconds[torch.float32], "seconds_bfloat16": seconds[torch.bfloat16],
           "bf16_speedup": seconds[torch.float32] / seconds[torch.bfloat16],
           "gram_rel_error_median": statistics.median(gram_err), "gram_rel_error_max": max(gram_err),
           "lord_output_error_ratio_median": statistics.median(loss_ratio),
           "lord_output_error_ratio_max": max(loss_ratio),
           "ratio_of": "LoRD output error (float32 Gram) of the basis from the bf16 Gram / from the float32 Gram, "
                       "rank = half each group's width"}
    print(rec, flush=True)
    return [rec]


def forward_records(name: str) -> list[dict]:
    """Speed of the other stages' forwards, float32 vs bf16, on identical inputs."""
    recs = []
    fp32, tok = load_model(name)
    bf16 = load_model(name, dtype=torch.bfloat16)[0]
    ids = calibration_batches(tok, code_split().calibration, n_seqs=4, seq_len=128, seed=1)
    hidden = fp32.config.hidden_size

    # GPTQ / search / sensitivity replay one decoder layer at a time on cached inputs
    def layer_call(model, dt):
        layer = model.model.layers[0]
        x = torch.randn(4, 128, hidden, dtype=dt)
        pos = torch.arange(128).unsqueeze(0).expand(4, -1)
        emb = model.model.rotary_emb(x, pos)
        return lambda: layer(x, position_embeddings=emb, attention_mask=None)

    times = {dt: _timed(layer_call(m, dt), dt) for dt, m in ((torch.float32, fp32), (torch.bfloat16, bf16))}
    recs.append({"model": name, "variant": "layer-forward (GPTQ/search replay)", "tokens": 512,
                 **_speed(times)})

    # QLoRA / recovery training: forward + backward of a float32 model under bf16 autocast, loss in float32
    def train_step(dt):
        def step():
            fp32.zero_grad(set_to_none=True)
            with autocast("cpu", dt):
                logits = fp32(input_ids=ids[:1]).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
            loss.backward()
        return step

    fp32.train()
    times = {dt: _timed(train_step(dt), dt) for dt in DTYPES}
    fp32.eval()
    fp32.zero_grad(set_to_none=True)
    recs.append({"model": name, "variant": "train-step (autocast, 1 x 128 tokens)", **_speed(times)})

    # generation: one decode step at batch 8 against a 128-token KV cache
    from transformers import DynamicCache

    def decode_step(model):
        with torch.inference_mode():
            cache = DynamicCache(config=model.config)
            model(input_ids=ids[:4].repeat(2, 1), cache=cache, use_cache=True, logits_to_keep=1)
            nxt = ids[:8, :1].repeat(2, 1)[:8]

        def step():
            with torch.inference_mode():
                model(input_ids=nxt, cache=cache, use_cache=True)
                cache.crop(-1)  # drop the step's token: every timed step sees the same 128-token cache
        return step

    times = {dt: _timed(decode_step(m), dt) for dt, m in ((torch.float32, fp32), (torch.bfloat16, bf16))}
    recs.append({"model": name, "variant": "decode-step (batch 8, 128-token cache)", **_speed(times)})
    for r in recs:
        print(r, flush=True)
    return recs


def _speed(times: dict) -> dict:
    return {"seconds_float32": times[torch.float32], "seconds_bfloat16": times[torch.bfloat16],
            "bf16_speedup": times[torch.float32] / times[torch.bfloat16],
            "ratio_of": "float32 seconds / bf16 seconds (> 1: bf16 faster)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", default="smollm2-135m")
    ap.add_argument("--large", default="qwen2.5-coder-0.5b")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    warnings.filterwarnings("ignore", message=".*emulated.*")
    protocol = {"heldout": "stdlib held-out split, first windows (evaluation.perplexity protocol)",
                "calibration": "stdlib calibration split, seed 0, input Grams (statistic='input')",
                "compute_policy": describe("cpu"),
                "note": "bf16 timed once (emulated here unless the CPU has AMX-BF16/AVX512-BF16), float32 median of 3"}
    records: list[dict] = []
    # written after every part, so a run stopped by its time limit still reports what it measured
    for part in (lambda: [ppl_record(args.small, 128, 2)], lambda: [ppl_record(args.large, 96, 1)],
                 lambda: calibration_records(args.small, 2, 128), lambda: forward_records(args.small)):
        records += part()
        write_results("precision", protocol, records)


if __name__ == "__main__":
    main()
