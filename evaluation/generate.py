"""Batched code completion for HumanEval-style prompts: greedy or sampled, resumable.

Base-model completion as in Codex (Chen et al. 2021, sec. 2.3) and bigcode-evaluation-harness: no chat
template, the prompt is the function signature + docstring, generation stops at a top-level
``def/class/if/print/#`` line. Prompts are queued longest first and decoded by evaluation/decode.py
(continuous batching over a KV cache: a finished row leaves the batch and the next prompt takes its slot);
the checkpoint's own generation config (Qwen's: sampling, repetition penalty) never enters a benchmark
decode. Each finished completion is appended to a JSONL file (flushed, fsynced), so a killed run resumes
where it stopped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .decode import DecodeSpec, decode_stream
from .errors import EvalError

# Codex's stop sequences (Chen et al. 2021, sec. 2.3), as used by bigcode-evaluation-harness for HumanEval.
STOP_SEQUENCES: tuple[str, ...] = ("\ndef", "\nclass", "\nif", "\nprint", "\n#")


@dataclass(frozen=True)
class GenerationConfig:
    """``temperature == 0`` means greedy (one sample per problem); otherwise nucleus sampling.

    ``strip_prompt``: give the model the prompt without its trailing whitespace (True, bigcode-evaluation-harness's
    ``prompt.strip()``), as written (False), or ``"auto"``: whichever ends on the token boundary the tokenizer
    itself puts there in ``prompt + body`` (``prompt_text``). A HumanEval prompt ends with the docstring's quotes
    and a newline; Qwen tokenizes the newline apart from the body's indent, SmolLM2 merges them ("\n   "). Given
    the other form, the model continues a token sequence it never saw: a stripped prompt made the 0.5B Qwen coder
    answer ``\n\n\n`` and jump past the body, an empty completion (12 of the dense model's first 40, 40-46 of
    the LoRD + GPTQ-4 model's 164, greedy); the raw prompt made SmolLM2 do the same.
    """

    max_new_tokens: int = 384
    batch_size: int = 8
    n_samples: int = 1
    temperature: float = 0.0
    top_p: float = 0.95
    seed: int = 0
    stop_sequences: tuple[str, ...] = STOP_SEQUENCES
    strip_prompt: bool | str = "auto"

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
        if self.strip_prompt not in (True, False, "auto"):
            raise EvalError(f"strip_prompt={self.strip_prompt!r}; expected True, False or 'auto'")
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


# what follows a HumanEval prompt: a function body's first indented line
BODY_PROBE = "    pass\n"


def prompt_text(tokenizer: Any, prompt: str, strip: bool | str = "auto") -> str:
    """The text the model is given for ``prompt`` (see GenerationConfig.strip_prompt): with ``"auto"`` the raw
    prompt if its tokens are a prefix of the tokens of ``prompt + body`` (the tokenizer ends a token where the
    prompt ends), else the prompt without trailing whitespace (the tokenizer merges it into the body's first
    token, which the model then writes itself)."""
    stripped = prompt.rstrip()
    if strip != "auto" or stripped == prompt:
        return stripped if strip is True else prompt
    raw = tokenizer(prompt)["input_ids"]
    return prompt if tokenizer(prompt + BODY_PROBE)["input_ids"][:len(raw)] == raw else stripped


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
    texts = {t: prompt_text(tokenizer, prompts[t], cfg.strip_prompt) for t in {t for t, _ in todo}}
    lengths = {t: len(tokenizer(text)["input_ids"]) for t, text in texts.items()}
    todo.sort(key=lambda ts: (-lengths[ts[0]], order[ts[0]], ts[1]))  # longest first: OOM shows at once
    records = [r for r in done if r["task_id"] in prompts]
    bar = tqdm(total=len(todo), desc="humaneval generate", disable=not progress, unit="completion")

    def finished(i: int, new_tokens: list[int], finish: str, seconds: float) -> None:
        text = tokenizer.decode(new_tokens, skip_special_tokens=True)
        completion = truncate_at_stop(text, cfg.stop_sequences)
        row = {"task_id": todo[i][0], "sample": todo[i][1], "completion": completion,
               "n_new_tokens": len(new_tokens), "finish": "stop" if completion != text else finish,
               "seconds": seconds, "prompt_stripped": texts[todo[i][0]] != prompts[todo[i][0]]}
        if out_jsonl is not None:
            append_jsonl(out_jsonl, [row])  # one line per finished row: a killed run loses only live rows
        records.append(row)
        bar.update(1)

    spec = DecodeSpec(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, temperature=cfg.temperature,
                      top_p=cfg.top_p, seed=cfg.seed, stop_sequences=cfg.stop_sequences)
    decode_stream(model, tokenizer, [texts[t] for t, _ in todo], spec, set(_eos_ids(model, tokenizer)), finished)
    bar.close()
    return sorted(records, key=lambda r: (order[r["task_id"]], r["sample"]))


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
