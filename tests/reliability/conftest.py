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

from bench.harness import shared_prefect_harness, temp_mlflow_store


@pytest.fixture(scope="session")
def prefect_api():
    with shared_prefect_harness() as url:
        yield url


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with temp_mlflow_store(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture
def spawn_flow(prefect_api, store):
    """Start the flow in a child process against the same Prefect API and MLflow store."""

    def spawn(params: dict[str, Any], **env: str) -> subprocess.Popen:
        child_env = {**os.environ, "PREFECT_API_URL": prefect_api, "MLFLOW_TRACKING_URI": store,
                     "OMP_NUM_THREADS": "1", **env}
        return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(params)], env=child_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    return spawn
