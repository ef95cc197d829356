"""Recovery by distillation: next-token KL to the dense teacher on code, with LoRA on the frozen 4-bit student.

The teacher's distribution at every position of ``kd_n_seqs`` code windows is computed once and kept as its
top-k log-probabilities plus the tail mass (``1 - sum top-k``), in a safetensors file named by a content key
(teacher weights, window token ids, k, precision), so every later run with the same teacher and data reuses it
instead of running the teacher again. The student is scored on the k teacher tokens plus one "tail" bucket:

    KL(p || q) ~= sum_{i in top-k} p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail),
    p_tail = 1 - sum_{top-k} p_i,   q_tail = 1 - sum_{top-k} q_i

the exact KL between the two distributions coarsened to k + 1 outcomes (so it is >= 0, and equals the full KL
when k = vocab). Dense logits over a 151k vocabulary would cost 0.6 MB per token; top-32 costs 256 bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import FinetuneConfig
from .errors import FinetuneError
from .train import TrainResult, autocast, run_loop

CACHE_VERSION = "1"
MAX_SOURCE_HOPS = 8


@dataclass(frozen=True)
class TeacherTargets:
    """Token windows and the teacher's top-k next-token log-probabilities at every position."""

    ids: torch.Tensor        # [n, L] long
    top_idx: torch.Tensor    # [n, L, k] int32 (token ids)
    top_logp: torch.Tensor   # [n, L, k] float32, descending
    meta: dict[str, Any]


def topk_kl(student_logits: torch.Tensor, top_idx: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(teacher || student) over the teacher's top-k tokens + the tail bucket, in fp32: [..., ]."""
    s_logp = torch.log_softmax(student_logits.float(), dim=-1)
    s_top = s_logp.gather(-1, top_idx.long())
    p_top = top_logp.float().exp()
    p_tail = (1.0 - p_top.sum(-1)).clamp_min(0.0)
    # log(1 - sum q_top) without cancellation blow-up; clamped so a student that puts all mass on the
    # teacher's top-k (q_tail -> 0) stays finite when the teacher's tail is (numerically) empty too
    q_top_mass = torch.logsumexp(s_top, dim=-1).exp().clamp(max=1.0 - 1e-7)
    log_q_tail = torch.log1p(-q_top_mass)
    head = (p_top * (top_logp.float() - s_top)).sum(-1)
    tail = torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
    return head + tail


def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices int32, log-probabilities fp32) of the k most likely next tokens at every position."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, indices = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return indices.to(torch.int32), values


def resolve_teacher(model: str | Path, cfg: FinetuneConfig) -> str:
    """The configured teacher, else the dense model ``model`` was compressed from: follow each artifact's
    ``lord_artifact.json`` ``source`` (GPTQ -> LoRD -> dense) until a plain model; a dense input is its own
    teacher (recovering what the 4-bit base lost). A vocabulary-trimmed model (``stage: vocab``) ends the chain:
    the student reads its tokenizer, and its logits are the original's on the kept tokens (bench/results/vocab.json:
    -0.08% bits/byte), while the original's ids and token stream differ."""
    from sources.artifact import read_artifact_meta

    if cfg.teacher:
        return cfg.teacher
    current = str(model)
    for _ in range(MAX_SOURCE_HOPS):
        info = read_artifact_meta(Path(current)) if Path(current).is_dir() else None
        if info is None or info.get("stage") == "vocab":
            return current
        source = info.get("source") or info.get("base_dir")
        if not source:
            raise FinetuneError(f"{current}'s artifact record names no source model; pass FinetuneConfig.teacher "
                                "(the dense model).")
        current = str(source)
    raise FinetuneError(f"{model}: more than {MAX_SOURCE_HOPS} artifacts in its source chain; pass teacher=.")


def teacher_digest(spec: str) -> str:
    """Content digest of the teacher (``artifacts.content_digest`` of its directory; an embedded/hub name is
    pinned by the package version that converts it), so cached teacher logits follow its weights."""
    from artifacts import content_digest, sha256_json
    from sources.models import resolve_model_dir

    where = resolve_model_dir(spec)
    if not isinstance(where, Path) or not where.is_dir():
        return sha256_json({"name": str(spec)})
    return content_digest(where)


def kd_windows(tokenizer: Any, cfg: FinetuneConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """``kd_n_seqs`` windows of ``max_seq_len`` tokens from the calibration side of the code split (the stdlib,
    or ``cfg.data``: a directory of .py files or a corpus mix): never the held-out files perplexity is measured on."""
    from sources.corpus import is_code_spec

    if cfg.data and not is_code_spec(cfg.data):
        raise FinetuneError(f"objective='kd' reads code: data={cfg.data!r} must be a directory of .py files or a "
                            f"corpus mix such as 'stdlib,pkg:numpy' (None: the stdlib calibration split); "
                            f"instruction JSONL is for objective='sft'.")
    ids, split = code_windows(tokenizer, cfg.data, cfg.kd_n_seqs, cfg)
    return ids, {"source": cfg.data or "stdlib", **split.describe(), "n_seqs": cfg.kd_n_seqs,
                 "seq_len": cfg.max_seq_len}


def code_windows(tokenizer: Any, data: str | None, n_seqs: int, cfg: FinetuneConfig) -> tuple[torch.Tensor, Any]:
    """``n_seqs`` seeded windows of ``cfg.max_seq_len`` tokens from the calibration side of ``data`` (a code
    corpus spec; None = the stdlib), and the split they came from."""
    from sources import calibration_batches, code_split

    split = code_split(data)
    return calibration_batches(tokenizer, split.calibration, n_seqs=n_seqs, seq_len=cfg.max_seq_len,
                               seed=cfg.seed), split


def cache_dir(cfg: FinetuneConfig) -> Path:
    if cfg.kd_cache_dir:
        return Path(cfg.kd_cache_dir)
    from sources.models import cache_root

    return cache_root().parent / "teacher_logits"


def teacher_targets(teacher: str, ids: torch.Tensor, cfg: FinetuneConfig,
                    progress: bool = True) -> TeacherTargets:
    """The teacher's top-k targets for ``ids``: read from the content-keyed cache, or computed and stored."""
    from safetensors.torch import load_file, save_file

    key_src = {"teacher_digest": teacher_digest(teacher), "ids": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
               "shape": list(ids.shape), "k": cfg.kd_top_k, "dtype": _dtype_name(cfg), "v": CACHE_VERSION}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_dir(cfg) / f"{key}.safetensors"
    meta = {"teacher": str(teacher), "key": key, **key_src}
    if path.is_file():
        t = load_file(path)
        if torch.equal(t["ids"], ids):
            return TeacherTargets(ids, t["top_idx"], t["top_logp"], {**meta, "cached": True, "seconds": 0.0})
    t0 = time.perf_counter()
    top_idx, top_logp = _run_teacher(teacher, ids, cfg, progress)
    seconds = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"ids": ids.contiguous(), "top_idx": top_idx.contiguous(), "top_logp": top_logp.contiguous()}, tmp,
              metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)  # atomic: a killed run never leaves a half-written cache entry
    return TeacherTargets(ids, top_idx, top_logp, {**meta, "cached": False, "seconds": seconds})


@torch.no_grad()
def _run_teacher(teacher: str, ids: torch.Tensor, cfg: FinetuneConfig,
                 progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from tqdm.auto import tqdm

    from sources import load_model

    model, _ = load_model(teacher, device=cfg.device)
    model.eval()
    idx, logp = [], []
    for start in tqdm(range(0, ids.shape[0], cfg.micro_batch_size), desc="teacher", disable=not progress):
        with autocast(cfg):
            logits = model(input_ids=ids[start:start + cfg.micro_batch_size].to(cfg.device), use_cache=False).logits
        i, v = teacher_topk(logits, cfg.kd_top_k)
        idx.append(i.cpu())
        logp.append(v.cpu())
    del model
    return torch.cat(idx), torch.cat(logp)


def _dtype_name(cfg: FinetuneConfig) -> str:
    from sources.compute import compute_dtype, dtype_name

    return dtype_name(compute_dtype(cfg.device, cfg.dtype))


def kd_objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean top-k KL over every position of the batch's windows."""
    from sources.compute import wide

    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    with wide():  # the loss in fp32 even inside a bf16 autocast region
        kl = topk_kl(logits, batch["top_idx"], batch["top_logp"])
    return kl.mean(), kl.numel()


@torch.no_grad()
def kd_eval_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]], cfg: FinetuneConfig) -> float:
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for batch in batches:
        with autocast(cfg):
            loss, count = kd_objective(model, batch)
        total += float(loss) * count
        n += count
    model.train(was_training)
    return total / max(n, 1)


def split_targets(targets: TeacherTargets, n_eval: int, size: int) -> tuple[list[int], list[dict[str, torch.Tensor]]]:
    """Train window indices and the eval batches (the last ``n_eval`` windows, never trained on)."""
    n = targets.ids.shape[0]
    eval_rows = list(range(n - n_eval, n))
    eval_batches = [_batch(targets, eval_rows[i:i + size]) for i in range(0, n_eval, size)]
    return list(range(n - n_eval)), eval_batches


def _batch(targets: TeacherTargets, rows: list[int]) -> dict[str, torch.Tensor]:
    r = torch.tensor(rows)
    return {"input_ids": targets.ids[r], "top_idx": targets.top_idx[r], "top_logp": targets.top_logp[r]}


def _stream(targets: TeacherTargets, rows: list[int], size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    epoch = 0
    while True:  # seeded reshuffle every epoch until the step / time budget ends
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = [rows[i] for i in torch.randperm(len(rows), generator=g).tolist()]
        for start in range(0, len(order) - size + 1, size):
            yield _batch(targets, order[start:start + size])
        epoch += 1


def train_kd(model: nn.Module, targets: TeacherTargets, cfg: FinetuneConfig, progress: bool = True) -> TrainResult:
    """Distil ``targets`` into the trainable (LoRA) parameters of ``model``, in place."""
    rows, eval_batches = split_targets(targets, cfg.n_eval, cfg.micro_batch_size)
    if len(rows) < cfg.micro_batch_size:
        raise FinetuneError(f"{len(rows)} KD training windows < micro_batch_size={cfg.micro_batch_size}; "
                            f"raise kd_n_seqs or lower n_eval.")
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else None
    if vocab is not None and int(targets.top_idx.max()) >= vocab:
        raise FinetuneError(f"teacher token ids reach {int(targets.top_idx.max())} but the student's vocabulary has "
                            f"{vocab}: teacher and student must share a tokenizer.")
    return run_loop(model, _stream(targets, rows, cfg.micro_batch_size, cfg.seed), kd_objective,
                    lambda: kd_eval_loss(model, eval_batches, cfg), cfg, progress, desc="kd")
