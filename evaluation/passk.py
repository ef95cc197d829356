"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1 and Fig. 3).

With n samples of which c pass, ``pass@k = 1 - C(n-c, k) / C(n, k)``: the chance that at least one of k
samples drawn without replacement passes. The binomials overflow for realistic n, so use the product form
``C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .errors import EvalError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples with c correct (requires k <= n)."""
    if not (isinstance(n, int) and isinstance(c, int) and isinstance(k, int)):
        raise EvalError(f"pass_at_k needs ints, got n={n!r}, c={c!r}, k={k!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise EvalError(f"pass_at_k got n={n}, c={c}, k={k}; expected 0 <= c <= n and 1 <= k <= n "
                        f"(draw at least k samples per problem to report pass@{k})")
    if n - c < k:
        return 1.0
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def mean_pass_at_k(counts: Mapping[str, tuple[int, int]], ks: Iterable[int]) -> dict[str, float]:
    """Mean over problems of pass@k for each k with k <= every problem's n; ``counts[task] = (n, c)``."""
    if not counts:
        raise EvalError("mean_pass_at_k got no problems; evaluate at least one problem")
    out = {}
    min_n = min(n for n, _ in counts.values())
    for k in ks:
        if k > min_n:
            continue  # pass@k is undefined with fewer than k samples (Chen et al. report only k <= n)
        out[f"pass_at_{k}"] = sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
    return out
