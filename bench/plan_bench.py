"""Shared plumbing of the rank-plan benchmarks (speed_plan, lord_share): a model and its statistics from a flow's
artifacts, the factors computed once, and one held-out ppl record per rank plan applied to a copy of the model."""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class FactoredBase:
    """The dense model, its groups and factors (computed once), and the held-out ppl protocol."""

    model: Any
    tok: Any
    groups: list
    facts: dict
    total: int
    lin: int
    cfg: Any  # evaluation.perplexity.PerplexityConfig
    files: list

    def dense_ppl(self) -> float:
        from evaluation.perplexity import perplexity

        return perplexity(self.model, self.tok, self.files, self.cfg).ppl

    def evaluate(self, ranks: dict, ppl_dense: float, sequential: tuple[Any, str] | None = None) -> dict[str, Any]:
        """Held-out ppl of a copy of the model cut to ``ranks``, with what the cut removed; ``sequential`` =
        ``(calibration ids, mode)`` fits the factors layer by layer (lord/sequential.py) instead of in one shot."""
        import lord
        from evaluation.perplexity import perplexity
        from lord.sequential import sequential_decompose

        cut = copy.deepcopy(self.model)
        extra: dict[str, Any] = {}
        t0 = time.perf_counter()
        if sequential is not None:
            report = sequential_decompose(cut, self.groups, ranks, *sequential)
            extra = {"calibration": f"sequential-{sequential[1]}", "chosen": report.chosen_counts(),
                     "walk_seconds": round(report.seconds, 1)}
        summary = lord.apply_ranks(cut, self.groups, self.facts, ranks, self.total, self.lin,
                                   swap=sequential is None).metrics
        t1 = time.perf_counter()
        ppl = perplexity(cut, self.tok, self.files, self.cfg).ppl
        return {"ppl": ppl, "ppl_increase": ppl / ppl_dense - 1, "param_reduction": summary["param_reduction"],
                "linear_param_reduction": summary["linear_param_reduction"],
                "n_groups_factored": summary["n_groups_factored"], "cut_seconds": round(t1 - t0, 1),
                "eval_seconds": round(time.perf_counter() - t1, 1), **extra}


def plan_parser(doc: str, preset: dict) -> argparse.ArgumentParser:
    """--model/--stats (a flow's vocab and calibrate artifacts), --reduction and --n-windows (preset defaults)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the model the preset factors (a flow's runs/vocab/<key>)")
    ap.add_argument("--stats", type=Path, required=True, help="its statistics (a flow's runs/calibrate/<key>)")
    ap.add_argument("--reduction", type=float, default=preset["decompose"]["reduction"])
    ap.add_argument("--n-windows", type=int, default=preset["evaluate"]["n_windows"])
    return ap


def load_base(model_spec: str, stats: Path, preset: dict, n_windows: int,
              targets: tuple[str, ...] = ("*",)) -> FactoredBase:
    """The model, its ``targets`` groups' LoRD factors from the statistics file (or the dir holding it), and the
    flow evaluate stage's ppl protocol on the stdlib held-out split (never calibrated on)."""
    import torch

    import lord
    from evaluation.perplexity import PerplexityConfig
    from lord.model_ops import linear_params
    from lord.stages import STATS_FILE
    from lord.stats import load_stats
    from sources import code_split, load_model

    torch.manual_seed(0)
    model, tok = load_model(model_spec)
    groups = lord.find_groups(model, tuple(targets))
    stats_file = stats / STATS_FILE if stats.is_dir() else stats
    group_stats, _ = load_stats(stats_file, [g.name for g in groups])
    facts = lord.factorize_groups(model, groups, group_stats, ("lord",))["lord"]
    del group_stats
    cfg = PerplexityConfig(seq_len=preset["evaluate"]["seq_len"], n_windows=n_windows, batch_size=4)
    return FactoredBase(model, tok, groups, facts, lord.count_params(model), linear_params(model), cfg,
                        code_split().heldout)
