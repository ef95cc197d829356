"""Stage configs (frozen, validated at the edge, logged as params by flows/)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from lord.decompose import METHODS
from lord.errors import LordError
from lord.plans import PLANS
from lord.sequential import CALIBRATIONS, MODES
from lord.stats import STATISTICS

SENSITIVITIES = ("probe", "fisher")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration: ``n_seqs`` windows of ``seq_len`` tokens from the corpus's calibration files (seeded).

    ``statistic``: ``"auto"`` keeps the cheaper second moment per group (output covariance for a single
    narrowing linear, lord/stats.py), ``"input"`` the input Gram everywhere (e.g. to inspect ``G`` itself).
    """

    n_seqs: int = 64
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 4
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    statistic: str = "auto"
    dtype: str = "auto"  # forward dtype (sources/compute.py); Grams still accumulate fp32 per batch into fp64
    # a directory of .py files or a mix ("stdlib,pkg:numpy", sources.corpus); its calibration split. None: the stdlib
    corpus: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16"):  # sources.compute.DTYPE_CHOICES
            raise LordError(f"CalibConfig dtype={self.dtype!r}; expected auto, float32 or bfloat16")
        if self.statistic not in STATISTICS:
            raise LordError(f"statistic {self.statistic!r} is unknown; expected one of {STATISTICS}")
        if self.n_seqs < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise LordError(f"CalibConfig needs n_seqs >= 1, seq_len >= 2, batch_size >= 1; got "
                            f"{self.n_seqs}, {self.seq_len}, {self.batch_size}")
        _check_patterns(self.targets, self.ignore)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DecomposeConfig:
    """Decomposition: method, rank plan and its target (see lord/plans.py for the plans, lord/ranks.py for the exact definitions).

    ``reduction``: whole-model parameter reduction to reach (fraction of all parameters) for every plan;
    ``rank_reduction`` (uniform plan only, instead of ``reduction``): the same ``1 - r/min(m, n)`` for every
    group. ``damping`` only affects ``whiten`` (fraction of the Gram's mean diagonal added before Cholesky).
    ``sensitivity_*`` (plan ``auto`` only, lord/sensitivity.py): the loss-probe batch (``sensitivity_seqs``
    windows of ``sensitivity_seq_len`` calibration tokens, ``sensitivity_seed``) and the probe rank as a
    fraction of each group's largest factored rank (``sensitivity="probe"`` only; the default ``"fisher"``
    needs one backward over the same batch and measured far better, see lord/plans.py).
    """

    method: str = "lord"
    # measured: picks Fisher-weighted auto on smollm2-135m (ppl 19.7 vs uniform 27.4 at -20%) and avoids it on
    # qwen2.5-coder-0.5b, where auto lost to uniform (52.4 vs 29.0); bench/results/lord_plans.json
    plan: str = "search"
    reduction: float | None = 0.1
    rank_reduction: float | None = None
    targets: tuple[str, ...] = ("*",)
    ignore: tuple[str, ...] = ()
    damping: float = 0.01
    sensitivity_seqs: int = 8
    sensitivity_seq_len: int = 256
    sensitivity_seed: int = 1
    probe_fraction: float = 0.75
    sensitivity: str = "fisher"  # "fisher" (one backward) or "probe" (per-group loss probes), lord/sensitivity.py
    # "parallel": every group from the dense model's statistics (one pass); "sequential": layer by layer, each
    # group fitted on the already-compressed model's inputs toward the dense output (lord/sequential.py), with
    # the plan's ranks; sequential_mode "compensate" (best candidate per group) or "stats" (LoRD on those inputs)
    calibration: str = "parallel"
    sequential_mode: str = "compensate"
    corpus: str | None = None  # code corpus of the plan's loss batches (as CalibConfig.corpus)
    # leave dense every group the plan would put where it saves parameters but not time (near its parity rank,
    # lord/speed.py) and re-plan the cut over the rest (lord.plans.plan_fast_groups); off = the paper's plans
    skip_slow: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LordError(f"method {self.method!r} is unknown; expected one of {METHODS}")
        if self.plan not in PLANS:
            raise LordError(f"plan {self.plan!r} is unknown; expected one of {tuple(PLANS)}")
        if self.rank_reduction is not None:
            if self.plan != "uniform":
                raise LordError(f"rank_reduction={self.rank_reduction} applies to plan 'uniform' only, got "
                                f"plan {self.plan!r}; use `reduction` (parameter reduction) for it")
            if not 0 < self.rank_reduction < 1:
                raise LordError(f"rank_reduction must be in (0, 1), got {self.rank_reduction}")
        elif self.reduction is None or not 0 < self.reduction < 1:
            raise LordError(f"reduction must be a parameter-reduction fraction in (0, 1), got {self.reduction}")
        if self.damping < 0:
            raise LordError(f"damping must be >= 0, got {self.damping}")
        if self.sensitivity_seqs < 1 or self.sensitivity_seq_len < 2:
            raise LordError(f"sensitivity_seqs must be >= 1 and sensitivity_seq_len >= 2, got "
                            f"{self.sensitivity_seqs}, {self.sensitivity_seq_len}")
        if self.calibration not in CALIBRATIONS or self.sequential_mode not in MODES:
            raise LordError(f"calibration {self.calibration!r} / sequential_mode {self.sequential_mode!r}: expected "
                            f"one of {CALIBRATIONS} / {MODES}")
        if self.sensitivity not in SENSITIVITIES:
            raise LordError(f"sensitivity {self.sensitivity!r} is unknown; expected one of {SENSITIVITIES}")
        if not 0 < self.probe_fraction <= 1:
            raise LordError(f"probe_fraction must be in (0, 1] (of each group's largest factored rank), got "
                            f"{self.probe_fraction}")
        if not isinstance(self.skip_slow, bool):
            raise LordError(f"skip_slow must be true or false, got {self.skip_slow!r}")
        _check_patterns(self.targets, self.ignore)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_patterns(targets: tuple[str, ...], ignore: tuple[str, ...]) -> None:
    for name, pats in (("targets", targets), ("ignore", ignore)):
        if isinstance(pats, str) or not all(isinstance(p, str) for p in pats):
            raise LordError(f"{name} must be a tuple of glob strings (e.g. ('*.mlp.*',)), got {pats!r}")
    if not targets:
        raise LordError("targets is empty: nothing would be factored; use ('*',) for every group")
