"""Batched code completion for HumanEval-style prompts: greedy or sampled, resumable.

Base-model completion as in Codex (Chen et al. 2021, sec. 2.3) and bigcode-evaluation-harness: no chat
template, the prompt is the function signature + docstring, generation stops at a top-level
``def/class/if/print/#`` line. Prompts are left-padded so every row's last prompt token sits at the same
position and the KV cache serves the whole batch; rows are grouped by prompt length to waste little padding.
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
import transformers
from tqdm.auto import tqdm

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


class StopOnSequences(transformers.StoppingCriteria):
    """Per-row stop: a row is done once its generated text contains a stop sequence (HF pads it after)."""

    def __init__(self, tokenizer: Any, prompt_len: int, stops: Sequence[str], tail_tokens: int = 12) -> None:
        self.tok, self.prompt_len, self.stops, self.tail = tokenizer, prompt_len, tuple(stops), tail_tokens
        self.done: torch.Tensor | None = None
        self.n_generated: dict[int, int] = {}  # row -> tokens generated when its stop sequence appeared

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        # a stop is a few characters, so decoding the last few generated tokens is enough to see it appear
        tails = self.tok.batch_decode(input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.tail):])
        for i, text in enumerate(tails):
            if not self.done[i] and any(s in text for s in self.stops):
                self.done[i] = True
                self.n_generated[i] = input_ids.shape[1] - self.prompt_len
        return self.done.clone()


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
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    device = next(model.parameters()).device
    input_ids, attention = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    prompt_len = input_ids.shape[1]
    eos = _eos_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    # A fresh GenerationConfig: the checkpoint's own (Qwen's instruct: sampling, repetition penalty 1.05)
    # must not leak into a benchmark decode.
    gen = transformers.GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, do_sample=not cfg.greedy, use_cache=True, num_beams=1,
        temperature=cfg.temperature if not cfg.greedy else None, top_p=cfg.top_p if not cfg.greedy else None,
        top_k=None, repetition_penalty=1.0, eos_token_id=eos, pad_token_id=pad,
    )
    stop = StopOnSequences(tok, prompt_len, cfg.stop_sequences)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen,
                         stopping_criteria=transformers.StoppingCriteriaList([stop]))
    seconds = time.perf_counter() - t0
    results = []
    for i, row in enumerate(out[:, prompt_len:].tolist()):
        n_new, finish = (stop.n_generated[i], "stop") if i in stop.n_generated else _row_length(row, eos)
        text = tok.decode(row[:n_new], skip_special_tokens=True)
        completion = truncate_at_stop(text, cfg.stop_sequences)
        if completion != text:
            finish = "stop"
        results.append({"completion": completion, "n_new_tokens": n_new, "finish": finish,
                        "seconds": seconds / len(texts)})
    return results


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
