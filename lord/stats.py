"""Calibration statistics: per group, the input Gram ``G = X^T X``, the input mean and the token count.

One statistic serves LoRD (output covariance ``W G W^T``), the whitening baseline and GPTQ (``H = 2G/n``).
Speed (shared/DESIGN.md: fp64 GEMMs in hooks were ~5x a forward): each batch's Gram is one fp32 GEMM,
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


@dataclass
class GroupStats:
    gram: torch.Tensor  # n x n, X^T X summed over tokens
    mean: torch.Tensor  # n
    n_tokens: int


class GramCollector:
    """Forward pre-hooks on each group's first member; ``add`` accumulates, ``result`` finalises (fp32)."""

    def __init__(self, model: nn.Module, groups: list[Group], accumulate_dtype: torch.dtype = torch.float64):
        self.groups = groups
        self._sum = {g.name: torch.zeros(g.n, g.n, dtype=accumulate_dtype) for g in groups}
        self._xsum = {g.name: torch.zeros(g.n, dtype=torch.float64) for g in groups}
        self._count = {g.name: 0 for g in groups}
        self._handles = [
            model.get_submodule(g.members[0]).register_forward_pre_hook(self._hook(g.name)) for g in groups
        ]

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            self._sum[name] += (x.T @ x).to(self._sum[name].dtype)
            self._xsum[name] += x.sum(0, dtype=torch.float64)
            self._count[name] += x.shape[0]

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
            # pop as we go: the fp64 sums of a 0.5B model are ~5 GB, never hold them twice
            out[g.name] = GroupStats(self._sum.pop(g.name).float(), (self._xsum[g.name] / n).float(), n)
        return out


@torch.no_grad()
def collect_stats(model: nn.Module, groups: list[Group], ids: torch.Tensor, batch_size: int = 4,
                  accumulate_dtype: torch.dtype = torch.float64, progress: bool = True) -> dict[str, GroupStats]:
    """Run ``ids`` ([n_seqs, seq_len]) through ``model`` in batches and return each group's statistics."""
    if ids.ndim != 2:
        raise LordError(f"calibration ids have shape {tuple(ids.shape)}; expected [n_seqs, seq_len]")
    collector = GramCollector(model, groups, accumulate_dtype)
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(0, ids.shape[0], batch_size), desc="calibration", disable=not progress):
            model(input_ids=ids[i:i + batch_size].to(device), use_cache=False)
    finally:
        collector.remove()
    return collector.result()



def save_stats(path: Path, stats: dict[str, GroupStats], groups: list[Group], meta: dict) -> None:
    """Safetensors: ``<group>.gram``, ``<group>.mean``, ``<group>.n_tokens``; metadata holds ``meta`` + groups."""
    tensors = {}
    for name, s in stats.items():
        tensors[f"{name}.gram"] = s.gram.contiguous()
        tensors[f"{name}.mean"] = s.mean.contiguous()
        tensors[f"{name}.n_tokens"] = torch.tensor([s.n_tokens], dtype=torch.int64)
    metadata = {k: json.dumps(v) for k, v in meta.items()}
    metadata["groups"] = json.dumps([[g.name, list(g.members)] for g in groups])
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
        wanted = available if names is None else names
        missing = [n for n in wanted if n not in available]
        if missing:
            raise LordError(f"{path} has no statistics for groups {missing[:3]}... ({len(missing)} missing); "
                            "recollect statistics with the same targets as the decomposition")
        out = {
            n: GroupStats(f.get_tensor(f"{n}.gram"), f.get_tensor(f"{n}.mean"),
                          int(f.get_tensor(f"{n}.n_tokens")[0]))
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
