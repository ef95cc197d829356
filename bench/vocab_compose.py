"""Vocabulary trimming composed with LoRD, against LoRD alone at the same whole-model parameter reduction.

Both arms remove the same share of the *original* model's parameters: ``lord`` takes it all from the
factorable linears; ``vocab+lord`` first trims the vocabulary (``vocab.write_trimmed``, the stage's own path,
reloaded with ``sources.load_model``) and takes only the rest from the linears of the trimmed model. Same
calibration files (each arm tokenizes them with its own tokenizer), same uniform plan, one-shot LoRD.
Compared on held-out code bits per byte (token counts differ between the arms, so not ppl).

    OMP_NUM_THREADS=2 python bench/vocab_compose.py [--totals 0.2 0.25] [--keep 65536]
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lord  # noqa: E402
from bench.common import merge_records, one_shot_factors  # noqa: E402
from evaluation.perplexity import PerplexityConfig, perplexity  # noqa: E402
from lord.model_ops import linear_params  # noqa: E402
from sources import code_split, load_model  # noqa: E402
from vocab import VocabConfig, plan_tokens, read_bpe, write_trimmed  # noqa: E402
from vocab.count import count_token_use  # noqa: E402

KEY = ("model", "arm", "total_param_reduction")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--keep", type=int, default=65536)
    ap.add_argument("--totals", type=float, nargs="+", default=[0.2],
                    help="whole-model parameter reductions (of the original model) both arms reach")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens")
    ap.add_argument("--calib-seqs", type=int, default=16, help="calibration windows of 512 tokens")
    args = ap.parse_args()
    split = code_split()
    pcfg = PerplexityConfig(seq_len=512, n_windows=args.windows)
    protocol = {"vocab_compose": {
        "arms": "lord: LoRD alone; vocab+lord: vocab trim (keep) then LoRD on the trimmed model; both remove "
                "total_param_reduction of the original model's parameters",
        "plan": "uniform, one-shot (parallel) LoRD", "keep": args.keep, "split_digest": split.digest,
        "calibration": {"n_seqs": args.calib_seqs, "seq_len": 512, "seed": 0},
        "heldout": {"seq_len": 512, "n_windows": args.windows, "metric": "bits per byte"}}}

    dense, tok = load_model(args.model)
    p0 = lord.count_params(dense)
    base = perplexity(dense, tok, split.heldout, pcfg, progress=False).bits_per_byte
    print(f"dense: {p0:,} params, {base:.4f} bits/byte", flush=True)
    merge_records("vocab_compose", [{"model": args.model, "arm": "dense", "total_param_reduction": 0.0,
                                     "params": p0, "bits_per_byte": base}], protocol, key=KEY)
    lord_facts = _factors(dense, tok, split, args.calib_seqs)
    with tempfile.TemporaryDirectory(prefix="vocab-compose-") as d:
        bpe = read_bpe(tok)
        cfg = VocabConfig(keep=args.keep)
        counts = count_token_use(tok, split.calibration, bpe.n_ids)
        write_trimmed(dense, tok, bpe, plan_tokens(bpe, tok, counts, cfg), counts, Path(d) / "m",
                      source=args.model, cfg=cfg)  # trims ``dense`` in place: reload the original below
        del dense
        gc.collect()
        small, stok = load_model(Path(d) / "m")
        p1 = lord.count_params(small)
        vbase = perplexity(small, stok, split.heldout, pcfg, progress=False).bits_per_byte
        merge_records("vocab_compose", [_rec(args.model, "vocab", 1 - p1 / p0, p1, vbase, base)], protocol, key=KEY)
        print(f"vocab keep={args.keep}: -{1 - p1 / p0:.1%} params, {vbase:.4f} bits/byte", flush=True)
        small_facts = _factors(small, stok, split, args.calib_seqs)
        for total in args.totals:
            rest = (total * p0 - (p0 - p1)) / p1
            if rest <= 0:
                print(f"total {total:.0%}: the vocab trim alone removes more; skipped")
                continue
            rec = _cut(small, stok, small_facts, rest, split, pcfg)
            merge_records("vocab_compose", [_rec(args.model, "vocab+lord", total, rec["params"], rec["bpb"], base,
                                                 lord_reduction_of_trimmed=rest)], protocol, key=KEY)
        del small
        gc.collect()
    dense, tok = load_model(args.model)
    for total in args.totals:
        rec = _cut(dense, tok, lord_facts, total, split, pcfg)
        merge_records("vocab_compose", [_rec(args.model, "lord", total, rec["params"], rec["bpb"], base)],
                      protocol, key=KEY)


def _factors(model: Any, tok: Any, split: Any, n_seqs: int) -> dict:
    t0 = time.perf_counter()
    _, facts, _ = one_shot_factors(model, tok, split.calibration, n_seqs)
    print(f"statistics + factorization: {time.perf_counter() - t0:.0f} s", flush=True)
    return facts


def _cut(model: Any, tok: Any, facts: dict, reduction: float, split: Any, pcfg: PerplexityConfig) -> dict:
    """Held-out bits/byte of a copy of ``model`` cut by a uniform LoRD plan removing ``reduction`` of its
    parameters (``facts`` from ``_factors``, keyed by group name, so a reloaded model takes them too)."""
    groups = lord.find_groups(model)
    total, linear = lord.count_params(model), linear_params(model)
    ranks = lord.rank_plan(groups, total, "uniform", reduction)
    cut = copy.deepcopy(model)
    lord.apply_ranks(cut, groups, facts, ranks, total, linear)
    out = {"params": lord.count_params(cut), "bpb": perplexity(cut, tok, split.heldout, pcfg, progress=False).bits_per_byte}
    del cut
    gc.collect()
    return out


def _rec(model: str, arm: str, total: float, params: int, bpb: float, base: float, **extra: Any) -> dict:
    print(f"{arm} at -{total:.1%}: {params:,} params, {bpb:.4f} bits/byte ({bpb / base - 1:+.2%})", flush=True)
    return {"model": model, "arm": arm, "total_param_reduction": round(total, 4), "params": params,
            "bits_per_byte": bpb, "bits_per_byte_increase": bpb / base - 1, **extra}


if __name__ == "__main__":
    main()
