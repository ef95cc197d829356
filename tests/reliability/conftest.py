"""Fixtures for the flow-level reliability tests: the session's shared Prefect server, a throwaway MLflow
store, and a child-process flow runner (so a run can be SIGKILLed or run concurrently)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from _flowkit import CHILD


@pytest.fixture
def spawn_flow(prefect_api, store):
    """Start the flow in a child process against the same Prefect API and MLflow store."""

    def spawn(params: dict[str, Any], **env: str) -> subprocess.Popen:
        child_env = {**os.environ, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": store,
                     "OMP_NUM_THREADS": "1", **env}
        return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(params)], env=child_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    return spawn
