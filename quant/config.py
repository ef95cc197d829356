"""QuantConfig: the one frozen config of the quantize stage, validated at the edge (STYLE.md)."""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any

from quant.errors import QuantError

SUPPORTED_BITS = (2, 3, 4, 8)
METHODS = ("gptq", "rtn")
GRIDS = ("minmax", "mse")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize every linear inside the decoder layers.

    ``group_size`` -1 means one grid per output row (per channel); otherwise it must divide each quantized
    layer's input dimension (checked per layer, since a LoRD rank sets the ``up`` factor's input dim).
    ``outlier_threshold`` enables SpQR-style float outliers (Dettmers et al. 2023, sec. 4.1): a weight stays
    in float when its quantization error scaled by the inverse-Hessian diagonal exceeds ``threshold`` times
    the layer's mean scaled variance. ``n_seqs`` x ``seq_len`` calibration tokens are drawn with ``seed``.

    LoRD factor pairs (quant/factors.py, measured in bench/quant_factors.py): ``factor_upfit`` (GPTQ only)
    quantizes each group's ``down`` first and refits + GPTQs every ``up`` against the quantized bottleneck;
    ``factor_balance`` rescales rank directions before quantizing; ``factor_rotate`` turns each group's rank
    space by a random orthogonal matrix so ``up``'s Hessian is no longer diagonal; ``down_bits`` / ``up_bits`` give the
    factors their own width (None: ``bits``). Dense linears ignore all five. ``grid="mse"`` clips every
    group's grid to its lowest rounding error instead of spanning min..max (quant.grid.fit_grid_mse).

    ``wide_layers`` (decoder layer indices, negative from the end) are quantized at ``wide_bits`` instead, every
    linear and factor in them: the first and last layers of a small model take most of its 4-bit loss (the
    layer-wise precision of llama.cpp's Q4_K_M and of mixed-precision GPTQ), and a few of them cost little size.
    ``wide_modules`` does the same across all layers for the linears whose name inside a decoder layer matches one
    of its ``fnmatch`` patterns (``self_attn.v_proj``, ``mlp.down_proj*`` for a factored one's ``down``/``up``):
    Q4_K_M's module-wise half, which gives ``attn_v`` and ``ffn_down`` more bits.
    """

    bits: int = 4
    group_size: int = 128
    act_order: bool = False
    sym: bool = True
    damp_percent: float = 0.01
    outlier_threshold: float | None = None
    method: str = "gptq"
    block_size: int = 128
    n_seqs: int = 32
    seq_len: int = 512
    seed: int = 0
    batch_size: int = 8
    corpus: str | None = None  # GPTQ calibration code: a directory or a mix (as CalibConfig.corpus); None: the stdlib
    # measured on the 0.5B's LoRD -10% factors with their calibration Grams (bench/results/quant_factors.json):
    # rotate + upfit cut a group's GPTQ-4 output error 4.7x (gate_up, layer 12), to the dense weight's level
    factor_upfit: bool = True
    factor_balance: bool = False
    factor_rotate: bool = True
    down_bits: int | None = None
    up_bits: int | None = None
    grid: str = "minmax"
    wide_layers: tuple[int, ...] = ()
    wide_modules: tuple[str, ...] = ()
    wide_bits: int = 8

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantError(f"bits={self.bits!r}; expected one of {SUPPORTED_BITS}. Use 4 or 8 for GPTQ checkpoints.")
        if self.grid not in GRIDS:
            raise QuantError(f"grid={self.grid!r}; expected one of {GRIDS}.")
        if self.grid == "mse" and self.outlier_threshold is not None:
            raise QuantError("grid='mse' with outlier_threshold: SpQR outliers fit their own grids; use one of them.")
        if self.wide_bits not in SUPPORTED_BITS:
            raise QuantError(f"wide_bits={self.wide_bits!r}; expected one of {SUPPORTED_BITS}, e.g. 8.")
        object.__setattr__(self, "wide_layers", tuple(self.wide_layers))  # a JSON list from a stage config
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.wide_layers):
            raise QuantError(f"wide_layers={self.wide_layers!r}; expected decoder layer indices, e.g. (0, 1, -2, -1).")
        object.__setattr__(self, "wide_modules", tuple(self.wide_modules))
        if not all(isinstance(p, str) and p for p in self.wide_modules):
            raise QuantError(f"wide_modules={self.wide_modules!r}; expected fnmatch patterns of linear names inside a "
                             "decoder layer, e.g. ('self_attn.v_proj', 'mlp.down_proj*').")
        if len(set(self.wide_layers)) != len(self.wide_layers):
            raise QuantError(f"wide_layers={self.wide_layers!r} has duplicates; give each layer once.")
        for name in ("down_bits", "up_bits"):
            v = getattr(self, name)
            if v is not None and v not in SUPPORTED_BITS:
                raise QuantError(f"{name}={v!r}; expected None (same as bits) or one of {SUPPORTED_BITS}.")
        if self.group_size != -1 and self.group_size < 1:
            raise QuantError(
                f"group_size={self.group_size}; expected -1 (per output channel) or a positive divisor of the "
                "layers' input dimension, e.g. 128."
            )
        if not 0.0 < self.damp_percent <= 1.0:
            raise QuantError(f"damp_percent={self.damp_percent}; expected a fraction in (0, 1], e.g. 0.01.")
        if self.method not in METHODS:
            raise QuantError(f"method={self.method!r}; expected one of {METHODS}.")
        if self.outlier_threshold is not None:
            if self.outlier_threshold <= 0:
                raise QuantError(
                    f"outlier_threshold={self.outlier_threshold}; expected a positive number (e.g. 0.2) or None."
                )
            if self.method != "gptq":
                raise QuantError(
                    f"outlier_threshold={self.outlier_threshold} with method={self.method!r}: outliers are chosen "
                    "with the GPTQ inverse Hessian; use method='gptq' or drop the threshold."
                )
        for name in ("block_size", "n_seqs", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise QuantError(f"{name}={getattr(self, name)}; expected a positive integer.")

    def wide_set(self, n_layers: int) -> frozenset[int]:
        """``wide_layers`` as non-negative indices of a decoder with ``n_layers`` layers (QuantError if outside)."""
        bad = [i for i in self.wide_layers if not -n_layers <= i < n_layers]
        if bad:
            raise QuantError(f"wide_layers {bad} are outside the model's {n_layers} decoder layers "
                             f"(valid: {-n_layers}..{n_layers - 1}).")
        # on a model with few layers (0, 1, -2, -1) overlap: the union, so a preset's choice fits any depth
        return frozenset(i % n_layers for i in self.wide_layers)

    def is_wide_module(self, name: str, patterns: tuple[str, ...] | None = None) -> bool:
        """Whether the linear ``name`` (relative to its decoder layer) matches ``wide_modules`` (or ``patterns``)."""
        return any(fnmatch.fnmatchcase(name, p) for p in (self.wide_modules if patterns is None else patterns))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
