#!/usr/bin/env bash
# End-to-end deployment check: start Prefect server + MLflow server + a process worker on free loopback
# ports (`lord serve`, everything under a temp LORD_SERVE_HOME), register prefect.yaml's deployments, run
# `prefect deployment run lord-pipeline/default` with tiny parameters, wait for Completed, verify the MLflow
# parent + nested runs on the server and the weekly schedule of `retrain`, then shut everything down.
# Writes bench/results/deployment_check.json. Usage: bench/deployment_check.sh   (~2 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${BIN:-$ROOT/.venv/bin}
export LORD_SERVE_HOME=${LORD_SERVE_HOME:-$(mktemp -d /tmp/lord-deploy-check.XXXXXX)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
stop() { "$BIN/lord" serve --stop || true; }
trap stop EXIT

t0=$(date +%s.%N)
"$BIN/lord" serve | tee "$LORD_SERVE_HOME/serve.out"
t_serve=$(echo "$(date +%s.%N) - $t0" | bc)
eval "$(grep '^  export ' "$LORD_SERVE_HOME/serve.out")"   # PREFECT_API_URL, MLFLOW_TRACKING_URI
export PREFECT_HOME=$LORD_SERVE_HOME/.prefect

# Tiny parameters: the real GGUF load path on a 2-layer model, every stage but finetune, ppl only.
PARAMS=$(cat <<EOF
{"preset": "smoke", "model": "tinycoder-random", "reduction": 0.005, "finetune": false,
 "runs_dir": "$LORD_SERVE_HOME/runs", "experiment": "deployment-check",
 "overrides": {"calibrate": {"n_seqs": 4, "seq_len": 32},
               "quantize": {"group_size": 16, "n_seqs": 4, "seq_len": 32},
               "evaluate": {"seq_len": 32, "n_windows": 2, "humaneval_problems": 0, "allow_execution": false}}}
EOF
)
t1=$(date +%s.%N)
"$BIN/prefect" deployment run lord-pipeline/default --params "$PARAMS" --watch --watch-timeout 900 \
    | tee "$LORD_SERVE_HOME/run.out"
t_run=$(echo "$(date +%s.%N) - $t1" | bc)
FLOW_RUN_ID=$(grep -oE 'UUID: [0-9a-f-]+' "$LORD_SERVE_HOME/run.out" | head -1 | cut -d' ' -f2)

T_SERVE=$t_serve T_RUN=$t_run FLOW_RUN_ID=$FLOW_RUN_ID "$BIN/python" - <<'EOF'
import asyncio, os, sys
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
sys.path.insert(0, ".")
from bench.common import write_results

fr_id = os.environ["FLOW_RUN_ID"]

async def prefect_facts():
    async with get_client() as c:
        fr = await c.read_flow_run(fr_id)
        deps = {d.name: d for d in await c.read_deployments()}
        runs = await c.read_flow_runs()
        scheduled = [r for r in runs if r.deployment_id == deps["retrain"].id and r.state_type.value == "SCHEDULED"]
        crons = [s.schedule.cron for s in deps["retrain"].schedules]
        return fr.state_type.value, sorted(deps), crons, len(scheduled)

state, deployments, crons, n_scheduled = asyncio.run(prefect_facts())
assert state == "COMPLETED", f"flow run {fr_id} ended {state}"
assert {"default", "retrain"} <= set(deployments), deployments
assert crons == ["0 3 * * 0"] and n_scheduled >= 1, (crons, n_scheduled)

client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
exp = client.get_experiment_by_name("deployment-check")
parents = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{fr_id}'")
assert len(parents) == 1, f"expected one MLflow parent run tagged with flow run {fr_id}, got {len(parents)}"
parent = parents[0]
children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
stages = sorted(c.info.run_name for c in children)
assert parent.info.status == "FINISHED" and len(children) == 6, (parent.info.status, stages)
assert all(c.data.params and c.data.metrics for c in children)
print(f"OK: flow run {fr_id} Completed; MLflow parent {parent.info.run_id} with {len(children)} nested runs: {stages}")
write_results("deployment_check", {"model": "tinycoder-random", "deployment": "lord-pipeline/default",
                                    "stages": stages, "servers": "prefect 3.8.8 + mlflow on 127.0.0.1"},
              [{"model": "tinycoder-random", "variant": "deployment", "state": state,
                "serve_start_seconds": round(float(os.environ["T_SERVE"]), 1),
                "deployment_run_seconds": round(float(os.environ["T_RUN"]), 1),
                "mlflow_nested_runs": len(children), "retrain_cron": crons[0],
                "retrain_scheduled_runs": n_scheduled,
                "dense_ppl": parent.data.metrics.get("dense.ppl"),
                "lord_gptq4_ppl": parent.data.metrics.get("lord_gptq4.ppl")}])
EOF
t2=$(date +%s.%N)
stop
trap - EXIT
echo "stopped in $(echo "$(date +%s.%N) - $t2" | bc) s; leftover processes: $(pgrep -f "$LORD_SERVE_HOME" | wc -l)"
