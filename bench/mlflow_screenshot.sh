#!/usr/bin/env bash
# Screenshot the MLflow UI (headless Chromium) for the README: the lord-pipeline experiment's runs, or a
# compare view of given run ids. Usage: bench/mlflow_screenshot.sh [DB] [OUT.png] [RUN_ID ...]
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${1:-$PWD/mlflow.db}; OUT=${2:-bench/results/mlflow_compare.png}; shift 2 || true
BIN=${BIN:-$PWD/.venv/bin}
PORT=$("$BIN/python" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    "$BIN/mlflow" server --backend-store-uri "sqlite:///$DB" --host 127.0.0.1 --port "$PORT" --workers 1 \
    > /tmp/mlflow-screenshot.log 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.5; done
EXP=$(MLFLOW_TRACKING_URI="http://127.0.0.1:$PORT" "$BIN/python" -c \
    "import mlflow; print(mlflow.get_experiment_by_name('lord-pipeline').experiment_id)")
if [ "$#" -gt 0 ]; then
    RUNS=$(printf '"%s",' "$@"); URL="http://127.0.0.1:$PORT/#/compare-runs?runs=[${RUNS%,}]&experiments=[\"$EXP\"]"
else
    URL="http://127.0.0.1:$PORT/#/experiments/$EXP/runs?isPreview=false&expandedRows=true"
fi
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --hide-scrollbars \
    --window-size=1600,${HEIGHT:-1000} --virtual-time-budget=15000 --screenshot="$(realpath -m "$OUT")" "$URL" 2>/dev/null
echo "wrote $OUT ($URL)"
