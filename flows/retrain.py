"""The ``retrain`` flow: the pipeline on the user's code corpus and instruction data, then the Model Registry
gate. Scheduled weekly by the ``retrain`` deployment (prefect.yaml).

The corpus directory feeds calibration, the plan's loss batches, GPTQ calibration (its calibration split) and
the held-out evaluation (its held-out split, never seen by the others); the data file feeds finetuning. Their
content digests are in the stage cache keys (flows/stages.py ``path_digests``), so an unchanged week is all
cache hits and an edited corpus reruns exactly the stages that read it. The final model is registered as a
version of ``lord-<model>-<preset>`` (one version per distinct artifact), and ``champion`` moves to it only
when it beats the current champion, re-evaluated on the *same* current held-out split (flows/registry.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from prefect import flow

from flows.errors import FlowError
from flows.pipeline import _stage_configs, lord_pipeline
from flows.presets import resolve_spec
from flows.registry import (
    CHAMPION,
    GateConfig,
    client,
    ensure_model,
    find_version,
    gate,
    registered_name,
    set_gate_outcome,
    version_by_alias,
)
from flows.stages import content_hash
from flows.tasks import submit_stage
from flows.tracking import tracking_uri

CORPUS_FIELDS = {"calibrate": "corpus", "decompose": "corpus", "quantize": "corpus", "evaluate": "heldout_root",
                 "vocab": "corpus", "refine": "data"}


def user_overrides(corpus: str | None, data: str | None,
                   overrides: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Point every stage that reads code at ``corpus`` and finetuning at ``data`` (explicit overrides win)."""
    from sources import SourceError, code_split
    from sources.corpus import is_mix

    out: dict[str, dict[str, Any]] = {}
    for path, what in ((corpus, "corpus directory"), (data, "instruction data file")):
        if path is not None and not is_mix(path) and not Path(path).expanduser().exists():
            raise FlowError(f"{what} {path!r} does not exist; pass an existing path.")
    if corpus is not None:
        if is_mix(corpus):  # e.g. "stdlib,pkg:numpy": every root must resolve before any stage starts
            try:
                code_split(corpus)
            except SourceError as e:
                raise FlowError(f"corpus {corpus!r}: {e}") from e
            root = corpus
        elif not Path(corpus).expanduser().is_dir():
            raise FlowError(f"corpus {corpus!r} is not a directory; pass a directory of .py files or a mix "
                            f"such as 'stdlib,pkg:numpy'.")
        else:
            root = str(Path(corpus).expanduser().resolve())
        for stage, fld in CORPUS_FIELDS.items():
            out.setdefault(stage, {})[fld] = root
    if data is not None:
        out.setdefault("finetune", {})["data"] = str(Path(data).expanduser().resolve())
    for stage, kv in (overrides or {}).items():
        out.setdefault(stage, {}).update(kv)
    return out


@flow(name="lord-retrain", log_prints=True)
def lord_retrain(
    preset: str = "full",
    model: str | None = None,
    corpus: str | None = None,
    data: str | None = None,
    reduction: float | None = None,
    bits: list[int] | None = None,
    finetune: bool = True,
    overrides: dict[str, dict[str, Any]] | None = None,
    max_ppl_ratio: float = 1.0,
    min_pass_at_1_delta: float = 0.0,
    registered_model: str | None = None,
    runs_dir: str = "runs",
    experiment: str = "lord-retrain",
) -> dict[str, Any]:
    """Run the pipeline on the user's data, register the final model and apply the champion gate."""
    gate_cfg = GateConfig(max_ppl_ratio=max_ppl_ratio, min_pass_at_1_delta=min_pass_at_1_delta)
    ov = user_overrides(corpus, data, overrides)
    spec = resolve_spec(preset, model, reduction, bits, {"finetune": finetune}, ov)
    eval_cfg = _stage_configs(spec).get("evaluate")
    if eval_cfg is None:
        raise FlowError("retrain needs the evaluate stage: the gate compares held-out ppl and pass@1.")
    name = registered_model or registered_name(spec.model, spec.preset)
    reg = client()  # unreachable registry -> FlowError before any compute
    result = lord_pipeline(preset=preset, model=model, reduction=reduction, bits=bits, finetune=finetune,
                           overrides=ov, runs_dir=runs_dir, experiment=experiment)
    final = result["final_model"]
    row = result["rows"][-1]
    new = {"ppl": row.get("ppl"), "pass_at_1": row.get("pass_at_1")}
    digest = content_hash(final)
    ensure_model(reg, name, f"LoRD pipeline ({spec.model}, preset {spec.preset}); champion = gated best")
    champ = version_by_alias(reg, name, CHAMPION)
    out: dict[str, Any] = {"registered_model": name, "run_id": result["mlflow_run_id"], "metrics": new,
                           "artifact": final, "pipeline": result}
    if champ is not None and champ.tags.get("lord.artifact_digest") == digest:
        out.update(version=int(champ.version), promoted=False, champion=int(champ.version),
                   reason="unchanged: the final artifact is the champion's (inputs and code unchanged)")
        reg.set_tag(result["mlflow_run_id"], "lord.gate", out["reason"])
        print(out["reason"])
        return out
    version = find_version(reg, name, digest) or _register(reg, name, result["mlflow_run_id"], final, digest, new,
                                                           corpus, data)
    champ_metrics = None
    if champ is not None:  # re-measured on today's held-out split, through the (content-keyed) stage cache
        champ_dir = _champion_dir(reg, champ, Path(runs_dir))
        state, _, _ = submit_stage("evaluate", eval_cfg, {"model": champ_dir}, Path(runs_dir).resolve(),
                                   f"evaluate[champion v{champ.version}]")
        m = state.result()["metrics"]
        champ_metrics = {"ppl": m.get("ppl"), "pass_at_1": m.get("pass_at_1")}
    promote, reason = gate(new, champ_metrics, gate_cfg)
    set_gate_outcome(reg, name, version.version, promote, reason)
    if champ_metrics:
        for k, v in champ_metrics.items():
            if v is not None:
                reg.set_model_version_tag(name, version.version, f"gate.champion_{k}", str(v))
    reg.set_tag(result["mlflow_run_id"], "lord.registered_version", f"{name}/{version.version}")
    reg.set_tag(result["mlflow_run_id"], "lord.gate", f"{'promoted' if promote else 'challenger'}: {reason}")
    print(f"{name} v{version.version}: {'champion' if promote else 'challenger'} ({reason})")
    out.update(version=int(version.version), promoted=promote, reason=reason, champion_metrics=champ_metrics,
               champion=int(version.version) if promote else (int(champ.version) if champ else None))
    return out


def _register(reg: Any, name: str, run_id: str, final: str, digest: str, metrics: dict[str, Any],
              corpus: str | None, data: str | None) -> Any:
    """Log the artifact dir to the pipeline's parent run (``model/``) and register it as a new version."""
    reg.log_artifacts(run_id, final, "model")
    source = f"{reg.get_run(run_id).info.artifact_uri.rstrip('/')}/model"
    tags = {"lord.artifact_digest": digest, "lord.artifact_dir": str(Path(final).resolve()),
            **{f"metric.{k}": str(v) for k, v in metrics.items() if v is not None}}
    if corpus:
        tags["lord.corpus_digest"] = content_hash(str(Path(corpus).expanduser()))
    if data:
        tags["lord.data_digest"] = content_hash(str(Path(data).expanduser()))
    return reg.create_model_version(name, source, run_id=run_id, tags=tags)


def _champion_dir(reg: Any, champ: Any, runs_dir: Path) -> str:
    """The champion's artifact dir: the local copy when this machine has it, else downloaded from MLflow."""
    local = champ.tags.get("lord.artifact_dir")
    if local and Path(local).is_dir() and content_hash(local) == champ.tags.get("lord.artifact_digest"):
        return local
    from mlflow.artifacts import download_artifacts

    dest = runs_dir.resolve() / ".registry" / champ.name / f"v{champ.version}"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    return download_artifacts(artifact_uri=champ.source, dst_path=str(dest), tracking_uri=tracking_uri())
