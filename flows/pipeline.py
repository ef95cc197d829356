"""The ``lord-pipeline`` flow: calibrate -> decompose -> quantize (per bit width) -> finetune, with an
evaluation after every stage that produced a model (the dense baseline too), so one run is one comparison.

Every stage is ``flows.tasks.stage_task`` keyed on its config and input content hashes; results persist
under ``<runs_dir>/.prefect-results`` and artifacts under ``<runs_dir>/<stage>/<key>/``. A rerun with the
same parameters is all cache hits; a run that died mid-stage resumes at that stage. Every stage is logged
to MLflow as a nested run of the flow run's parent run, cache hits included (tagged ``cached=true``).
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from prefect import flow  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.runtime import deployment, flow_run  # noqa: E402

from flows.errors import FlowError  # noqa: E402
from flows.plots import write_plots  # noqa: E402
from flows.presets import PipelineSpec, resolve_spec  # noqa: E402
from flows.stages import STATS_FILE, build_config, config_dict  # noqa: E402
from flows.summary import summary_rows  # noqa: E402
from flows.tasks import submit_stage  # noqa: E402
from flows.tracking import Tracker  # noqa: E402


@flow(name="lord-pipeline", log_prints=True)
def lord_pipeline(
    preset: str = "default",
    model: str | None = None,
    reduction: float | None = None,
    bits: list[int] | None = None,
    vocab: bool | None = None,
    calibrate: bool = True,
    decompose: bool = True,
    refine: bool | None = None,
    quantize: bool = True,
    finetune: bool = True,
    evaluate: bool = True,
    overrides: dict[str, dict[str, Any]] | None = None,
    runs_dir: str = "runs",
    experiment: str = "lord-pipeline",
) -> dict[str, Any]:
    """Run the pipeline; returns the MLflow parent run id, per-stage records and the summary rows."""
    spec = resolve_spec(preset, model, reduction, bits,
                        {"vocab": vocab, "calibrate": calibrate, "decompose": decompose, "refine": refine,
                         "quantize": quantize, "finetune": finetune, "evaluate": evaluate}, overrides)
    cfgs = _stage_configs(spec)  # every config validated before any compute
    tracker = Tracker(experiment)  # unreachable tracking server -> FlowError, before any compute
    runner = _Runner(spec, cfgs, Path(runs_dir).resolve(), tracker)
    try:
        runner.run()
    except BaseException:
        tracker.end_parent(failed=True)
        raise
    tracker.end_parent()
    return runner.summary()


def _stage_configs(spec: PipelineSpec) -> dict[str, dict[str, Any]]:
    """Config dicts (what is hashed and logged) keyed by stage, one ``quantize<bits>`` per width."""
    out: dict[str, dict[str, Any]] = {}
    for stage in spec.enabled:
        if stage == "quantize":
            for b in spec.bits:
                out[f"quantize{b}"] = config_dict(build_config(stage, {**spec.stage_kwargs[stage], "bits": b}))
        else:
            out[stage] = config_dict(build_config(stage, spec.stage_kwargs[stage]))
    if "evaluate" in spec.enabled and spec.humaneval_intermediate is not None:
        out["evaluate_intermediate"] = config_dict(build_config(
            "evaluate", {**spec.stage_kwargs["evaluate"], "humaneval_problems": spec.humaneval_intermediate}))
    return out


class _Runner:
    """Stage sequencing and bookkeeping for one flow run (kept out of the flow body so it reads as a plan)."""

    def __init__(self, spec: PipelineSpec, cfgs: dict[str, dict[str, Any]], runs_dir: Path,
                 tracker: Tracker) -> None:
        self.spec, self.cfgs, self.runs_dir, self.tracker = spec, cfgs, runs_dir, tracker
        self.records: list[dict[str, Any]] = []
        self.variants: list[dict[str, Any]] = []

    def run(self) -> None:
        spec = self.spec
        run_id = self.tracker.start_parent(
            run_name=str(flow_run.get_name() or "lord-pipeline"),
            params={"preset": spec.preset, "model": spec.model, "stages": ",".join(spec.enabled),
                    "bits": ",".join(map(str, spec.bits)), **self.cfgs},
            tags={"prefect.flow_run_id": str(flow_run.get_id()), "prefect.flow_run_name": str(flow_run.get_name()),
                  "prefect.deployment": str(deployment.get_name() or ""), "lord.preset": spec.preset,
                  "lord.model": spec.model},
        )
        create_markdown_artifact(
            key="mlflow-run", description="MLflow parent run of this flow run",
            markdown=(f"MLflow run `{run_id}` in experiment `{self.tracker.experiment_id}` at "
                      f"`{self.tracker.uri}`.\n\nOpen: `mlflow ui --backend-store-uri {self.tracker.uri}`"),
        )
        _tag_flow_run(f"mlflow:{run_id}")
        print(f"MLflow parent run {run_id} ({self.tracker.uri})")

        current, name = spec.model, "dense"
        self._final = ("finetune" if "finetune" in spec.enabled else f"quantize{min(spec.bits)}"
                       if "quantize" in spec.enabled else "refine" if "refine" in spec.enabled
                       else "decompose" if "decompose" in spec.enabled
                       else "vocab" if "vocab" in spec.enabled else "dense")
        self._evaluate(name, current, {})
        if "vocab" in spec.enabled:  # trimmed vocabulary: LoRD then calibrates and factors the trimmed model
            trimmed = self._stage("vocab", "vocab", {"model": spec.model})
            current, name = trimmed["dir"], "vocab"
            self._evaluate(name, current, self.cfgs["vocab"], "vocab")
        if "decompose" in spec.enabled:
            stats = self._stage("calibrate", "calibrate", {"model": current})
            lord = self._stage("decompose", "decompose", {"model": current,
                                                          "stats": str(Path(stats["dir"]) / STATS_FILE)})
            current, name = lord["dir"], _join(name, "lord")
            self._evaluate(name, current, self.cfgs["decompose"], "decompose")
        if "refine" in spec.enabled:  # the float factors trained layer by layer against the layers they replace
            refined = self._stage("refine", "refine", {"model": current})
            current, name = refined["dir"], _join(name, "refine")
            self._evaluate(name, current, self.cfgs["refine"], "refine")
        if "quantize" in spec.enabled:
            base, base_name = current, name
            for b in sorted(spec.bits, reverse=True):  # the narrowest width is what finetune starts from
                q = self._stage("quantize", f"quantize{b}", {"model": base}, label=f"quantize{b}")
                current, name = q["dir"], _join(base_name, f"gptq{b}")
                self._evaluate(name, current, self.cfgs[f"quantize{b}"], f"quantize{b}")
        if "finetune" in spec.enabled:
            # LoRA on the frozen quantized base recovers what compression lost (QLoRA, Dettmers et al. 2023);
            # without a GPTQ stage the finetune stage quantizes its base to NF4 itself.
            data = self.cfgs["finetune"].get("data")  # hash the instruction file's content, not its path
            ft = self._stage("finetune", "finetune", {"model": current, **({"data": data} if data else {})})
            self._evaluate(_join(name, "qlora"), ft["dir"], self.cfgs["finetune"], "finetune")
        self._finish()

    def _stage(self, stage: str, cfg_name: str, inputs: dict[str, str], label: str | None = None) -> dict[str, Any]:
        label = label or cfg_name
        cfg = self.cfgs[cfg_name]
        state, key, out = submit_stage(stage, cfg, inputs, self.runs_dir, label)
        cached = state.name == "Cached"
        if state.is_failed() or state.is_crashed() or state.is_cancelled():
            try:
                state.result()
                err = f"{state.name}: {state.message}"
            except BaseException as e:  # noqa: BLE001 - logged to MLflow, then re-raised
                err = "".join(traceback.format_exception_only(type(e), e)).strip()
                self.tracker.log_stage(stage, label, cfg, None, cached=False,
                                       tags={"prefect.task_run_name": label, "lord.artifact_key": key},
                                       error=err)
                raise
            raise FlowError(f"stage {label} ended {err}")
        result = state.result()
        run_id = self.tracker.log_stage(stage, label, cfg, result, cached=cached,
                                        tags={"prefect.task_run_name": label,
                                              "reused_artifact": str(result.get("reused", False)).lower()})
        rec = {"stage": stage, "label": label, "key": key, "dir": str(out), "cached": cached,
               "reused": bool(result.get("reused")), "seconds": result.get("seconds", 0.0),
               "metrics": result.get("metrics", {}), "mlflow_run_id": run_id}
        self.records.append(rec)
        print(f"{label}: {'cached' if cached else 'reused' if rec['reused'] else 'computed'} -> {out}")
        return result

    def _evaluate(self, variant: str, model: str, producer_cfg: dict[str, Any], producer: str = "dense") -> None:
        record: dict[str, Any] = {"variant": variant, "model": model, "params": producer_cfg, "metrics": {}}
        if "evaluate" in self.spec.enabled:
            # dense and the final variant get the full HumanEval; those in between the preset's intermediate one
            ends = producer in ("dense", self._final) or "evaluate_intermediate" not in self.cfgs
            cfg_name = "evaluate" if ends else "evaluate_intermediate"
            res = self._stage("evaluate", cfg_name, {"model": model}, label=f"evaluate[{variant}]")
            record["metrics"] = res.get("metrics", {})
            record["eval_dir"] = self.records[-1]["dir"]
        self.variants.append(record)

    def _finish(self) -> None:
        rows = summary_rows(self.variants)
        metrics = {}
        for row in rows:
            for k in ("ppl", "pass_at_1", "size_mb", "param_reduction", "he_lost", "he_p"):
                if isinstance(row.get(k), (int, float)):
                    metrics[f"{row['variant']}.{k}"] = float(row[k])
        metrics["stages_computed"] = float(sum(not r["cached"] and not r["reused"] for r in self.records))
        metrics["stages_cached"] = float(sum(r["cached"] or r["reused"] for r in self.records))
        self.tracker.log_parent_metrics(metrics)
        self.tracker.log_parent_json("summary.json", {"model": self.spec.model, "preset": self.spec.preset,
                                                      "rows": rows, "stages": self.records})
        for png in write_plots(rows, self.records, self.runs_dir / ".plots" / self.tracker.parent_id):
            self.tracker.log_parent_file(png, "plots")
        if rows:
            create_table_artifact(key="lord-summary", table=rows, description="lord-pipeline summary")

    def summary(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.tracker.parent_id, "experiment_id": self.tracker.experiment_id,
                "tracking_uri": self.tracker.uri, "preset": self.spec.preset, "model": self.spec.model,
                "stages": self.records, "rows": summary_rows(self.variants),
                "final_model": self.variants[-1]["model"] if self.variants else None}


def _join(base: str, step: str) -> str:
    return step if base == "dense" else f"{base}+{step}"


def _tag_flow_run(tag: str) -> None:
    """Put the MLflow run id on the Prefect flow run (searchable in the Prefect UI and API)."""
    from prefect.client.orchestration import get_client

    run_id = flow_run.get_id()
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        client.update_flow_run(run_id, tags=[*flow_run.get_tags(), tag])
