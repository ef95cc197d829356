"""Calibration statistics per group: a second-moment matrix, the input mean, the token count and ``tr(X^T X)``.

Which second moment (``side``): the input Gram ``G = X^T X`` (n x n) serves every method; LoRD itself only
needs the output covariance ``C = W G W^T = Y^T Y`` with ``Y = X W^T`` (Kaushal et al. 2023 take the PCA of
the outputs). For a single linear that narrows (m < n, e.g. ``down_proj`` 4864 -> 896) ``Y^T Y`` is far cheaper
(m^2 instead of n^2 per token: on Qwen2.5-Coder-0.5B the down_proj Grams cost more than the whole forward) and
its output is computed by the forward anyway. ``statistic="auto"`` takes the smaller side for such groups;
``"input"`` keeps ``G`` everywhere. Both sides give the same LoRD, SVD and whitening factors for those groups
(whitening's damping needs only ``tr(G)``, kept for every group).
Speed (shared/DESIGN.md: fp64 GEMMs in hooks were ~5x a forward): each batch's product is one fp32 GEMM,
added to an fp64 running sum, so precision is lost only within one batch of tokens.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from lord.errors import LordError
from lord.surgery import Group

STATISTICS = ("auto", "input")


@dataclass
class GroupStats:
    gram: torch.Tensor  # side "input": n x n, X^T X; side "output": m x m, (X W^T)^T (X W^T), bias excluded
    mean: torch.Tensor  # n, input mean
    n_tokens: int
    side: str = "input"
    input_trace: float | None = None  # tr(X^T X); None = read it off an input Gram

    def __post_init__(self) -> None:
        if self.input_trace is None:
            if self.side != "input":
                raise LordError("output-side statistics need input_trace (tr X^T X) for whitening's damping")
            self.input_trace = float(self.gram.double().diagonal().sum())


def stat_side(group: Group, statistic: str = "auto") -> str:
    """``"output"`` for a single narrowing linear under ``statistic="auto"``, else ``"input"``."""
    if statistic not in STATISTICS:
        raise LordError(f"statistic {statistic!r} is unknown; expected one of {STATISTICS}")
    narrow = len(group.members) == 1 and group.m < group.n
    return "output" if statistic == "auto" and narrow else "input"


class GramCollector:
    """Hooks on each group's first member; ``result`` finalises the running sums (fp32)."""

    def __init__(self, model: nn.Module, groups: list[Group], accumulate_dtype: torch.dtype = torch.float64,
                 statistic: str = "auto"):
        self.groups = groups
        self.sides = {g.name: stat_side(g, statistic) for g in groups}
        self._sum = {g.name: torch.zeros(*(2 * (g.n if self.sides[g.name] == "input" else g.m,)),
                                         dtype=accumulate_dtype) for g in groups}
        self._xsum = {g.name: torch.zeros(g.n, dtype=torch.float64) for g in groups}
        self._trace = {g.name: 0.0 for g in groups}
        self._count = {g.name: 0 for g in groups}
        self._handles = []
        for g in groups:
            mod = model.get_submodule(g.members[0])
            if self.sides[g.name] == "input":
                self._handles.append(mod.register_forward_pre_hook(self._input_hook(g.name)))
            else:
                self._handles.append(mod.register_forward_hook(self._output_hook(g.name, mod)))

    def _count_input(self, name: str, x: torch.Tensor) -> None:
        self._xsum[name] += x.sum(0).double()  # fp32 within a batch, like the Gram: no fp64 copy of x
        self._count[name] += x.shape[0]

    def _input_hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self._sum[name] += (x.T @ x).to(self._sum[name].dtype)
            self._count_input(name, x)

        return hook

    def _output_hook(self, name: str, mod: nn.Module):
        def hook(_module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            y = output.detach().reshape(-1, output.shape[-1]).float()
            if getattr(mod, "bias", None) is not None:
                y = y - mod.bias.detach().float()
            self._sum[name] += (y.T @ y).to(self._sum[name].dtype)
            self._trace[name] += float(torch.linalg.vector_norm(x)) ** 2
            self._count_input(name, x)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self) -> dict[str, GroupStats]:
        out = {}
        for g in self.groups:
            n = self._count[g.name]
            if n == 0:
                raise LordError(f"group {g.name} saw no tokens: its hook never fired (is it on the forward path?)")
            side = self.sides[g.name]
            # pop as we go: fp64 sums can be GBs, never hold them twice
            out[g.name] = GroupStats(self._sum.pop(g.name).float(), (self._xsum[g.name] / n).float(), n, side,
                                     self._trace[g.name] if side == "output" else None)
        return out


@torch.no_grad()
def collect_stats(model: nn.Module, groups: list[Group], ids: torch.Tensor, batch_size: int = 4,
                  accumulate_dtype: torch.dtype = torch.float64, progress: bool = True,
                  statistic: str = "auto") -> dict[str, GroupStats]:
    """Run ``ids`` ([n_seqs, seq_len]) through ``model`` in batches and return each group's statistics."""
    if ids.ndim != 2:
        raise LordError(f"calibration ids have shape {tuple(ids.shape)}; expected [n_seqs, seq_len]")
    collector = GramCollector(model, groups, accumulate_dtype, statistic)
    device = next(model.parameters()).device
    body = _body(model, groups)
    try:
        for i in tqdm(range(0, ids.shape[0], batch_size), desc="calibration", disable=not progress):
            body(input_ids=ids[i:i + batch_size].to(device), use_cache=False)
    finally:
        collector.remove()
    return collector.result()


def _body(model: nn.Module, groups: list[Group]) -> nn.Module:
    """The model without its LM head when every group lives in the body: statistics never need the logits, a
    vocabulary-wide matmul that is 14% of the trimmed 0.5B's forward and 27% of the untrimmed one's."""
    prefix = getattr(model, "base_model_prefix", "")
    body = getattr(model, prefix, None) if prefix else None
    if isinstance(body, nn.Module) and all(m.startswith(prefix + ".") for g in groups for m in g.members):
        return body
    return model


def save_stats(path: Path, stats: dict[str, GroupStats], groups: list[Group], meta: dict) -> None:
    """Safetensors: ``<group>.{gram,mean,n_tokens,input_trace}``; metadata holds ``meta``, groups and sides."""
    tensors = {}
    for name, s in stats.items():
        tensors[f"{name}.gram"] = s.gram.contiguous()
        tensors[f"{name}.mean"] = s.mean.contiguous()
        tensors[f"{name}.n_tokens"] = torch.tensor([s.n_tokens], dtype=torch.int64)
        tensors[f"{name}.input_trace"] = torch.tensor([s.input_trace], dtype=torch.float64)
    metadata = {k: json.dumps(v) for k, v in meta.items()}
    metadata["groups"] = json.dumps([[g.name, list(g.members)] for g in groups])
    metadata["sides"] = json.dumps({name: s.side for name, s in stats.items()})
    save_file(tensors, str(path), metadata=metadata)


def load_stats(path: Path, names: list[str] | None = None) -> tuple[dict[str, GroupStats], dict]:
    """Statistics for ``names`` (default: all groups in the file) and the file's metadata."""
    path = Path(path)
    if not path.is_file():
        raise LordError(f"statistics file {path} does not exist; run collect_stats_to_file first")
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
        meta = {k: json.loads(v) for k, v in raw.items()}
        available = [g[0] for g in meta.get("groups", [])]
        sides = meta.get("sides", {})
        keys = set(f.keys())
        wanted = available if names is None else names
        missing = [n for n in wanted if n not in available]
        if missing:
            raise LordError(f"{path} has no statistics for groups {missing[:3]}... ({len(missing)} missing); "
                            "recollect statistics with the same targets as the decomposition")
        out = {
            n: GroupStats(f.get_tensor(f"{n}.gram"), f.get_tensor(f"{n}.mean"),
                          int(f.get_tensor(f"{n}.n_tokens")[0]), sides.get(n, "input"),
                          float(f.get_tensor(f"{n}.input_trace")[0]) if f"{n}.input_trace" in keys else None)
            for n in wanted
        }
    return out, meta


def model_fingerprint(model: torch.nn.Module, n_values: int = 64) -> str:
    """A cheap identity of a model's weights: its config and every parameter's name, shape and a strided
    sample of its values.

    Statistics are only valid for the weights they were collected on; this catches stale ones (another
    checkpoint of the same architecture) without hashing gigabytes.
    """
    cfg = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(flat[:: max(1, flat.numel() // n_values)][:n_values].float().cpu().numpy().tobytes())
    return h.hexdigest()
