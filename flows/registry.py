"""The MLflow Model Registry side of retraining: one registered model per (base model, preset), a version per
distinct final artifact, and a gate that moves the ``champion`` alias only to a version that beats the
current champion on held-out perplexity and HumanEval pass@1 (thresholds configurable). A version that does
not pass stays a ``challenger``; the reason goes into its tags and description.

The decision (``gate``) is a pure function; everything else is MlflowClient calls.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flows.errors import FlowError

CHAMPION, CHALLENGER = "champion", "challenger"


def registered_name(model: str, preset: str) -> str:
    """``lord-<model>-<preset>`` with the characters the registry accepts (a path becomes its last part)."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", model.rstrip("/").split("/")[-1]).strip("-")
    return f"lord-{base}-{preset}"


@dataclass(frozen=True)
class GateConfig:
    """``max_ppl_ratio``: the challenger's held-out ppl must be <= champion ppl x this (1.0: no worse);
    ``min_pass_at_1_delta``: its pass@1 must be >= champion's + this (0.0: no worse; checked only when both
    have a pass@1). ``require_improvement``: at least one of the two strictly better, so a tie never churns
    the alias."""

    max_ppl_ratio: float = 1.0
    min_pass_at_1_delta: float = 0.0
    require_improvement: bool = True

    def __post_init__(self) -> None:
        if not self.max_ppl_ratio > 0:
            raise FlowError(f"gate max_ppl_ratio={self.max_ppl_ratio}: expected > 0 (1.0 = no worse than champion).")
        if not -1.0 <= self.min_pass_at_1_delta <= 1.0:
            raise FlowError(f"gate min_pass_at_1_delta={self.min_pass_at_1_delta}: expected in [-1, 1].")


def gate(new: dict[str, Any], champion: dict[str, Any] | None, cfg: GateConfig) -> tuple[bool, str]:
    """(promote?, reason) for ``new`` vs ``champion`` metrics (``ppl``, ``pass_at_1``) measured on the same
    held-out data."""
    if champion is None:
        return True, "no champion yet"
    ppl, cppl = new.get("ppl"), champion.get("ppl")
    if not isinstance(ppl, (int, float)) or not isinstance(cppl, (int, float)):
        return False, f"held-out ppl missing (new {ppl}, champion {cppl}): enable the evaluate stage"
    reasons, better = [], False
    if ppl > cppl * cfg.max_ppl_ratio:
        reasons.append(f"ppl {ppl:.4g} > champion {cppl:.4g} x {cfg.max_ppl_ratio:g}")
    better |= ppl < cppl
    p1, cp1 = new.get("pass_at_1"), champion.get("pass_at_1")
    if isinstance(p1, (int, float)) and isinstance(cp1, (int, float)):
        if p1 < cp1 + cfg.min_pass_at_1_delta:
            reasons.append(f"pass@1 {p1:.3g} < champion {cp1:.3g} + {cfg.min_pass_at_1_delta:g}")
        better |= p1 > cp1
    if reasons:
        return False, "; ".join(reasons)
    if cfg.require_improvement and not better:
        return False, f"ties the champion (ppl {ppl:.4g} vs {cppl:.4g}, pass@1 {p1} vs {cp1}): no improvement"
    return True, f"beats champion: ppl {ppl:.4g} vs {cppl:.4g}, pass@1 {p1} vs {cp1}"


def client(uri: str | None = None) -> Any:
    from mlflow.tracking import MlflowClient

    from flows.tracking import check_reachable, tracking_uri

    uri = uri or tracking_uri()
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_model(c: Any, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(name)
    except MlflowException:
        try:
            c.create_registered_model(name, description=description)
        except MlflowException:  # created concurrently
            c.get_registered_model(name)


def version_by_alias(c: Any, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def find_version(c: Any, name: str, digest: str) -> Any | None:
    """The version already registered for this exact artifact (content digest), if any."""
    hits = c.search_model_versions(f"name = '{name}' and tag.`lord.artifact_digest` = '{digest}'")
    return hits[0] if hits else None


def version_metrics(v: Any) -> dict[str, float]:
    return {k[len("metric."):]: float(x) for k, x in v.tags.items() if k.startswith("metric.")}


def set_gate_outcome(c: Any, name: str, version: str, promote: bool, reason: str) -> None:
    c.set_model_version_tag(name, version, "lord.gate", CHAMPION if promote else CHALLENGER)
    c.set_model_version_tag(name, version, "lord.gate_reason", reason)
    c.update_model_version(name, version, description=f"gate: {'promoted' if promote else 'challenger'}: {reason}")
    c.set_registered_model_alias(name, CHAMPION if promote else CHALLENGER, version)


def promote(name: str, version: str, alias: str = CHAMPION, uri: str | None = None) -> str:
    """Move ``alias`` to ``version`` by hand (``lord promote``); recorded on the version."""
    from mlflow.exceptions import MlflowException

    c = client(uri)
    try:
        c.get_model_version(name, str(version))
    except MlflowException as e:
        raise FlowError(f"model {name!r} version {version} not found; list them with `lord models`.") from e
    old = version_by_alias(c, name, alias)
    c.set_registered_model_alias(name, alias, str(version))
    c.set_model_version_tag(name, str(version), "lord.gate", f"{alias} (by hand)")
    return f"{name}: alias {alias!r} {f'v{old.version}' if old else '(none)'} -> v{version}"


def list_models(name: str | None = None, uri: str | None = None) -> list[dict[str, Any]]:
    """One row per version: aliases, gate outcome and reason, its metrics."""
    c = client(uri)
    models = [c.get_registered_model(name)] if name else c.search_registered_models()
    rows = []
    for m in models:
        for v in sorted(c.search_model_versions(f"name = '{m.name}'"), key=lambda v: int(v.version)):
            v = c.get_model_version(m.name, v.version)  # search results may omit aliases
            met = version_metrics(v)
            rows.append({"model": m.name, "version": int(v.version), "aliases": ",".join(sorted(v.aliases or [])),
                         "ppl": met.get("ppl"), "pass_at_1": met.get("pass_at_1"), "gate": v.tags.get("lord.gate"),
                         "reason": v.tags.get("lord.gate_reason"), "run_id": v.run_id})
    return rows
