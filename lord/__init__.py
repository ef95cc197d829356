"""LoRD: activation-aware low-rank decomposition of code LLMs (Kaushal, Vaidhya, Rish 2023).

Library use (no Prefect/MLflow)::

    from lord import find_groups, collect_stats, decompose_model, DecomposeConfig
    groups = find_groups(model)
    stats = collect_stats(model, groups, ids)
    report = decompose_model(model, stats, DecomposeConfig(method="lord", plan="auto", reduction=0.1),
                             sensitivity_ids=ids[:8, :256])  # plan auto: Fisher-weighted (lord/plans.py)
"""

from lord.checkpoint import load_factored, save_factored
from lord.config import CalibConfig, DecomposeConfig
from lord.decompose import METHODS, Factorization, factorize, output_error
from lord.errors import LordError
from lord.model_ops import DecomposeReport, apply_ranks, count_params, decompose_model, factorize_groups
from lord.modules import LowRankLinear, factored_modules
from lord.plans import PLANS, PlanContext, PlanReport, get_plan, rank_plan
from lord.ranks import max_factored_rank, parity_rank, plan_summary
from lord.sensitivity import Sensitivity, probe_sensitivities, weights_of
from lord.stages import collect_stats_to_file, decompose_to_dir
from lord.stats import GroupStats, collect_stats, load_stats, save_stats
from lord.surgery import Group, find_groups

__all__ = [
    "METHODS", "PLANS", "CalibConfig", "DecomposeConfig", "DecomposeReport", "Factorization", "Group",
    "GroupStats", "LordError", "LowRankLinear", "PlanContext", "PlanReport", "Sensitivity", "apply_ranks", "collect_stats", "collect_stats_to_file",
    "count_params", "decompose_model", "decompose_to_dir", "factored_modules", "factorize", "factorize_groups",
    "find_groups", "get_plan", "load_factored", "load_stats", "max_factored_rank", "output_error", "parity_rank",
    "plan_summary", "probe_sensitivities", "rank_plan", "save_factored", "save_stats", "weights_of",
]
