"""Factored modules (docs/CONTRACTS.md): ``LowRankLinear`` with ``.down`` (in -> r) and ``.up`` (r -> out).

The definition lives in ``lord/modeling/modeling_lord.py`` because that file is shipped inside every
checkpoint for ``trust_remote_code`` loading and must be self-contained; this module is its library face.
"""

from __future__ import annotations

from lord.modeling.modeling_lord import LowRankLinear, install_group, install_rank_map

__all__ = ["LowRankLinear", "install_group", "install_rank_map", "factored_modules"]


def factored_modules(model) -> dict[str, LowRankLinear]:
    """Qualified name -> LowRankLinear for every factored projection in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
