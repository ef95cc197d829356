"""Batched code completion for HumanEval-style prompts: greedy or sampled, resumable.

Base-model completion as in Codex (Chen et al. 2021, sec. 2.3) and bigcode-evaluation-harness: no chat
template, the prompt is the function signature + docstring, generation stops at a top-level
``def/class/if/print/#`` line. Our own decode loop over the model's KV cache (not ``generate``): prompts are
sorted by length and left-padded so one cache serves the whole batch, and a row that finishes leaves the
batch at once (``generate`` keeps computing finished rows until the longest one stops). The checkpoint's own
generation config (Qwen's: sampling, repetition penalty) never leaks into a benchmark decode.
Each finished batch is appended to a JSONL file (flushed, fsynced), so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from .errors import EvalError

# Codex's stop sequences (Chen et al. 2021, sec. 2.3), as used by bigcode-evaluation-harness for HumanEval.
STOP_SEQUENCES: tuple[str, ...] = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")


@dataclass(frozen=True)
class GenerationConfig:
    """``temperature == 0`` means greedy (one sample per problem); otherwise nucleus sampling."""

    max_new_tokens: int = 384
    batch_size: int = 8
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int = 0
    stop_sequences: tuple[str, ...] = STOP_SEQUENCES
    strip_prompt: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_sequences", tuple(self.stop_sequences))
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise EvalError(f"max_new_tokens={self.max_new_tokens!r}; expected an int >= 1 (384 fits HumanEval)")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise EvalError(f"batch_size={self.batch_size!r}; expected an int >= 1")
        if not (isinstance(self.n_samples, int) and self.n_samples >= 1):
            raise EvalError(f"n_samples={self.n_samples!r}; expected an int >= 1")
        if not 0.0 <= self.temperature <= 5.0:
            raise EvalError(f"temperature={self.temperature}; expected 0 (greedy) or in (0, 5]")
        if self.temperature == 0.0 and self.n_samples != 1:
            raise EvalError(f"greedy decoding (temperature=0) with n_samples={self.n_samples} repeats one answer; "
                            f"use n_samples=1, or temperature > 0 (e.g. 0.8) for pass@k with k > 1")
        if not 0.0 < self.top_p <= 1.0:
            raise EvalError(f"top_p={self.top_p}; expected in (0, 1]")
        if not all(isinstance(s, str) and s for s in self.stop_sequences):
            raise EvalError(f"stop_sequences={self.stop_sequences!r}; expected non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """Cut ``text`` at the earliest stop sequence (the stop itself is dropped)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def generate_completions(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: dict[str, str],
    cfg: GenerationConfig,
    out_jsonl: Path | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Complete every prompt ``cfg.n_samples`` times; returns records sorted by (task_id order, sample).

    Record: ``task_id, sample, completion, n_new_tokens, finish ("stop"|"eos"|"length"), seconds``.
    With ``out_jsonl``, records already there are kept and only missing (task, sample) pairs are generated.
    """
    done = read_jsonl(out_jsonl) if out_jsonl is not None else []
    have = {(r["task_id"], r["sample"]) for r in done}
    order = {t: i for i, t in enumerate(prompts)}
    todo = [(t, s) for t in prompts for s in range(cfg.n_samples) if (t, s) not in have]
    texts = {t: (p.rstrip() if cfg.strip_prompt else p) for t, p in prompts.items()}
    lengths = {t: len(tokenizer(texts[t])["input_ids"]) for t in {t for t, _ in todo}}
    todo.sort(key=lambda ts: (-lengths[ts[0]], order[ts[0]], ts[1]))  # longest first: OOM shows at once
    records = [r for r in done if r["task_id"] in prompts]
    bar = tqdm(total=len(todo), desc="humaneval generate", disable=not progress, unit="completion")
    for b in range(0, len(todo), cfg.batch_size):
        batch = todo[b : b + cfg.batch_size]
        new = _generate_batch(model, tokenizer, [texts[t] for t, _ in batch], cfg, seed=cfg.seed + b)
        rows = [{"task_id": t, "sample": s, **g} for (t, s), g in zip(batch, new, strict=True)]
        if out_jsonl is not None:
            append_jsonl(out_jsonl, rows)
        records.extend(rows)
        bar.update(len(batch))
    bar.close()
    return sorted(records, key=lambda r: (order[r["task_id"]], r["sample"]))


@torch.inference_mode()
def _generate_batch(model: torch.nn.Module, tok: Any, texts: list[str], cfg: GenerationConfig,
                    seed: int) -> list[dict[str, Any]]:
    """Decode one left-padded batch with a KV cache; a row leaves the batch the step it finishes.

    Each step feeds one token per *unfinished* row: finished rows are dropped from the inputs and the cache
    (``DynamicCache.batch_select_indices``), so a batch gets cheaper as it empties instead of padding on to
    the longest row. Positions come from the attention mask (as ``generate`` does), so left padding changes
    no row's greedy text. A row stops at EOS, at a stop sequence (checked on its last few tokens only: no
    quadratic re-decoding), or at ``max_new_tokens``.
    """
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    device = next(model.parameters()).device
    ids, attention = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    eos = set(_eos_ids(model, tok))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t0 = time.perf_counter()
    cache = DynamicCache(config=model.config)
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    logits = _forward(model, ids, attention, positions, cache, last_only=True)
    next_pos = positions[:, -1] + 1
    rows = list(range(len(texts)))  # original row index of each live batch row
    tokens: list[list[int]] = [[] for _ in texts]
    finish: dict[int, str] = {}
    for step in range(cfg.max_new_tokens):
        chosen = _pick(logits, cfg, gen).tolist()
        keep = []
        for b, (row, t) in enumerate(zip(rows, chosen, strict=True)):
            tokens[row].append(t)
            if t in eos:
                finish[row] = "eos"
            elif any(stop in tok.decode(tokens[row][-_STOP_TAIL_TOKENS:]) for stop in cfg.stop_sequences):
                finish[row] = "stop"
            elif step + 1 == cfg.max_new_tokens:
                finish[row] = "length"
            else:
                keep.append(b)
        if not keep:
            break
        step_ids = torch.tensor([chosen[b] for b in keep], device=device).unsqueeze(1)
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            attention, next_pos = attention[index], next_pos[index]
            rows = [rows[b] for b in keep]
        attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=1)
        logits = _forward(model, step_ids, attention, next_pos.unsqueeze(1), cache)
        next_pos = next_pos + 1
    seconds = time.perf_counter() - t0
    results = []
    for row in range(len(texts)):
        text = tok.decode(tokens[row], skip_special_tokens=True)
        completion = truncate_at_stop(text, cfg.stop_sequences)
        results.append({"completion": completion, "n_new_tokens": len(tokens[row]),
                        "finish": "stop" if completion != text else finish.get(row, "length"),
                        "seconds": seconds / len(texts)})
    return results


# a stop sequence is a few characters, so the last few tokens of a row are enough to see it appear
_STOP_TAIL_TOKENS = 12


def _forward(model: torch.nn.Module, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
             cache: DynamicCache, last_only: bool = False) -> torch.Tensor:
    """Next-token logits (float32) of the last position of every row; the head runs on that position only."""
    kwargs = {"logits_to_keep": 1} if last_only else {}
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, cache=cache,
                use_cache=True, **kwargs)
    return out.logits[:, -1].float()


def _pick(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator) -> torch.Tensor:
    """Greedy argmax, or nucleus sampling (Holtzman et al. 2020) at ``cfg.temperature`` / ``cfg.top_p``."""
    if cfg.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


def _row_length(row: list[int], eos: list[int]) -> tuple[int, str]:
    """Generated tokens of a row not stopped by a stop sequence: up to and including its first EOS."""
    for i, t in enumerate(row):
        if t in eos:
            return i + 1, "eos"
    return len(row), "length"


def _eos_ids(model: torch.nn.Module, tok: Any) -> list[int]:
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (tok.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])):
        if e is not None and e not in ids:
            ids.append(int(e))
    if not ids:
        raise EvalError("the tokenizer has no eos_token_id and the model's generation_config names none; "
                        "set tokenizer.eos_token before generating")
    return ids


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (killed mid-write) is cut off so appends stay valid."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    good = data[: data.rfind(b"\n") + 1]
    if len(good) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(good))
    records = []
    for n, line in enumerate(good.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise EvalError(f"{path}:{n} is not valid JSON ({e}); delete the file to start over") from e
    return records


def append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
