"""Vocabulary trimming on the embedded models: parameters and bytes removed vs held-out code bits per byte,
token-count growth, round-trip failures, and forward / generation speed, each trimmed model against its
untrimmed original in the same process.

Token use is counted on the calibration split; everything measured here is on the held-out split (or a
mixed-text battery), never seen by the count. Bits per byte, not perplexity: trimming changes the
tokenization, so per-token figures do not compare. Each trim goes through the real stage path
(``write_trimmed`` into an atomic dir) and is reloaded with ``sources.load_model`` before it is measured.

    OMP_NUM_THREADS=2 flock /tmp/lord-heavy.lock python bench/vocab.py [--models smollm2-135m] [--keeps 16384]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, write_results  # noqa: E402
from evaluation.perplexity import PerplexityConfig, perplexity  # noqa: E402
from sources import code_split, load_model, token_stream  # noqa: E402
from sources.models import weights_bytes  # noqa: E402
from vocab import (  # noqa: E402
    VocabConfig,
    battery,
    plan_tokens,
    read_bpe,
    roundtrip_failures,
    save_trimmed_tokenizer,
    write_trimmed,
)
from vocab.count import count_token_use  # noqa: E402

KEEPS = {"qwen2.5-coder-0.5b": (16384, 32768, 65536), "smollm2-135m": (8192, 16384, 24576)}
WINDOWS = {"smollm2-135m": 8, "qwen2.5-coder-0.5b": 4}
SEQ_LEN = 512
FORWARD_LEN = 256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(KEEPS))
    ap.add_argument("--keeps", nargs="+", type=int, help="override the keep sizes for every model")
    ap.add_argument("--windows", type=int, help="held-out windows of 512 tokens (default per model)")
    ap.add_argument("--battery", type=int, default=1000, help="random texts in the round-trip battery")
    ap.add_argument("--tokenizer-only", action="store_true",
                    help="no weights loaded: token growth, round trip, parameters from the checkpoint's shapes")
    args = ap.parse_args()
    split = code_split()
    texts = battery(n_random=args.battery, seed=7)
    records: list[dict[str, Any]] = []
    for name in args.models:  # results written after each model, so a cut-short run keeps what it measured
        keeps = args.keeps or KEEPS[name]
        records += (bench_tokenizer(name, keeps, split, texts) if args.tokenizer_only
                    else bench_model(name, keeps, args.windows or WINDOWS[name], split, texts))
        _write(args, records, texts)


def _write(args: argparse.Namespace, records: list[dict[str, Any]], texts: list[str]) -> None:
    """Write the envelope; records of models this run has not (yet) measured are carried over from the
    previous results file (e.g. a tokenizer-only run), marked by their own ``measured`` field."""
    done = {r["model"] for r in records}
    previous = RESULTS / "vocab.json"
    carried = [r for r in json.loads(previous.read_text())["records"] if r["model"] not in done] \
        if previous.is_file() else []
    write_results("vocab", {
        "count_corpus": "calibration split of the CPython stdlib (sources.corpus.code_split)",
        "heldout": f"held-out split, {SEQ_LEN}-token disjoint windows (evaluation.perplexity), bits per byte",
        "token_growth": "tokens of the whole held-out split, trimmed / original - 1",
        "roundtrip_battery": f"{len(texts)} texts (code, emoji, CJK, RTL, combining, controls, random code points "
                             f"and bytes); failure = trimmed decode(encode(t)) != original's",
        "speed": f"middle keep setting only; forward: 1 x {FORWARD_LEN} tokens, median of 3 alternated with the original; generation: "
                 "greedy, 32 new tokens after a 19-token code prompt, median of 3 alternated",
        "windows": {m: args.windows or WINDOWS[m] for m in args.models},
    }, records + carried)


def bench_model(name: str, keeps: tuple[int, ...], windows: int, split: Any, texts: list[str]) -> list[dict]:
    t0 = time.perf_counter()
    model, tok = load_model(name)
    print(f"{name}: loaded in {time.perf_counter() - t0:.1f}s, dtype {next(model.parameters()).dtype}")
    bpe = read_bpe(tok)
    t0 = time.perf_counter()
    counts = count_token_use(tok, split.calibration, bpe.n_ids)
    print(f"{name}: counted {sum(counts):,} calibration tokens ({sum(c > 0 for c in counts):,} distinct ids) "
          f"in {time.perf_counter() - t0:.1f}s")
    pcfg = PerplexityConfig(seq_len=SEQ_LEN, n_windows=windows)
    base = perplexity(model, tok, split.heldout, pcfg, progress=False)
    heldout_tokens = token_stream(tok, split.heldout).numel()
    params = sum(p.numel() for p in model.parameters())
    base_mb = weights_bytes(_model_dir(name)) / 2**20
    print(f"{name}: original {params / 1e6:.1f}M params, bits/byte {base.bits_per_byte:.4f} "
          f"({base.n_tokens} tokens), held-out stream {heldout_tokens:,} tokens")
    records = [{"model": name, "variant": "original", "vocab": len(tok), "params": params, "size_mb": base_mb,
                "bits_per_byte": base.bits_per_byte, "n_tokens_scored": base.n_tokens,
                "heldout_tokens": heldout_tokens, "tied": _tied(model)}]
    for i, keep in enumerate(keeps):  # speed on the middle setting only (heavy-lock budget)
        records.append(_one_setting(name, model, tok, bpe, counts, keep, pcfg, split, texts, base, heldout_tokens,
                                    params, base_mb, speed=i == len(keeps) // 2))
    del model
    gc.collect()
    return records


def bench_tokenizer(name: str, keeps: tuple[int, ...], split: Any, texts: list[str]) -> list[dict]:
    """The tokenizer half of the benchmark, without loading weights: parameters removed follow from the
    checkpoint's tensor shapes (rows removed x hidden size, once if tied, twice if not)."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    where = _model_dir(name)
    tok = AutoTokenizer.from_pretrained(where)
    cfg = json.loads((where / "config.json").read_text())
    params = 0
    for f in where.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            params += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    bpe = read_bpe(tok)
    counts = count_token_use(tok, split.calibration, bpe.n_ids)
    heldout_tokens = token_stream(tok, split.heldout).numel()
    tied = bool(cfg.get("tie_word_embeddings"))
    records = [{"model": name, "variant": "original", "vocab": len(tok), "params": params, "tied": tied,
                "heldout_tokens": heldout_tokens, "measured": "tokenizer only"}]
    for keep in keeps:
        kept = plan_tokens(bpe, tok, counts, VocabConfig(keep=keep))
        spec, old_to_new = bpe.restrict(kept)
        with tempfile.TemporaryDirectory() as d:
            stok = save_trimmed_tokenizer(tok, spec, old_to_new, Path(d))
        tokens = token_stream(stok, split.heldout).numel()
        failures = roundtrip_failures(stok, tok, texts)
        removed = (cfg["vocab_size"] - len(kept)) * cfg["hidden_size"] * (1 if tied else 2)
        rec = {"model": name, "variant": f"keep={keep}", "keep": keep, "vocab": len(stok), "tied": tied,
               "params": params - removed, "params_removed": removed, "param_reduction": removed / params,
               "heldout_tokens": tokens, "token_growth": tokens / heldout_tokens - 1,
               "calib_coverage": sum(counts[i] for i in kept) / sum(counts),
               "roundtrip_failures": len(failures), "roundtrip_texts": len(texts), "measured": "tokenizer only"}
        print(f"{name} keep={keep}: -{rec['param_reduction']:.1%} params ({removed / 1e6:.1f}M), token growth "
              f"{rec['token_growth']:+.2%}, round-trip failures {len(failures)}/{len(texts)}")
        records.append(rec)
    return records


def _one_setting(name, model, tok, bpe, counts, keep, pcfg, split, texts, base, heldout_tokens, params,
                 base_mb, speed: bool) -> dict[str, Any]:
    cfg = VocabConfig(keep=keep)
    kept = plan_tokens(bpe, tok, counts, cfg)
    out = Path(tempfile.mkdtemp(prefix=f"vocab-{name}-{keep}-"))
    try:
        t0 = time.perf_counter()
        trimmed = copy.deepcopy(model)
        metrics = write_trimmed(trimmed, tok, bpe, kept, counts, out / "m", source=name, cfg=cfg)
        trim_seconds = time.perf_counter() - t0
        del trimmed
        gc.collect()
        small, stok = load_model(out / "m")
        res = perplexity(small, stok, split.heldout, pcfg, progress=False)
        tokens = token_stream(stok, split.heldout).numel()
        failures = roundtrip_failures(stok, tok, texts)
        if speed:
            fwd_base, fwd_small = _alternate(partial(_forward, model), partial(_forward, small))
            gen_base, gen_small = _alternate(partial(_generate, model, tok), partial(_generate, small, stok))
        size_mb = weights_bytes(out / "m") / 2**20
        small_params = sum(p.numel() for p in small.parameters())
        rec = {
            "model": name, "variant": f"keep={keep}", "keep": keep, "vocab": len(stok), "params": small_params,
            "param_reduction": 1 - small_params / params, "params_removed": params - small_params,
            "size_mb": size_mb, "size_reduction": 1 - size_mb / base_mb, "tied": _tied(small),
            "bits_per_byte": res.bits_per_byte, "bits_per_byte_original": base.bits_per_byte,
            "bits_per_byte_increase": res.bits_per_byte / base.bits_per_byte - 1,
            "n_tokens_scored": res.n_tokens, "heldout_tokens": tokens,
            "token_growth": tokens / heldout_tokens - 1, "calib_coverage": metrics["corpus_coverage"],
            "roundtrip_failures": len(failures), "roundtrip_texts": len(texts),
            "trim_seconds": trim_seconds,
            "merges_after": metrics["merges_after"], "merges_before": metrics["merges_before"],
        }
        if speed:
            rec.update({"forward_tokens_per_s": FORWARD_LEN / fwd_small,
                        "forward_tokens_per_s_original": FORWARD_LEN / fwd_base, "forward_speedup": fwd_base / fwd_small,
                        "generate_tokens_per_s": 32 / gen_small, "generate_tokens_per_s_original": 32 / gen_base,
                        "generate_speedup": gen_base / gen_small})
        print(f"{name} keep={keep}: -{rec['param_reduction']:.1%} params ({rec['params_removed'] / 1e6:.1f}M), "
              f"bits/byte {res.bits_per_byte:.4f} ({rec['bits_per_byte_increase']:+.2%}), token growth "
              f"{rec['token_growth']:+.2%}, round-trip failures {len(failures)}/{len(texts)}, forward "
              f"{rec.get('forward_speedup', float('nan')):.2f}x, generate {rec.get('generate_speedup', float('nan')):.2f}x")
        if failures:
            rec["roundtrip_failure_examples"] = failures[:3]
        del small
        gc.collect()
        return rec
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _model_dir(name: str) -> Path:
    from sources import resolve_model_dir

    return Path(resolve_model_dir(name))


def _tied(model: torch.nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is not None and head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


_IDS = torch.randint(1000, 5000, (1, FORWARD_LEN), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _forward(model: torch.nn.Module) -> None:
    ids = _IDS.clamp_max(model.config.vocab_size - 1)
    model(input_ids=ids, use_cache=False)


@torch.no_grad()
def _generate(model: torch.nn.Module, tok: Any) -> None:
    prompt = tok("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", return_tensors="pt")
    model.generate(**prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)


def _alternate(a, b, repeats: int = 3) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b``, run alternately after one warm-up each (noisy shared CPU)."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, acc in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


if __name__ == "__main__":
    main()
