"""The training loop: gradient accumulation, warmup + cosine/linear schedule, periodic eval loss, early stop
on eval loss (restoring the best adapter), a wall-clock budget, a progress bar, and a seeded order. The loss
is an ``Objective`` (instruction SFT here, distillation in ``finetune.kd``), so both share one loop."""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import FinetuneConfig
from .data import collate, micro_batches, n_target_tokens
from .errors import FinetuneError


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
    budget_stop: bool = False        # stopped because the next step would overrun budget_minutes
    train_seconds: float = 0.0       # wall time of the loop (steps + periodic evals)
    step_elapsed: list[float] = field(default_factory=list)  # seconds since the loop started, after each step
    step_lr: list[float] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def eval_loss(model: nn.Module, examples: list[dict[str, list[int]]], pad_id: int, batch_size: int,
              cfg: FinetuneConfig | None = None) -> float:
    """Token-weighted mean answer loss over held-out examples (dropout off)."""
    was_training = model.training
    model.eval()
    total, n_tok = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        n = n_target_tokens(batch)
        with autocast(cfg or FinetuneConfig()):
            total += float(model(**batch).loss) * n
        n_tok += n
    model.train(was_training)
    return total / max(n_tok, 1)


Objective = Callable[[nn.Module, Any], tuple[torch.Tensor, int]]  # batch -> (mean loss over its tokens, n tokens)


def train(model: nn.Module, train_examples: list[dict[str, list[int]]], eval_examples: list[dict[str, list[int]]],
          cfg: FinetuneConfig, pad_id: int, progress: bool = True) -> TrainResult:
    """Instruction SFT: train the trainable (LoRA) parameters of ``model`` in place on answer-token loss."""
    stream = _forever(train_examples, cfg.micro_batch_size, pad_id, cfg.seed)
    return run_loop(model, stream, sft_objective,
                    lambda: eval_loss(model, eval_examples, pad_id, cfg.micro_batch_size, cfg), cfg, progress,
                    desc="sft")


def sft_objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    return model(**batch).loss, n_target_tokens(batch)


def autocast(cfg: FinetuneConfig):
    """The compute-dtype policy's autocast for ``cfg`` (sources.compute): bf16 where the hardware multiplies
    it natively, a no-op on float32 (on an AVX2-only CPU bf16 matmuls are emulated and far slower)."""
    from sources.compute import autocast as policy_autocast
    from sources.compute import compute_dtype

    return policy_autocast(cfg.device, compute_dtype(cfg.device, cfg.dtype))


def run_loop(model: nn.Module, stream: Iterator[Any], objective: Objective, evaluate: Callable[[], float],
             cfg: FinetuneConfig, progress: bool = True, desc: str = "train") -> TrainResult:
    """The optimisation loop shared by every objective, budgeted by steps and/or wall-clock minutes.

    Runs with torch.compile forced eager: bitsandbytes' CPU NF4 dequantization is a ``torch.compile``'d
    function specialised per weight shape, and a LoRD model has a different shape for almost every group
    (per-group ranks), so it would recompile dozens of times, hit dynamo's recompile limit, and charge the
    compiler's time and memory to the LoRD run only. Eager keeps dense and LoRD runs comparable.
    """
    with torch.compiler.set_stance("force_eager"):
        return _run_loop(model, stream, objective, evaluate, cfg, progress, desc)


def _run_loop(model: nn.Module, stream: Iterator[Any], objective: Objective, evaluate: Callable[[], float],
              cfg: FinetuneConfig, progress: bool, desc: str) -> TrainResult:
    seed_everything(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    budget = cfg.budget_minutes * 60.0 if cfg.budget_minutes else None
    max_steps = cfg.steps or 10**9
    clock = Clock(cfg.budget_clock)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg, clock.elapsed()))

    clock.start()
    before = evaluate()
    eval_seconds = clock.elapsed()
    clock.start()
    best, best_step, best_state, bad_evals = before, 0, _lora_state(model), 0
    history: list[tuple[int, float]] = [(0, before)]
    losses, seconds, elapsed, lrs = [], [], [], []
    stopped = budget_stop = False
    model.train()
    bar = tqdm(total=None if cfg.steps is None else cfg.steps, desc=desc, disable=not progress, dynamic_ncols=True)
    step = 0
    while step < max_steps:
        if budget is not None and seconds:
            # stop before a step (and the closing eval) would overrun the budget
            if clock.elapsed() + statistics.median(seconds) + eval_seconds > budget:
                budget_stop = True
                break
        step += 1
        t0 = clock.elapsed()
        batches = [next(stream) for _ in range(cfg.grad_accum_steps)]
        step_loss, step_tokens = 0.0, 0
        for batch in batches:
            with autocast(cfg):
                loss, n_tok = objective(model, batch)
            # token-weighted over the step's micro-batches (the sum is divided once all are counted)
            (loss.float() * n_tok).backward()
            step_loss += float(loss.detach()) * n_tok
            step_tokens += n_tok
        for p in params:
            if p.grad is not None:
                p.grad.div_(max(step_tokens, 1))
        step_loss /= max(step_tokens, 1)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seconds.append(clock.elapsed() - t0)
        elapsed.append(clock.elapsed())
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lrs[-1]:.2e}")
        last = step == max_steps or (budget is not None and clock.elapsed() + seconds[-1] + eval_seconds > budget)
        if step % cfg.eval_every == 0 or last:
            t_eval = clock.elapsed()
            current = evaluate()
            eval_seconds = clock.elapsed() - t_eval
            history.append((step, current))
            bar.set_postfix(loss=f"{step_loss:.3f}", eval=f"{current:.3f}")
            if current < best - cfg.early_stop_min_delta:
                best, best_step, best_state, bad_evals = current, step, _lora_state(model), 0
            else:
                bad_evals += 1
                if cfg.early_stop_patience and bad_evals >= cfg.early_stop_patience:
                    stopped = True
                    break
            model.train()
    bar.close()
    if history[-1][0] != len(losses) and losses:  # the budget ended between evals: score the last adapter too
        current = evaluate()
        history.append((len(losses), current))
        if current < best - cfg.early_stop_min_delta:
            best, best_step, best_state = current, len(losses), _lora_state(model)
    _load_lora_state(model, best_state)
    model.eval()
    if not losses:
        raise FinetuneError(f"budget_minutes={cfg.budget_minutes} left no time for a single training step "
                            f"(one evaluation took {eval_seconds:.0f} s); raise the budget or lower n_eval.")
    tail = losses[-min(len(losses), 5):]
    timed = seconds[1:] if len(seconds) > 1 else seconds
    return TrainResult(train_loss_first=losses[0], train_loss_last=sum(tail) / len(tail), eval_loss_before=before,
                       eval_loss_after=best, best_step=best_step, steps_done=len(losses), stopped_early=stopped,
                       seconds_per_step=statistics.median(timed), step_losses=losses, eval_history=history,
                       budget_stop=budget_stop, train_seconds=clock.elapsed(), step_elapsed=elapsed, step_lr=lrs)


class Clock:
    """Seconds since the loop started (0 before), read by the budget and the time-aware schedule. ``wall``:
    elapsed time; ``process``: this process's CPU seconds / torch threads, i.e. the wall time it would have
    taken alone on the machine, so runs compared at one budget get the same compute on a shared CPU."""

    def __init__(self, kind: str = "wall") -> None:
        self.kind = kind
        self.t0: float | None = None

    def _now(self) -> float:
        if self.kind == "process":
            return time.process_time() / max(1, torch.get_num_threads())
        return time.perf_counter()

    def start(self) -> None:
        self.t0 = self._now()

    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else self._now() - self.t0


def lr_factor(step: int, cfg: FinetuneConfig, elapsed_seconds: float) -> float:
    """Linear warmup, then cosine / linear decay / constant over the run's progress: the larger of the step
    fraction and the budget fraction, so a budgeted run anneals by the time it is stopped.

    Warmup is ``(step + 1) / (warmup_steps + 1)``, never 0: a first step at lr 0 is wasted, and a budgeted CPU run
    may only have one (the default preset's 2-minute KD did exactly that: ppl 8.8008 before and after)."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    if cfg.scheduler == "constant":
        return 1.0
    progress = 0.0
    if cfg.steps:
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.budget_minutes:
        progress = max(progress, elapsed_seconds / (cfg.budget_minutes * 60.0))
    progress = min(progress, 1.0)
    if cfg.scheduler == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


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


CURVES = ("step_losses", "step_elapsed", "step_lr")


def describe(result: TrainResult) -> dict[str, Any]:
    """The JSON-able summary that goes into metrics.json; per-step series also under ``curve`` (step -> value
    lists that flows/ logs to MLflow as metric histories)."""
    return {k: v for k, v in result.__dict__.items() if k not in CURVES} | {
        "step_losses": [round(x, 5) for x in result.step_losses],
        "curve": {"train_loss": [round(x, 5) for x in result.step_losses],
                  "elapsed_seconds": [round(x, 2) for x in result.step_elapsed],
                  "lr": [float(f"{x:.4g}") for x in result.step_lr],
                  "eval_loss": {str(s): round(v, 5) for s, v in result.eval_history}}}
