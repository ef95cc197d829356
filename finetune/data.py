"""Instruction data for fine-tuning: validate a JSONL file, load it with `datasets`, tokenize with the
prompt masked out of the loss, split off a held-out slice, and batch.

Format: one JSON object per line with string fields ``instruction`` and ``output`` (extra fields ignored).
The loss covers only the answer tokens (+ EOS), as in instruction tuning (QLoRA paper, sec. 5: training
on the target only).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import FinetuneError

IGNORE = -100
MIN_ANSWER_TOKENS = 4


@dataclass(frozen=True)
class TokenizedSplit:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    n_truncated: int
    n_dropped: int


def validate_jsonl(path: Path) -> str:
    """Check every line of an instruction JSONL file; return the sha256 of its bytes.

    Raises FinetuneError naming the file and the first bad line, so a user can fix it by hand.
    """
    path = Path(path)
    if not path.is_file():
        raise FinetuneError(f"instruction data {path} does not exist; pass a JSONL file with "
                            f'{{"instruction": ..., "output": ...}} per line.')
    raw = path.read_bytes()
    n_ok = 0
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise FinetuneError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one object per line "
                                f'like {{"instruction": "...", "output": "..."}}.') from e
        if not isinstance(rec, dict):
            raise FinetuneError(f"{path}:{lineno}: got a JSON {type(rec).__name__}, expected an object with "
                                f"'instruction' and 'output'.")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                raise FinetuneError(f"{path}:{lineno}: field {key!r} is missing or not a non-empty string "
                                    f"(keys present: {sorted(rec)}); every line needs 'instruction' and 'output'.")
        n_ok += 1
    if n_ok == 0:
        raise FinetuneError(f"instruction data {path} is empty (no JSON lines); expected at least one "
                            f'{{"instruction": ..., "output": ...}} record.')
    return hashlib.sha256(raw).hexdigest()


def load_instructions(path: Path) -> list[dict[str, str]]:
    """Validate, then load with `datasets` (local JSON, no hub access)."""
    validate_jsonl(path)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    return [{"instruction": r["instruction"], "output": r["output"]} for r in ds]


def format_prompt(tokenizer: Any, instruction: str) -> str:
    """The chat template when the tokenizer has one (instruct models were tuned on it), else a plain one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                             tokenize=False, add_generation_prompt=True)
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def tokenize_split(records: list[dict[str, str]], tokenizer: Any, max_seq_len: int, n_eval: int,
                   seed: int) -> TokenizedSplit:
    """Shuffle deterministically, hold out ``n_eval`` examples, tokenize with the prompt masked."""
    if len(records) < n_eval + 1:
        raise FinetuneError(f"{len(records)} instruction examples but n_eval={n_eval}; need at least n_eval + 1 "
                            f"(lower n_eval or add data).")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FinetuneError(f"tokenizer {type(tokenizer).__name__} has no eos_token; set one so answers can end.")
    examples, n_trunc, n_drop = [], 0, 0
    for i in order:
        rec = records[i]
        prompt = tokenizer(format_prompt(tokenizer, rec["instruction"]), add_special_tokens=False)["input_ids"]
        answer = tokenizer(rec["output"], add_special_tokens=False)["input_ids"] + [eos]
        ids = (prompt + answer)[:max_seq_len]
        n_answer = len(ids) - len(prompt)
        if n_answer < MIN_ANSWER_TOKENS:
            n_drop += 1  # prompt alone fills the window: nothing to learn from
            continue
        n_trunc += len(prompt) + len(answer) > max_seq_len
        examples.append({"input_ids": ids, "labels": [IGNORE] * len(prompt) + ids[len(prompt):]})
    if len(examples) < n_eval + 1:
        raise FinetuneError(f"only {len(examples)} examples fit max_seq_len={max_seq_len} (dropped {n_drop} whose "
                            f"prompt fills the window); raise max_seq_len or lower n_eval={n_eval}.")
    return TokenizedSplit(train=examples[n_eval:], eval=examples[:n_eval], n_truncated=n_trunc, n_dropped=n_drop)


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked from attention and loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def n_target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that enter the (shifted) causal-LM loss: used to weight micro-batches exactly."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def micro_batches(examples: list[dict[str, list[int]]], size: int, pad_id: int, seed: int, epoch: int = 0):
    """One epoch of shuffled micro-batches (a new, seeded order every epoch)."""
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    for start in range(0, len(order), size):
        yield collate([examples[i] for i in order[start : start + size]], pad_id)
