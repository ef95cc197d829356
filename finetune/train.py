"""The training loop: gradient accumulation, warmup + cosine/linear schedule, periodic eval loss, early stop
on eval loss (restoring the best adapter), a progress bar, and a seeded, reproducible order."""

from __future__ import annotations

import itertools
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import FinetuneConfig
from .data import collate, micro_batches, n_target_tokens


@dataclass
class TrainResult:
    train_loss_first: float          # mean over the first optimizer step's micro-batches (before any update)
    train_loss_last: float           # mean over the last few optimizer steps
    eval_loss_before: float
    eval_loss_after: float           # of the adapter that is kept (the best one if early stopping kicked in)
    best_step: int
    steps_done: int
    stopped_early: bool
    seconds_per_step: float          # median over optimizer steps (the first one excluded when possible)
    step_losses: list[float] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def eval_loss(model: nn.Module, examples: list[dict[str, list[int]]], pad_id: int, batch_size: int) -> float:
    """Token-weighted mean answer loss over held-out examples (dropout off)."""
    was_training = model.training
    model.eval()
    total, n_tok = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        n = n_target_tokens(batch)
        total += float(model(**batch).loss) * n
        n_tok += n
    model.train(was_training)
    return total / max(n_tok, 1)


def train(model: nn.Module, train_examples: list[dict[str, list[int]]], eval_examples: list[dict[str, list[int]]],
          cfg: FinetuneConfig, pad_id: int, progress: bool = True) -> TrainResult:
    """Train the trainable (LoRA) parameters of ``model`` in place for ``cfg.steps`` optimizer steps.

    Runs with torch.compile forced eager: bitsandbytes' CPU NF4 dequantization is a ``torch.compile``'d
    function specialised per weight shape, and a LoRD model has a different shape for almost every group
    (per-group ranks), so it would recompile dozens of times, hit dynamo's recompile limit, and charge the
    compiler's time and memory to the LoRD run only. Eager keeps dense and LoRD runs comparable.
    """
    with torch.compiler.set_stance("force_eager"):
        return _train(model, train_examples, eval_examples, cfg, pad_id, progress)


def _train(model: nn.Module, train_examples: list[dict[str, list[int]]], eval_examples: list[dict[str, list[int]]],
           cfg: FinetuneConfig, pad_id: int, progress: bool) -> TrainResult:
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    seed_everything(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.scheduler == "constant":
        sched = get_constant_schedule_with_warmup(opt, cfg.warmup_steps)
    else:
        make = get_cosine_schedule_with_warmup if cfg.scheduler == "cosine" else get_linear_schedule_with_warmup
        sched = make(opt, cfg.warmup_steps, cfg.steps)

    stream = _forever(train_examples, cfg.micro_batch_size, pad_id, cfg.seed)
    before = eval_loss(model, eval_examples, pad_id, cfg.micro_batch_size)
    best, best_step, best_state, bad_evals = before, 0, _lora_state(model), 0
    history: list[tuple[int, float]] = [(0, before)]
    losses, seconds = [], []
    stopped = False
    model.train()
    bar = tqdm(range(1, cfg.steps + 1), desc="qlora", disable=not progress, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        batches = [next(stream) for _ in range(cfg.grad_accum_steps)]
        step_tokens = sum(n_target_tokens(b) for b in batches)
        step_loss = 0.0
        for batch in batches:
            # token-weighted, so a step equals one big batch regardless of how it was split
            weight = n_target_tokens(batch) / max(step_tokens, 1)
            loss = model(**batch).loss * weight
            loss.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            current = eval_loss(model, eval_examples, pad_id, cfg.micro_batch_size)
            history.append((step, current))
            bar.set_postfix(loss=f"{step_loss:.3f}", eval=f"{current:.3f}")
            if current < best - cfg.early_stop_min_delta:
                best, best_step, best_state, bad_evals = current, step, _lora_state(model), 0
            else:
                bad_evals += 1
                if cfg.early_stop_patience and bad_evals >= cfg.early_stop_patience:
                    stopped = True
                    break
    bar.close()
    _load_lora_state(model, best_state)
    model.eval()
    tail = losses[-min(len(losses), 5):]
    timed = seconds[1:] if len(seconds) > 1 else seconds
    return TrainResult(train_loss_first=losses[0], train_loss_last=sum(tail) / len(tail), eval_loss_before=before,
                       eval_loss_after=best, best_step=best_step, steps_done=len(losses), stopped_early=stopped,
                       seconds_per_step=statistics.median(timed), step_losses=losses, eval_history=history)


def _forever(examples: list[dict[str, list[int]]], size: int, pad_id: int, seed: int):
    for epoch in itertools.count():  # epochs until the step budget ends
        yield from micro_batches(examples, size, pad_id, seed, epoch)


def _lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def describe(result: TrainResult) -> dict[str, Any]:
    """The JSON-able summary that goes into metrics.json."""
    return {k: v for k, v in result.__dict__.items() if k not in ("step_losses",)} | {
        "step_losses": [round(x, 5) for x in result.step_losses]}
