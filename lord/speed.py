"""A small time model of a factored group, to flag groups that save parameters but cannot save time.

On a CPU a linear layer's time is its weight traffic (decode: every weight read once per step; prefill: FLOPs,
also proportional to the weights) plus a fixed cost per matmul call. A group of ``k`` members with ``m x n``
stacked weight runs ``k`` matmuls dense and ``k + 1`` factored (the shared ``down``), so its modelled time
ratio is ``(r (m + n) + (k + 1) C) / (m n + k C)`` with ``C`` the call cost in weight elements. A group whose
ratio does not beat dense by ``MIN_GAIN`` (within kernel-shape noise, bench/results/speed.json) is flagged
``slow`` in the rank map: it saves parameters, but do not expect it to save time.
"""

from __future__ import annotations

# one matmul call ~ 25 us ~ reading 32k float32 weights at ~5 GB/s (2 cores, bench/speed.py decode figures)
CALL_COST_ELEMENTS = 32_768
MIN_GAIN = 0.02


def modelled_time_ratio(m: int, n: int, rank: int | None, members: int = 1) -> float:
    """Factored / dense time of one group under the weight-traffic + per-call model (1.0 when dense)."""
    if rank is None:
        return 1.0
    return (rank * (m + n) + (members + 1) * CALL_COST_ELEMENTS) / (m * n + members * CALL_COST_ELEMENTS)


def is_slow(m: int, n: int, rank: int | None, members: int = 1, min_gain: float = MIN_GAIN) -> bool:
    """True for a factored group whose modelled time gain is below ``min_gain``."""
    return rank is not None and modelled_time_ratio(m, n, rank, members) > 1.0 - min_gain
