"""Block-wise distillation of LoRD factors: each decoder layer's float factors fitted to the dense layer's output.

Layer i of the compressed student is trained (its LowRankLinear ``down``/``up`` weights only, Adam, MSE) to map
the inputs the *already refined* student layers 0..i-1 produce to what the dense teacher's layer i outputs on
the dense inputs, then the student stream advances through the refined layer (error compensation, as in
sequential decomposition). No LM head (a third of the 0.5B's forward), no backward through the whole model:
per CPU second a layer sees tens of times more tokens than end-to-end training. The budget covers the whole
stage (the captures and the teacher/student layer forwards too, not only the optimizer steps): factored layer j of
n trains until the clock reaches ``(j + 1) / n`` of it, so forward overhead shortens training instead of
overrunning the budget. A layer whose output error on the probe batches did not fall keeps its starting factors,
so a short or noisy run cannot make a layer worse on those batches. Uses the forward toolkit's capture /
run_layer (``forward.capture``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .errors import FinetuneError


@dataclass(frozen=True)
class BlockwiseConfig:
    """The pipeline's ``refine`` stage config (between decompose and quantize) and ``blockwise_to_dir``'s."""

    budget_minutes: float = 5.0
    lr: float = 1e-4
    batch_size: int = 4          # windows per optimizer step
    min_steps: int = 1           # per factored layer, even when its time share is spent
    seed: int = 0
    budget_clock: str = "wall"   # or "process": CPU seconds / threads (finetune.train.Clock)
    probe_batches: int = 2       # batches the per-layer error before/after is measured on
    n_seqs: int = 64             # calibration windows (the stdlib split's calibration side, or ``data``)
    seq_len: int = 256
    data: str | None = None      # a directory of .py files to refine on instead of the stdlib
    teacher: str | None = None   # None: the model the LoRD checkpoint was factored from

    def __post_init__(self) -> None:
        from .config import CLOCKS

        if not self.budget_minutes > 0 or not self.lr > 0 or self.batch_size < 1 or self.min_steps < 0:
            raise FinetuneError(f"BlockwiseConfig {self}: budget_minutes and lr must be > 0, batch_size >= 1, "
                                f"min_steps >= 0.")
        if self.n_seqs < 1 or self.seq_len < 16:
            raise FinetuneError(f"BlockwiseConfig n_seqs={self.n_seqs}, seq_len={self.seq_len}: expected >= 1 "
                                "windows of >= 16 tokens.")
        if self.budget_clock not in CLOCKS:
            raise FinetuneError(f"budget_clock={self.budget_clock!r}; expected one of {CLOCKS}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def factor_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The LoRD factor weights of one decoder layer (``*.down.*`` / ``*.up.*`` of factored projections)."""
    return [p for n, p in layer.named_parameters() if len(n.split(".")) >= 2 and n.split(".")[-2] in ("down", "up")]


def _mse(layer: nn.Module, hidden: list[torch.Tensor], calls: list, targets: list[torch.Tensor]) -> float:
    from forward.capture import run_layer

    with torch.no_grad():
        err = sum(float((run_layer(layer, h, c) - t).pow(2).sum()) for h, c, t in zip(hidden, calls, targets,
                                                                                        strict=True))
        ref = sum(float((t - h).pow(2).sum()) for h, t in zip(hidden, targets, strict=True))
    return err / max(ref, 1e-30)  # error relative to what the layer adds to the residual stream


def blockwise_distill(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, cfg: BlockwiseConfig,
                      progress: bool = True) -> dict[str, Any]:
    """Refine ``student``'s factors in place, layer by layer, on the windows ``ids`` [n, L]; returns per-layer
    relative output errors before/after and the step counts."""
    from tqdm.auto import tqdm

    from forward.capture import capture, decoder_layers, run_layer

    t_layers, s_layers = decoder_layers(teacher), decoder_layers(student)
    if len(t_layers) != len(s_layers):
        raise FinetuneError(f"teacher has {len(t_layers)} decoder layers, student {len(s_layers)}: not the same "
                            f"architecture; pass the dense model the student was compressed from.")
    from .train import Clock

    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    clock = Clock(cfg.budget_clock)
    clock.start()
    student.requires_grad_(False)
    teacher.requires_grad_(False)
    t_stream = capture(teacher, ids, 0, cfg.batch_size)
    s_stream = capture(student, ids, 0, cfg.batch_size)
    n_factored = sum(bool(factor_parameters(layer)) for layer in s_layers)
    if n_factored == 0:
        raise FinetuneError("the student has no LoRD-factored projections (.down/.up); block-wise distillation "
                            "refines factors: pass a LoRD checkpoint.")
    budget, j = cfg.budget_minutes * 60.0, 0
    layers_report = []
    for i in tqdm(range(len(s_layers)), desc="blockwise", disable=not progress):
        with torch.no_grad():
            targets = t_stream.run(t_layers[i])
        params = factor_parameters(s_layers[i])
        if params:
            k = cfg.probe_batches  # the error is a diagnostic: measured on a few batches, not a third full pass
            before = _mse(s_layers[i], s_stream.hidden[:k], s_stream.calls[:k], targets[:k])
            start = [p.detach().clone() for p in params]
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=cfg.lr)
            j, steps = j + 1, 0
            deadline = budget * j / n_factored
            order = torch.randperm(len(targets)).tolist()
            while steps < cfg.min_steps or clock.elapsed() < deadline:
                b = order[steps % len(order)]
                out = run_layer(s_layers[i], s_stream.hidden[b], s_stream.calls[b])
                loss = (out - targets[b]).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
            for p in params:
                p.requires_grad_(False)
            after = _mse(s_layers[i], s_stream.hidden[:k], s_stream.calls[:k], targets[:k])
            reverted = not after < before  # a few noisy steps can hurt (lr 4e-4 measured ppl x1.5): keep the start
            if reverted:
                with torch.no_grad():
                    for p, p0 in zip(params, start, strict=True):
                        p.copy_(p0)
            layers_report.append({"layer": i, "rel_err_before": before, "rel_err_after": before if reverted else after,
                                  "rel_err_trained": after, "steps": steps, "reverted": reverted})
        t_stream.hidden = targets
        with torch.no_grad():
            s_stream.advance(s_layers[i])
    return {"layers": layers_report, "seconds": time.perf_counter() - t0, "budget_seconds": clock.elapsed(),
            "n_tokens": int(ids.numel()), "budget_seconds_allowed": budget}


def blockwise_to_dir(model: str, cfg: BlockwiseConfig, out_dir: Any, progress: bool = True) -> dict[str, Any]:
    """Refine the LoRD checkpoint ``model`` block-wise against its dense source (or ``cfg.teacher``) on
    ``cfg.n_seqs`` calibration windows (stdlib split or ``cfg.data``, a directory of .py files) and write a LoRD
    checkpoint of the same kind and source to ``out_dir`` (atomically), with the report in metrics.json. The
    signature is a pipeline stage's (``flows.stages``: the ``refine`` stage)."""
    import json
    import shutil
    from pathlib import Path

    from artifacts import atomic_dir, write_json_atomic
    from sources import calibration_batches, code_split, load_model

    from .config import FinetuneConfig
    from .kd import resolve_teacher

    src = Path(model)
    if not (src / "lord_artifact.json").is_file():
        raise FinetuneError(f"{model} is not a LoRD checkpoint directory (no lord_artifact.json); block-wise "
                            f"distillation refines the factors that lord decompose writes.")
    teacher = resolve_teacher(src, FinetuneConfig(teacher=cfg.teacher))
    student, tok = load_model(str(src))
    dense, _ = load_model(teacher)
    split = code_split(cfg.data) if cfg.data else code_split()
    ids = calibration_batches(tok, split.calibration, n_seqs=cfg.n_seqs, seq_len=cfg.seq_len, seed=cfg.seed)
    report = blockwise_distill(student, dense, ids, cfg, progress=progress)
    layers = report["layers"]
    report.update({"teacher": teacher, "rel_err_before_mean": sum(r["rel_err_before"] for r in layers) / len(layers),
                   "rel_err_after_mean": sum(r["rel_err_after"] for r in layers) / len(layers),
                   "steps_total": sum(r["steps"] for r in layers),
                   "layers_reverted": sum(r["reverted"] for r in layers)})
    del dense
    with atomic_dir(Path(out_dir)) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        if tok is not None:
            tok.save_pretrained(tmp)
        for p in src.iterdir():  # modeling code and anything save_pretrained does not write
            if p.is_file() and not (tmp / p.name).exists() and p.suffix != ".safetensors" \
                    and p.name not in ("MANIFEST.json", "metrics.json"):
                shutil.copy2(p, tmp / p.name)
        meta = json.loads((src / "lord_artifact.json").read_text())
        meta["refined"] = {"method": "blockwise", "from": str(src), "teacher": teacher, "config": cfg.to_dict(),
                           "data": cfg.data or "stdlib"}
        write_json_atomic(tmp / "lord_artifact.json", meta)
        write_json_atomic(tmp / "metrics.json", report)
    return report
