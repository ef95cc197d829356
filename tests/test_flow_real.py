"""The whole pipeline on the fast real model (SmolLM2-135M) with tiny settings: every stage, HumanEval run
through the pipeline's evaluation stage (in the sandbox), and everything visible in MLflow."""

from __future__ import annotations

import json

import pytest

from bench.harness import temp_mlflow_store

pytestmark = pytest.mark.slow


def test_smollm2_every_stage_tracked(prefect_api, tmp_path):
    from mlflow.tracking import MlflowClient

    from flows.pipeline import lord_pipeline
    from sources.instructions import InstructionConfig, build_instructions_file

    data = tmp_path / "instructions.jsonl"  # real docstring -> body pairs mined from an installed package
    build_instructions_file(data, InstructionConfig(packages=("tqdm",), max_examples=16))
    overrides = {
        "calibrate": {"n_seqs": 16, "seq_len": 128},  # > every group's input dim (1536): a full-rank Gram
        "quantize": {"group_size": 64, "n_seqs": 4, "seq_len": 64},
        "finetune": {"objective": "sft", "data": str(data), "steps": 2, "n_eval": 4, "max_seq_len": 192, "micro_batch_size": 2,
                     "grad_accum_steps": 1, "warmup_steps": 0, "eval_every": 2},
        "evaluate": {"seq_len": 128, "n_windows": 2, "humaneval_problems": 1, "humaneval_max_new_tokens": 32,
                     "allow_execution": True},
    }
    with temp_mlflow_store(tmp_path) as uri:
        res = lord_pipeline(preset="smoke", model="smollm2-135m", reduction=0.02, overrides=overrides,
                            runs_dir=str(tmp_path / "runs"), experiment="real")
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["dense", "lord", "lord+gptq4", "lord+gptq4+qlora"]
    assert 2 < rows["dense"]["ppl"] < 40  # a working 135M code-capable model on stdlib code
    assert rows["lord"]["n_params"] < rows["dense"]["n_params"]
    assert rows["lord"]["ppl"] < 3 * rows["dense"]["ppl"]  # 2% reduction: damaged a little, not destroyed
    assert rows["lord+gptq4"]["size_mb"] < 0.5 * rows["lord"]["size_mb"]
    assert all(r["pass_at_1"] in (0.0, 1.0) for r in rows.values())  # one problem, greedy
    for name in ("lord", "lord+gptq4", "lord+gptq4+qlora"):  # paired with dense on the same problem
        r = rows[name]
        assert r["he_lost"] + r["he_gained"] <= 1 and r["he_p"] == 1.0
        assert rows["dense"]["pass_at_1"] - r["pass_at_1"] == r["he_lost"] - r["he_gained"]

    client = MlflowClient(tracking_uri=uri)
    kids = client.search_runs([res["experiment_id"]], f"tags.`mlflow.parentRunId` = '{res['mlflow_run_id']}'")
    by_name = {k.info.run_name: k for k in kids}
    assert set(by_name) == {"evaluate[dense]", "calibrate", "decompose", "evaluate[lord]", "quantize4",
                            "evaluate[lord+gptq4]", "finetune", "evaluate[lord+gptq4+qlora]"}
    ev = by_name["evaluate[lord+gptq4+qlora]"]
    assert "pass_at_1" in ev.data.metrics and ev.data.params["humaneval_problems"] == "1"
    samples = {a.path for a in client.list_artifacts(ev.info.run_id, "humaneval")}
    assert "humaneval/completions.jsonl" in samples  # eval samples logged, not only numbers
    local = client.download_artifacts(ev.info.run_id, "humaneval/results.jsonl", str(tmp_path))
    statuses = [json.loads(line)["status"] for line in open(local)]
    assert len(statuses) == 1 and statuses[0] in ("passed", "failed", "timeout", "error")
    assert by_name["finetune"].data.params["data"] == str(data)
