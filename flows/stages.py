"""The stage registry: which library function and config class each pipeline stage calls, content hashes of
stage inputs, and the one call per stage. No Prefect or MLflow here, so this is plain, testable plumbing.

A stage's identity (its cache key) is ``sha256(stage, config.to_dict(), input content hashes, code hash)``:
the same inputs, config and library code give the same artifact dir ``<runs>/<stage>/<key>/``, so a finished
artifact is found again by any later run, Prefect cache or not, and an edited algorithm is never served
from a stale cache.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from artifacts import MANIFEST, atomic_dir, content_digest, sha256_file, sha256_json, write_json_atomic
from flows import faults
from flows.errors import FlowError

# Bump when the meaning of an artifact changes without its config or code changing (invalidates every entry).
CACHE_VERSION = "1"


@dataclass(frozen=True)
class StageSpec:
    function: str  # "module:attr" of the library entry point (docs/CONTRACTS.md)
    config: str  # "module:Class" of its frozen config dataclass


REGISTRY: dict[str, StageSpec] = {
    "vocab": StageSpec("vocab:trim_to_dir", "vocab:VocabConfig"),
    "calibrate": StageSpec("lord:collect_stats_to_file", "lord:CalibConfig"),
    "decompose": StageSpec("lord:decompose_to_dir", "lord:DecomposeConfig"),
    "refine": StageSpec("finetune:blockwise_to_dir", "finetune:BlockwiseConfig"),
    "quantize": StageSpec("quant:quantize_to_dir", "quant:QuantConfig"),
    "finetune": StageSpec("finetune:finetune_to_dir", "finetune:FinetuneConfig"),
    "evaluate": StageSpec("evaluation:evaluate_to_dir", "evaluation:EvalConfig"),
}
# Packages whose code shapes each stage's artifact (evaluation loads every artifact kind, so all loaders).
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "vocab": ("vocab", "sources", "artifacts"),
    "calibrate": ("lord", "forward", "sources", "artifacts"),
    "decompose": ("lord", "forward", "sources", "artifacts"),
    "refine": ("finetune", "lord", "forward", "sources", "artifacts"),
    "quantize": ("quant", "lord", "forward", "sources", "artifacts"),
    "finetune": ("finetune", "quant", "lord", "forward", "sources", "artifacts"),
    "evaluate": ("evaluation", "finetune", "quant", "lord", "forward", "sources", "artifacts"),
}
STATS_FILE = "stats.safetensors"


def _import(ref: str, stage: str) -> Any:
    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise FlowError(
            f"stage {stage!r} needs {ref}, which is not importable ({e}); disable the stage "
            f"(e.g. --no-{stage}) or install the package that provides it."
        ) from e


def build_config(stage: str, kwargs: dict[str, Any]) -> Any:
    """Build (and so validate) the stage's frozen config; unknown fields get a message listing valid ones."""
    cls = _import(REGISTRY[stage].config, stage)
    try:
        return cls(**kwargs)
    except TypeError as e:
        fields = list(inspect.signature(cls).parameters)
        raise FlowError(f"{stage} config {kwargs}: {e}; valid fields of {cls.__name__} are {fields}.") from e


def config_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(cfg.to_dict(), sort_keys=True, default=str))


def content_hash(model: str) -> str:
    """Content hash of a stage input: an artifact dir's manifest digest, a plain dir's file digests, a file's
    digest, or (for an embedded/hub name, pinned by its package version) the name itself."""
    p = Path(model)
    if p.is_dir():
        return content_digest(p)  # manifest digest without metrics.json (timings)
    if p.is_file():
        manifest = p.parent / MANIFEST  # a file inside an artifact: its checksum is already on record
        entries = json.loads(manifest.read_text()) if manifest.is_file() else {}
        return entries[p.name]["sha256"] if p.name in entries else sha256_file(p)
    return sha256_json({"name": model})


def stage_key(stage: str, cfg: dict[str, Any], inputs: dict[str, str]) -> str:
    # the compute dtype "auto" resolves to (this machine, $LORD_DTYPE) changes results: bf16 != float32 numbers
    return sha256_json({"stage": stage, "config": cfg, "inputs": inputs, "code": code_hash(stage),
                        "implicit": implicit_inputs(stage, cfg), "compute_dtype": process_compute_dtype(),
                        "v": CACHE_VERSION})[:20]


# stages that read the default code corpus (calibration batches, sensitivity/validation ids, held-out windows)
CORPUS_STAGES = ("calibrate", "decompose", "quantize", "evaluate")


def implicit_inputs(stage: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Digests of what a stage reads besides its config and input artifacts, so a changed corpus or
    training data is never served from the cache: the code corpus (its content, e.g. another Python's
    stdlib), a fine-tuning data file, or the versions of the packages the default instruction set is mined from."""
    from sources import code_split

    out: dict[str, Any] = {}
    if stage in CORPUS_STAGES or (stage == "vocab" and not cfg.get("corpus")):
        # a user corpus (CalibConfig/DecomposeConfig/QuantConfig.corpus, EvalConfig.heldout_root) or the stdlib
        root = cfg.get("corpus") or cfg.get("heldout_root") if stage in CORPUS_STAGES else None
        out["corpus"] = code_split(root).digest
    if stage == "vocab" and cfg.get("corpus"):
        from sources.corpus import is_mix

        out["corpus"] = (code_split(cfg["corpus"]).digest if is_mix(cfg["corpus"])
                         else content_digest(Path(cfg["corpus"]).expanduser()))
    if stage == "vocab" and cfg.get("packages"):  # the installed code token use is also counted on
        from sources.instructions import installed_versions

        out["packages"] = installed_versions(tuple(cfg["packages"]))
    if stage == "refine":  # calibration windows of a user code directory, or the stdlib's; a named teacher's weights
        out["corpus"] = code_split(cfg.get("data")).digest
        if cfg.get("teacher"):
            out["teacher"] = content_hash(cfg["teacher"])
    if stage == "finetune":
        if cfg.get("data"):  # instruction JSONL (sft) or a directory of code to distil on (kd)
            from sources.corpus import is_code_spec

            data = cfg["data"]
            out["data"] = code_split(data).digest if is_code_spec(data) else sha256_file(Path(data).expanduser())
        else:
            from sources.instructions import DEFAULT_PACKAGES, installed_versions

            out["instruction_packages"] = installed_versions(DEFAULT_PACKAGES)
    return out


def process_compute_dtype() -> str:
    """What a stage's ``dtype="auto"`` resolves to in this process (sources/compute.py)."""
    import warnings

    from sources.compute import compute_dtype, dtype_name

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dtype_name(compute_dtype("cpu"))


@functools.cache
def code_hash(stage: str) -> str:
    """Digest of the Python sources a stage's output depends on (its package and the loaders it uses).
    Computed once per process, so one run sees one version of the code."""
    digests = {}
    for package in STAGE_CODE[stage]:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            for f in sorted(Path(root).rglob("*.py")):
                digests[f"{package}/{f.relative_to(root)}"] = sha256_file(f)
    return sha256_json(digests)


def artifact_dir(runs_dir: Path, stage: str, key: str) -> Path:
    return Path(runs_dir) / stage / key


def run_stage(stage: str, cfg_dict: dict[str, Any], inputs: dict[str, str], out_dir: Path) -> dict[str, Any]:
    """Call the library function of ``stage`` into ``out_dir`` and return its metrics dict.

    ``inputs`` holds paths: ``model`` always, ``stats`` for decompose. Calibration writes one file, so it is
    wrapped in an atomic dir here; the other stage functions write ``out_dir`` atomically themselves.
    """
    faults.maybe_fail(stage)
    faults.maybe_kill_midwrite(stage, Path(out_dir))
    fn = _import(REGISTRY[stage].function, stage)
    cfg = build_config(stage, cfg_dict)
    model = inputs["model"]
    if stage == "calibrate":
        with atomic_dir(out_dir) as tmp:
            metrics = dict(fn(model, tmp / STATS_FILE, cfg) or {})
            metrics["stats_path"] = str(Path(out_dir) / STATS_FILE)  # where it lives after the rename
            write_json_atomic(tmp / "metrics.json", metrics)
            write_json_atomic(tmp / "config.json", cfg_dict)
        return metrics
    if stage == "decompose":
        return fn(model, Path(inputs["stats"]), cfg, out_dir) or {}
    return fn(model, cfg, out_dir) or {}
