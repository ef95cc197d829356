"""Presets: named, sized bundles of stage settings, and the validated pipeline spec built from them.

A preset fixes the model and every stage's config kwargs; flow parameters override single fields. The spec is
validated once here (flow edge) and the stage configs (each package's frozen dataclass) validate their own
fields when built in ``flows.stages.build_config`` - before any compute starts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from flows.errors import FlowError

# Installed wherever lord-pipeline is (its dependencies and theirs); not networkx, the held-out "project" code.
VOCAB_PACKAGES = ("transformers", "torch", "numpy", "pandas", "scipy", "sqlalchemy", "mlflow", "prefect", "pydantic",
                  "matplotlib")
STAGES = ("vocab", "calibrate", "decompose", "refine", "quantize", "finetune", "evaluate")
# Off unless the preset enables it (``enable``) or asked (lord run --vocab): vocabulary trimming before calibration
# (vocab/), with these defaults when the preset says nothing: on the 0.5B keep=65536 removed 15.7% of all parameters at -0.08% held-out
# bits/byte, keep=32768 21.6% at +0.57% (bench/results/vocab.json).
# refine: block-wise distillation of the float LoRD factors against the layers they replace (finetune.blockwise),
# before GPTQ, so quantization starts from the better factors. The budget covers the whole stage, and on the 0.5B
# the layer forwards alone take ~8 min for 64 x 256 windows: a 5-min budget left ~1 Adam step a layer (8.382 ->
# 8.394, bench/results/refine.json), 12 min on 32 x 256 windows took LoRD -10% from 10.73 to 9.97
# (bench/results/recovery.json): those are the defaults, off unless asked (lord run --refine).
OPTIONAL_STAGES: dict[str, dict[str, Any]] = {"vocab": {"keep": 65536},
                                              "refine": {"budget_minutes": 12.0, "n_seqs": 32}}
SUPPORTED_BITS = (2, 3, 4, 8)
# GPTQ keeps Qwen's narrow GQA key/value projections (896 x 128, 2% of a layer) at 8 bits: see the default preset
KV_AT_8_BITS = ("self_attn.k_proj*", "self_attn.v_proj*")

# Sizes: smoke finishes in a few minutes on smollm2-135m; default finishes `make run` in <= 20 min on 2 cores
# with the 0.5B coder; full is the benchmark protocol. Presets opt in to HumanEval's code execution
# (allow_execution): generated code runs only inside evaluation's sandbox.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "model": "smollm2-135m",
        "bits": (4,),
        "calibrate": {"n_seqs": 16, "seq_len": 128},  # 2048 tokens > SmolLM2's widest input (1536)
        "decompose": {"method": "lord", "plan": "auto", "reduction": 0.05},
        "quantize": {"group_size": 64, "n_seqs": 8, "seq_len": 128, "batch_size": 4},
        "finetune": {"objective": "kd", "steps": 4, "kd_n_seqs": 12, "n_eval": 4, "max_seq_len": 128,
                     "micro_batch_size": 2, "grad_accum_steps": 1, "warmup_steps": 0, "eval_every": 4},
        "evaluate": {"seq_len": 256, "n_windows": 4, "humaneval_problems": 2, "humaneval_max_new_tokens": 64,
                     "allow_execution": True},
    },
    "default": {
        "model": "qwen2.5-coder-0.5b",
        "bits": (4,),
        # Measured on qwen (2-core AVX2 EPYC, float32; bench/results/make_run.json): the whole run 28.8 min, over the
        # 20-min budget: ppl evaluations 60-90 s each, HumanEval/0-39 of the final variant ~200 s, vocab 38 s,
        # calibrate 133 s, decompose 338 s (search: Fisher pass 63 s, 9 loss evaluations 262 s), GPTQ-4 416 s,
        # KD 204 s (the teacher's logits, 93 s, are cached by content: 109 s when they are). On a 2-core EPYC with
        # AVX512-BF16 (bf16 compute) the same run took 11.6 min: vocab 24 s, calibrate 30 s, decompose 135 s,
        # GPTQ-4 166 s, KD 143 s (6 steps of 16 s), final evaluation 95 s; with stop 27's GPTQ settings 11.2 min (stop 28: 11.6).
        # calibration tokens must exceed the widest group input (Qwen's down_proj reads 4864): with 16x256 the
        # Gram was rank-deficient and LoRD-10% cost ppl 6.95 -> 12.3 in a measured make run
        "calibrate": {"n_seqs": 32, "seq_len": 256},
        # A code model never uses most of its 152k-token vocabulary: trimming it to 65536 removes 15.7% of all
        # parameters at -0.08% bits/byte (bench/results/vocab.json), where any LoRD cut of the 0.5B costs >= +17%
        # ppl (every group at its parity rank: 8.17 at 1% of the trimmed model, 8.43 at 2.5%, 8.90 at 5%; dense
        # 6.955; LoRD alone at -10% 10.93). So the default trims first, then factors 1% of the trimmed model:
        # -16.5% of all parameters in all (`--no-vocab --reduction 0.1` is LoRD alone at -10%). Why 1%, not the
        # 2.5% of stops 23-27 (HumanEval-164, greedy, prompts on the tokenizer's boundary, stop 28): the trimmed
        # model passes 71 (dense 70); LoRD 1% (6 down_proj, ppl 6.975) 69; LoRD 2.5% (12 down_proj, 7.216) 60, and
        # 51 after GPTQ-4, where GPTQ-4 alone costs 3. Past ~1% the cut costs HumanEval far faster than ppl shows.
        # Token use is counted on the stdlib's calibration split *and* 2 MB of each of these installed packages:
        # counted on the stdlib alone, the 65536 kept cost +7.3% bits/byte on another project's code (networkx)
        # and +5.1% on HumanEval's text; with the packages +3.8% and +2.3%, stdlib +0.04% (domain_ppl.json).
        "enable": ("vocab",),
        "vocab": {"keep": 65536, "packages": VOCAB_PACKAGES},
        # targets: every factored group first pays an entry fee (its rank cut to parity, no parameter saved yet),
        # so a small cut is cheaper in few groups cut deeper than in all groups cut shallow. Same 2.5% on the
        # trimmed 0.5B (bench/results/speed_plan.json, dense 6.957): all 96 groups 8.382 (48 of them slower than
        # dense), the MLPs only 8.403, gate/up only 7.916, down_proj only 7.854.
        # search: the same again across layers: its least-sensitive-share candidates put the 2.5% into the 6
        # down_proj with the lowest Fisher weight, **7.242** (bench/results/lord_share.json); ~4 min of Fisher pass
        # and loss evaluations (plain uniform over all 24: 14 s).
        # skip_slow: groups that would save parameters but not time stay dense (lord/speed.py).
        "decompose": {"method": "lord", "plan": "search", "reduction": 0.01, "targets": ("*.mlp.down_proj",),
                      "skip_slow": True},
        # grid minmax: on this plan's checkpoint (mostly dense weights) the clipped grid (mse) was worse, GPTQ-4
        # 7.876 -> 7.976, and took 146 s more (bench/results/quant_grid.json). wide_layers: the first two and
        # last two layers at 8 bits, 7.782 (+29 MB); only the first and last, 7.943; group size 64, 7.896; 32
        # calibration windows, 7.828 in 2x the time: one run each, within ~0.1 of one another.
        # sym False + wide_modules k/v (stop 27, bf16, float LoRD 7.194): the symmetric grid 7.800 (1.084x float),
        # asymmetric 7.621, + k_proj/v_proj at 8 bits in every layer **7.453 (1.036x)** for +2.2 MB (k/v are
        # 896x128: 2% of a layer's weights, the narrow GQA heads every query reads); + act_order adds nothing
        # measurable (7.625 vs 7.621); down_proj at 8 bits instead 7.474 for +37 MB.
        "quantize": {"group_size": 128, "n_seqs": 16, "seq_len": 256, "wide_layers": (0, 1, -2, -1), "sym": False,
                     "wide_modules": KV_AT_8_BITS},
        # recovery = distillation from the dense teacher (finetune.kd), bounded by time. With the cached GPTQ base
        # (stop 31: 7.7 s a step, was 16-51) 2 minutes are 14-15 steps; they still do not beat the zero adapter on
        # the eval windows at lr 2e-4 (KL 0.0192 -> 0.0200; with 72 windows 0.0313 -> 0.0324), and at lr 5e-5 gain
        # 0.7% of the KL (0.03125 -> 0.03103) for a 34 MB adapter: not worth shipping, so the stage keeps its start
        # and the final artifact is the GPTQ model (319 MB). No warmup: a budgeted run has few steps.
        "finetune": {"objective": "kd", "budget_minutes": 2.0, "steps": None, "kd_n_seqs": 24, "n_eval": 4,
                     "max_seq_len": 256, "micro_batch_size": 2, "grad_accum_steps": 2, "warmup_steps": 0,
                     "eval_every": 1000},
        # HumanEval/0-39 for dense and the final variant: continuous batching (evaluation/decode.py; a CPU matmul
        # over 32 rows is ~4x more efficient per row than over 1), the dense result reused across runs from the
        # user cache (evaluation.humaneval.result_cache_dir). On an AVX2 CPU without bf16 40 problems take
        # ~4-10 min a variant in float32, so the variants in between get perplexity only (`--set` to change).
        "evaluate": {"seq_len": 512, "n_windows": 8, "humaneval_problems": 40, "humaneval_max_new_tokens": 192,
                     "humaneval_batch_size": 32, "allow_execution": True},
        "humaneval_intermediate": 0,
    },
    "full": {
        "model": "qwen2.5-coder-0.5b",
        "bits": (8, 4),
        "calibrate": {"n_seqs": 128, "seq_len": 512},
        "decompose": {"method": "lord", "plan": "search", "reduction": 0.2},
        "quantize": {"group_size": 128, "n_seqs": 128, "seq_len": 512, "sym": False,
                     "wide_modules": KV_AT_8_BITS},
        "finetune": {"objective": "kd", "budget_minutes": 15.0, "steps": None, "kd_n_seqs": 72, "n_eval": 8,
                     "max_seq_len": 512, "micro_batch_size": 1, "grad_accum_steps": 4, "warmup_steps": 4,
                     "eval_every": 50},
        "evaluate": {"seq_len": 512, "n_windows": 64, "humaneval_problems": 164, "humaneval_max_new_tokens": 512,
                     "allow_execution": True},
        # all 164 problems for dense and the final variant; the variants in between get the first 40
        "humaneval_intermediate": 40,
    },
}


@dataclass(frozen=True)
class PipelineSpec:
    """What one flow run does: the model, which stages run, and each stage's config kwargs."""

    model: str
    enabled: tuple[str, ...]
    bits: tuple[int, ...]
    stage_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    preset: str = "custom"
    # HumanEval problems for variants between dense and the final one (None: the evaluate config's own)
    humaneval_intermediate: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise FlowError(f"model={self.model!r}: expected an embedded name, hub id or local dir; "
                            "pass e.g. --model smollm2-135m.")
        unknown = [s for s in self.enabled if s not in STAGES]
        if unknown:
            raise FlowError(f"stages {unknown} are unknown; expected a subset of {list(STAGES)}.")
        if "decompose" in self.enabled and "calibrate" not in self.enabled:
            raise FlowError("decompose=True with calibrate=False: LoRD needs the calibration statistics; "
                            "enable calibrate or disable decompose.")
        if "refine" in self.enabled and "decompose" not in self.enabled:
            raise FlowError("refine=True with decompose=False: refine trains the LoRD factors that decompose "
                            "writes; enable decompose or disable refine.")
        if "quantize" in self.enabled and not self.bits:
            raise FlowError("quantize=True with bits=[]: give at least one of "
                            f"{list(SUPPORTED_BITS)} or disable quantize.")
        bad = [b for b in self.bits if b not in SUPPORTED_BITS]
        if bad:
            raise FlowError(f"bits={list(self.bits)}: {bad} not supported; expected values in "
                            f"{list(SUPPORTED_BITS)} (e.g. --bits 4 or --bits 8 4).")
        if len(set(self.bits)) != len(self.bits):
            raise FlowError(f"bits={list(self.bits)} has duplicates; give each width once.")
        if self.humaneval_intermediate is not None and not 0 <= self.humaneval_intermediate <= 164:
            raise FlowError(f"humaneval_intermediate={self.humaneval_intermediate}: expected 0..164 problems "
                            "(0 skips HumanEval for variants between dense and the final one).")
        unknown_kw = [s for s in self.stage_kwargs if s not in STAGES]
        if unknown_kw:
            raise FlowError(f"overrides for unknown stages {unknown_kw}; expected keys in {list(STAGES)}.")

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "enabled": list(self.enabled), "bits": list(self.bits),
                "stage_kwargs": copy.deepcopy(self.stage_kwargs), "preset": self.preset,
                "humaneval_intermediate": self.humaneval_intermediate}


def resolve_spec(
    preset: str = "default",
    model: str | None = None,
    reduction: float | None = None,
    bits: list[int] | None = None,
    stages: dict[str, bool | None] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> PipelineSpec:
    """Preset + flow parameters -> a validated PipelineSpec (the single place presets are read)."""
    if preset not in PRESETS:
        raise FlowError(f"preset={preset!r} is unknown; expected one of {sorted(PRESETS)}.")
    base = copy.deepcopy(PRESETS[preset])
    kwargs = {s: dict(base.get(s, OPTIONAL_STAGES.get(s, {}))) for s in STAGES}
    if reduction is not None:
        if not isinstance(reduction, (int, float)) or not 0.0 < float(reduction) < 1.0:
            raise FlowError(f"reduction={reduction!r}: expected a fraction of parameters to remove in (0, 1), "
                            "e.g. 0.2; use decompose=False for no decomposition.")
        kwargs["decompose"]["reduction"] = float(reduction)
    for stage, kv in (overrides or {}).items():
        if stage not in STAGES:
            raise FlowError(f"overrides for unknown stage {stage!r}; expected keys in {list(STAGES)}.")
        if not isinstance(kv, dict):
            raise FlowError(f"overrides[{stage!r}]={kv!r}: expected a mapping field -> value.")
        kwargs[stage].update(kv)
    # optional stages run when the preset enables them ("enable") or the caller asks; None = the preset decides
    flags = {s: s not in OPTIONAL_STAGES or s in base.get("enable", ()) for s in STAGES}
    for stage, on in (stages or {}).items():
        if stage not in STAGES:
            raise FlowError(f"stage switch {stage!r} is unknown; expected one of {list(STAGES)}.")
        if on is not None:
            flags[stage] = bool(on)
    # calibration exists only to feed decomposition, refinement only to train its factors: skipping decompose
    # skips both (an explicit refine=True without decompose is an error in PipelineSpec).
    if not flags["decompose"]:
        flags["calibrate"] = False
        if not (stages or {}).get("refine"):
            flags["refine"] = False
    return PipelineSpec(
        model=model or base["model"],
        enabled=tuple(s for s in STAGES if flags[s]),
        bits=tuple(int(b) for b in (bits if bits is not None else base["bits"])),
        stage_kwargs=kwargs,
        preset=preset,
        humaneval_intermediate=base.get("humaneval_intermediate"),
    )
