"""Test support: one temporary Prefect server per test session, shared by every module that asks for it
(``prefect_test_harness`` costs ~10 s to start; shared/STACK.md), and a throwaway MLflow sqlite store."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

_STACK: contextlib.ExitStack | None = None
_USERS = 0


@contextlib.contextmanager
def shared_prefect_harness() -> Iterator[str]:
    """Enter the process-wide harness (started on first use) and yield its API URL for subprocesses."""
    global _STACK, _USERS
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    if _STACK is None:
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        _STACK = contextlib.ExitStack()
        _STACK.enter_context(prefect_test_harness(server_startup_timeout=120))
    _USERS += 1
    try:
        yield str(PREFECT_API_URL.value())
    finally:
        _USERS -= 1
        if _USERS == 0:
            _STACK.close()
            _STACK = None


@contextlib.contextmanager
def temp_mlflow_store(directory: Path) -> Iterator[str]:
    """Point MLFLOW_TRACKING_URI at a fresh sqlite file for the duration (restored afterwards)."""
    uri = f"sqlite:///{Path(directory).resolve() / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield uri
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
