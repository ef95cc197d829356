"""Baseline figures of the embedded models: size, held-out ppl, forward time, load time (GGUF vs cache).

Run: .venv/bin/python bench/baseline.py [--models smollm2-135m qwen2.5-coder-0.5b]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from common import PPL_PROTOCOL, median_seconds, write_results  # noqa: I001  (bench/ is on sys.path)

from evaluation import perplexity
from sources import code_split, load_model


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, non-embedding parameters: without input embedding and LM head)."""
    total = sum(p.numel() for p in model.parameters())
    emb = {id(p) for p in model.get_input_embeddings().parameters()}
    emb |= {id(p) for p in model.get_output_embeddings().parameters()}
    emb_n = sum(p.numel() for p in model.parameters() if id(p) in emb)
    return total, total - emb_n


def measure(name: str, split) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="lord-baseline-"))
    try:
        t0 = time.perf_counter()
        load_model(name, cache_dir=tmp)  # GGUF assembly + dequantization + safetensors write
        gguf_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        model, tok = load_model(name, cache_dir=tmp)
        cached_seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total, non_emb = count_params(model)
    res = perplexity(model, tok, split.heldout, **PPL_PROTOCOL)
    ids = torch.randint(0, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fwd = median_seconds(lambda: model(ids, use_cache=False), repeats=3)
    rec = {"model": name, "variant": "dense", "params": total, "non_embedding_params": non_emb,
           "ppl": round(res.ppl, 4), "bits_per_byte": round(res.bits_per_byte, 4), "n_tokens": res.n_tokens,
           "ppl_seconds": round(res.seconds, 2), "forward_seconds_per_512_tokens": round(fwd, 3),
           "load_gguf_seconds": round(gguf_seconds, 2), "load_cached_seconds": round(cached_seconds, 2),
           "load_ratio_gguf_over_cached": round(gguf_seconds / cached_seconds, 1)}
    print(rec)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    args = ap.parse_args()
    split = code_split()
    records = [measure(m, split) for m in args.models]
    write_results("baseline", {"heldout": "stdlib top-level *.py, path-hash split 25% held out",
                               "split_digest": split.digest, **PPL_PROTOCOL, "bos": False,
                               "note": "embedded weights were Q4-Q8 GGUF before we got them; dense = dequantized float32"},
                  records)


if __name__ == "__main__":
    main()
