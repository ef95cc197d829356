"""FinetuneConfig: the one frozen, validated config of the QLoRA stage (logged as params, hashed for caching)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .errors import FinetuneError

# Llama/Qwen2 attention and MLP projections. A LoRD-factored projection keeps its name and gains `.down`
# and `.up` children (docs/CONTRACTS.md); those are targeted through the same names.
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                    "c_attn", "c_proj", "c_fc")
SCHEDULERS = ("cosine", "linear", "constant")
BASES = ("nf4", "float")
OBJECTIVES = ("sft", "kd")
CLOCKS = ("wall", "process")
LORA_INITS = ("zero", "eora")


@dataclass(frozen=True)
class FinetuneConfig:
    """QLoRA hyper-parameters (Dettmers et al. 2023, sec. 3: NF4 + double quantization + LoRA on every
    linear) plus the training-loop knobs.

    ``objective``: ``sft`` trains on instruction answers (``data`` = a JSONL file; None builds the default
    docstring -> function set of ``n_examples``); ``kd`` distils the dense ``teacher``'s next-token distribution
    (top-``kd_top_k`` + tail mass, precomputed once and cached by content, see finetune.kd) over ``kd_n_seqs``
    code windows of ``max_seq_len`` tokens (``data`` = a directory of .py files or a corpus mix such as
    ``"stdlib,pkg:numpy"``; None = the stdlib; always the calibration split, never the held-out one).
    ``teacher=None``: the model the input was compressed from (followed through the artifacts' ``source``).
    ``lora_init``: ``zero`` (peft's B = 0: training starts from the 4-bit base) or ``eora`` (B A = the rank-r,
    activation-weighted approximation of the base's quantization error on ``init_n_seqs`` calibration windows,
    finetune.eora: training starts closer to the float model).
    ``steps`` counts optimizer steps (each sees ``micro_batch_size * grad_accum_steps`` examples) and may be
    None when ``budget_minutes`` bounds the run instead; with both, whichever ends first. ``dtype``:
    forwards/backwards under bf16 autocast where the hardware has it (losses in fp32), float32 elsewhere
    (sources.compute).
    """

    objective: str = "sft"
    budget_minutes: float | None = None
    budget_clock: str = "wall"  # "process": CPU seconds / threads (same compute for compared runs on a busy CPU)
    teacher: str | None = None
    kd_top_k: int = 32
    kd_n_seqs: int = 128
    kd_cache_dir: str | None = None
    dtype: str = "auto"  # compute dtype of forwards/backwards (sources.compute: bf16 only where native)
    data: str | None = None
    n_examples: int = 2000
    n_eval: int = 64
    max_seq_len: int = 256
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_init: str = "zero"
    init_n_seqs: int = 16
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    base: str = "nf4"
    double_quant: bool = True
    steps: int | None = 100
    micro_batch_size: int = 4
    grad_accum_steps: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    eval_every: int = 25
    early_stop_patience: int = 3
    early_stop_min_delta: float = 0.0
    merge: bool = True
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward: less memory, ~30% slower
    # GPTQ base: keep one dequantized copy of each layer for the run (True), dequantize at every call (False),
    # or cache when the copies need <= 25% of free memory (None; finetune.gptq_lora.base_cache_fits)
    cache_base: bool | None = None
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):  # from JSON / CLI
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        positive = {"n_examples": self.n_examples, "max_seq_len": self.max_seq_len, "lora_r": self.lora_r,
                    "steps": 1 if self.steps is None else self.steps, "micro_batch_size": self.micro_batch_size,
                    "grad_accum_steps": self.grad_accum_steps, "eval_every": self.eval_every}
        for name, value in positive.items():
            if value < 1:
                raise FinetuneError(f"FinetuneConfig.{name}={value}; expected an integer >= 1.")
        if self.n_eval < 1:
            raise FinetuneError(f"FinetuneConfig.n_eval={self.n_eval}; expected >= 1 held-out examples for eval loss.")
        if self.max_seq_len < 16:
            raise FinetuneError(f"max_seq_len={self.max_seq_len}; expected >= 16 tokens (prompt + answer).")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise FinetuneError(f"lora_dropout={self.lora_dropout}; expected 0 <= p < 1.")
        if self.lr <= 0 or self.lora_alpha <= 0:
            raise FinetuneError(f"lr={self.lr}, lora_alpha={self.lora_alpha}; both must be > 0.")
        if self.lora_init not in LORA_INITS:
            raise FinetuneError(f"lora_init={self.lora_init!r}; expected one of {LORA_INITS} ('eora' starts the "
                                f"adapter from the base's quantization error).")
        if self.cache_base not in (None, True, False):
            raise FinetuneError(f"cache_base={self.cache_base!r}; expected true (keep one dequantized copy of each GPTQ "
                                f"layer), false (dequantize at every call) or null (cache when it fits in memory).")
        if self.init_n_seqs < 1:
            raise FinetuneError(f"init_n_seqs={self.init_n_seqs}; expected >= 1 calibration windows for lora_init.")
        if self.scheduler not in SCHEDULERS:
            raise FinetuneError(f"scheduler={self.scheduler!r}; expected one of {SCHEDULERS}.")
        if self.base not in BASES:
            raise FinetuneError(f"base={self.base!r}; expected one of {BASES} ('nf4' is QLoRA, 'float' plain LoRA).")
        if self.objective not in OBJECTIVES:
            raise FinetuneError(f"objective={self.objective!r}; expected one of {OBJECTIVES} ('kd' distils the dense "
                                f"teacher, 'sft' trains on instruction answers).")
        if self.steps is None and not self.budget_minutes:
            raise FinetuneError("steps=None and no budget_minutes: give a step count, a time budget, or both.")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise FinetuneError(f"budget_minutes={self.budget_minutes}; expected > 0 minutes (or None: no budget).")
        from sources.compute import DTYPE_CHOICES

        if self.dtype not in DTYPE_CHOICES:
            raise FinetuneError(f"dtype={self.dtype!r}; expected one of {DTYPE_CHOICES} (auto: bf16 only where the "
                                f"CPU/GPU multiplies it natively).")
        if self.budget_clock not in CLOCKS:
            raise FinetuneError(f"budget_clock={self.budget_clock!r}; expected one of {CLOCKS}.")
        if self.kd_top_k < 1 or self.kd_n_seqs < 1:
            raise FinetuneError(f"kd_top_k={self.kd_top_k}, kd_n_seqs={self.kd_n_seqs}; both must be >= 1.")
        if self.objective == "kd" and self.kd_n_seqs <= self.n_eval:
            raise FinetuneError(f"kd_n_seqs={self.kd_n_seqs} <= n_eval={self.n_eval}: KD holds out n_eval of its "
                                f"windows for the eval loss; raise kd_n_seqs or lower n_eval.")
        if not 0 <= self.warmup_steps < (self.steps or 10**9) + 1:
            raise FinetuneError(f"warmup_steps={self.warmup_steps}; expected 0 <= warmup_steps <= steps={self.steps}.")
        if self.early_stop_patience < 0:
            raise FinetuneError(f"early_stop_patience={self.early_stop_patience}; expected >= 0 (0 disables).")
        if not self.target_modules:
            raise FinetuneError("target_modules is empty; name the projections to adapt, e.g. ('q_proj', 'v_proj').")
        if isinstance(self.target_modules, str):
            raise FinetuneError(f"target_modules={self.target_modules!r}; expected a tuple of names, not a string.")

    @property
    def examples_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
