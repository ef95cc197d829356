"""KD recovery speed on a GPTQ base: each layer dequantized at every call vs one cached copy per layer.

The same distillation (make run's default finetune settings, a fixed step count, teacher targets cached by
content) runs in a fresh process per variant, alternated over ``--repeats``; the record says seconds per
optimizer step, peak memory, and the eval KL after the same steps (caching must not change the result beyond
bf16 rounding).

Run: flock /tmp/heavy.lock .venv/bin/python bench/kd_speed.py --base RUNS/quantize/KEY [--steps 4 --repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import write_results  # noqa: I001  (bench/ is on sys.path)

from finetune import FinetuneConfig, finetune_in_subprocess

VARIANTS = {"dequantize-per-call": False, "cached-base": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", required=True, help="a GPTQ artifact directory (e.g. make run's quantize stage)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    # make run's finetune settings (flows/presets.py default), bounded by steps instead of minutes
    common = dict(objective="kd", budget_minutes=None, steps=args.steps, kd_n_seqs=24, n_eval=4, max_seq_len=256,
                  micro_batch_size=2, grad_accum_steps=2, warmup_steps=0, eval_every=10**6, merge=False,
                  early_stop_patience=0)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="kd-speed-") as tmp:
        for rep in range(args.repeats):
            for variant, cache in VARIANTS.items():
                cfg = FinetuneConfig(**common, cache_base=cache)
                m = finetune_in_subprocess(args.base, cfg, Path(tmp) / f"{variant}-{rep}", threads=args.threads,
                                           progress=False)
                assert m["base_cached"] is cache, m["base_cached"]
                runs[variant].append(m)
                print(f"{variant} rep {rep}: {m['seconds_per_step']:.1f} s/step, peak {m['peak_rss_mb']:.0f} MB, "
                      f"eval KL {m['eval_loss_before']:.5f} -> {m['eval_loss_after']:.5f}")
    records = []
    for variant, ms in runs.items():
        records.append({"model": args.base, "variant": variant, "steps": args.steps,
                        "seconds_per_step": round(statistics.median(m["seconds_per_step"] for m in ms), 2),
                        "peak_rss_mb": round(statistics.median(m["peak_rss_mb"] for m in ms), 1),
                        "eval_loss_before": round(ms[0]["eval_loss_before"], 6),
                        "eval_loss_after": round(ms[0]["eval_loss_after"], 6),
                        "eval_loss_end": round(ms[0]["eval_history"][-1][1], 6),
                        "train_loss_last": round(ms[0]["train_loss_last"], 6)})
    slow, fast = records
    fast["speedup_ratio"] = round(slow["seconds_per_step"] / fast["seconds_per_step"], 2)
    fast["peak_rss_ratio"] = round(fast["peak_rss_mb"] / slow["peak_rss_mb"], 3)
    write_results("kd_speed", {"what": "KD optimizer steps on a GPTQ-4 base, cache_base off vs on",
                               "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
                               "micro_batch_size": 2, "grad_accum_steps": 2, "seq_len": 256,
                               "ratio_of": "seconds_per_step dequantize-per-call / cached-base"}, records)
    print(f"speedup {fast['speedup_ratio']}x, peak memory {fast['peak_rss_ratio']}x")


if __name__ == "__main__":
    main()
