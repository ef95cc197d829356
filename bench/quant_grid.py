"""GPTQ-4 options on a LoRD-factored checkpoint: the grid (min-max vs clipped to the lowest rounding error, ``mse``),
column order (``act_order``), symmetric or asymmetric grids (``sym``), calibration windows, group size and decoder
layers kept at 8 bits (``wide_layers``), each through the real stage and loader (``quantize_to_dir`` -> ``load_model``).
Every variant starts from the default preset's quantize settings with a symmetric grid in natural column order, so
``minmax`` stays the same baseline whatever the preset chooses.

Why: on the small model GPTQ-4 costs the LoRD checkpoint more than the dense one (issue 14 part 2), and the
default preset's final artifact is a GPTQ-4 checkpoint. Held-out ppl on the stdlib held-out split (never
calibrated on), 8 x 512 windows as the flow's evaluate stage; GPTQ calibration as the default preset's quantize
stage. Writes bench/results/quant_grid.json (records merged by base and variant).

Run on a flow's decompose artifact:
    OMP_NUM_THREADS=2 flock /tmp/lord-heavy.lock .venv/bin/python bench/quant_grid.py --base runs/decompose/<key>
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench.common import RESULTS, write_results  # noqa: E402

VARIANTS = {"minmax": {}, "mse": {"grid": "mse"}, "mse+act_order": {"grid": "mse", "act_order": True},
            "minmax+act_order": {"act_order": True}, "minmax+32seqs": {"n_seqs": 32},
            "minmax+g64": {"group_size": 64}, "minmax+wide2": {"wide_layers": (0, -1)},
            "minmax+wide4": {"wide_layers": (0, 1, -2, -1)}, "asym": {"sym": False},
            "asym+act_order": {"sym": False, "act_order": True},
            "asym+act_order+64x512": {"sym": False, "act_order": True, "n_seqs": 64, "seq_len": 512},
            "asym+act_order+v8": {"sym": False, "act_order": True, "wide_modules": ("self_attn.v_proj*",)},
            "asym+act_order+down8": {"sym": False, "act_order": True, "wide_modules": ("mlp.down_proj*",)},
            "asym+v8": {"sym": False, "wide_modules": ("self_attn.v_proj*",)},
            "asym+kv8": {"sym": False, "wide_modules": ("self_attn.k_proj*", "self_attn.v_proj*")},
            "asym+attn8": {"sym": False, "wide_modules": ("self_attn.*",)},
            "asym+kv8+g64": {"sym": False, "wide_modules": ("self_attn.k_proj*", "self_attn.v_proj*"), "group_size": 64}}


def main() -> None:
    from evaluation.perplexity import PerplexityConfig, perplexity
    from flows.presets import PRESETS
    from quant import QuantConfig, quantize_to_dir
    from sources import code_split, load_model

    preset = PRESETS["default"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, required=True, help="a LoRD checkpoint dir (a flow's runs/decompose/<key>)")
    ap.add_argument("--label", default=None, help="the base's name in the records (default: its rank plan)")
    ap.add_argument("--variants", nargs="+", default=["minmax", "mse"], choices=list(VARIANTS))
    ap.add_argument("--n-windows", type=int, default=preset["evaluate"]["n_windows"])
    args = ap.parse_args()

    quant_kw = {**preset["quantize"], "sym": True, "act_order": False}
    cfg_ppl = PerplexityConfig(seq_len=preset["evaluate"]["seq_len"], n_windows=args.n_windows, batch_size=4)
    files = code_split().heldout
    meta = json.loads((args.base / "metrics.json").read_text()) if (args.base / "metrics.json").exists() else {}
    label = args.label or f"lord {meta.get('plan', '?')} {meta.get('search_chosen', '')}".strip()

    def ppl_of(path: Path) -> float:
        model, tok = load_model(str(path))
        value = perplexity(model, tok, files, cfg_ppl).ppl
        del model
        gc.collect()
        return value

    old = RESULTS / "quant_grid.json"
    records = json.loads(old.read_text())["records"] if old.exists() else []
    ppl_float = ppl_of(args.base)
    print({"base": label, "ppl_float": ppl_float}, flush=True)
    for variant in args.variants:
        cfg = QuantConfig(bits=4, **{**quant_kw, **VARIANTS[variant]})
        with tempfile.TemporaryDirectory(prefix="quant-grid-") as tmp:
            out = Path(tmp) / "q"
            t0 = time.perf_counter()
            metrics = quantize_to_dir(str(args.base), cfg, out)
            seconds = time.perf_counter() - t0
            ppl = ppl_of(out)
            shutil.rmtree(out, ignore_errors=True)
        rec = {"base": label, "base_dir": str(args.base), "variant": variant, "bits": 4,
               "param_reduction": meta.get("param_reduction"), "ppl_float": round(ppl_float, 4),
               "ppl": round(ppl, 4), "ppl_ratio_vs_float": round(ppl / ppl_float, 4),
               "size_mb": round(metrics["size_mb"], 1), "quantize_seconds": round(seconds, 1),
               "config": cfg.to_dict()}
        print(rec, flush=True)
        records = [r for r in records if (r["base"], r["variant"]) != (label, variant)] + [rec]
        write_results("quant_grid", {"ppl": {**cfg_ppl.__dict__, "heldout": "stdlib held-out split"},
                                     "gptq": quant_kw, "variants": {k: VARIANTS[k] for k in VARIANTS}}, records)


if __name__ == "__main__":
    main()
