"""Token-weighted perplexity of held-out code over fixed windows.

Protocol (fixed so numbers compare across runs): the held-out files are concatenated in sorted order and
tokenized without BOS; window i starts at ``i * stride`` and has ``seq_len`` tokens; in every window after
the first, only the last ``stride`` tokens are scored (the rest is context), as in the HF sliding-window
recipe. With ``stride == seq_len`` (default) windows are disjoint and every token after the first of a
window is scored. ppl = exp(sum NLL / n_scored); bits per byte = sum NLL / ln 2 / UTF-8 bytes scored.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from forward import token_nll
from sources.corpus import token_stream

from .errors import EvalError


@dataclass(frozen=True)
class PerplexityConfig:
    seq_len: int = 512
    n_windows: int = 64
    stride: int | None = None  # None: = seq_len (disjoint windows)
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise EvalError(f"perplexity seq_len={self.seq_len} must be >= 2")
        if self.n_windows < 1:
            raise EvalError(f"perplexity n_windows={self.n_windows} must be >= 1")
        if self.stride is not None and not 1 <= self.stride <= self.seq_len:
            raise EvalError(f"perplexity stride={self.stride} must be in [1, seq_len={self.seq_len}]")
        if self.batch_size < 1:
            raise EvalError(f"perplexity batch_size={self.batch_size} must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    n_tokens: int
    bits_per_byte: float
    seconds: float
    nll_sum: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def heldout_windows(tokenizer: Any, files: list[Path], cfg: PerplexityConfig) -> tuple[torch.Tensor, int]:
    """(windows [n, seq_len], stride) from the held-out stream; fails if the stream is too short."""
    stride = cfg.stride or cfg.seq_len
    need = cfg.seq_len + (cfg.n_windows - 1) * stride
    stream = token_stream(tokenizer, files, max_tokens=need)
    if stream.numel() < need:
        raise EvalError(f"held-out text has {stream.numel()} tokens, the protocol needs {need} "
                        f"({cfg.n_windows} windows x {cfg.seq_len}, stride {stride}); lower n_windows")
    windows = torch.stack([stream[i * stride:i * stride + cfg.seq_len] for i in range(cfg.n_windows)])
    return windows, stride


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer: Any, files: list[Path], cfg: PerplexityConfig | None = None,
               progress: bool = True, **overrides: Any) -> PerplexityResult:
    """Held-out perplexity of ``model`` on ``files`` under the fixed window protocol above."""
    cfg = cfg or PerplexityConfig(**overrides)
    windows, stride = heldout_windows(tokenizer, files, cfg)
    device = next(model.parameters()).device
    nll_sum, n_tokens, n_bytes = 0.0, 0, 0
    t0 = time.perf_counter()
    starts = range(0, windows.shape[0], cfg.batch_size)
    for b in tqdm(starts, desc="perplexity", unit="batch", disable=not progress):
        batch = windows[b:b + cfg.batch_size]
        logits = model(input_ids=batch.to(device), use_cache=False).logits
        nll = token_nll(logits, batch)  # [B, L-1]; position j predicts j+1
        for k in range(batch.shape[0]):
            first = 0 if b + k == 0 else cfg.seq_len - stride - 1  # score only the new tokens
            first = max(first, 0)
            nll_sum += nll[k, first:].double().sum().item()
            n_tokens += nll.shape[1] - first
            n_bytes += len(tokenizer.decode(batch[k, first + 1:].tolist()).encode("utf-8"))
    seconds = time.perf_counter() - t0
    return PerplexityResult(ppl=math.exp(nll_sum / n_tokens), n_tokens=n_tokens,
                            bits_per_byte=nll_sum / math.log(2) / max(n_bytes, 1), seconds=seconds,
                            nll_sum=nll_sum)
