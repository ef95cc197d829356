"""``lord serve``: a local Prefect server, an MLflow server and a process worker on 127.0.0.1, with the
deployments from ``prefect.yaml`` registered. PIDs, ports and URLs go to ``.lord-serve/state.json`` and logs
to ``.lord-serve/*.log``; ``lord serve --stop`` stops them by PID (worker first, then the servers, SIGTERM).

Recipes and pins: shared/STACK.md (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false keeps the MLflow server at one
process instead of ~10 and 2.4 GB).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from flows.errors import FlowError

STATE_DIR = ".lord-serve"
POOL = "local-pool"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def serve_home(root: Path) -> Path:
    """Where state, logs, the Prefect home and the MLflow store live: ``$LORD_SERVE_HOME`` or the checkout
    (so the served MLflow UI shows the same ./mlflow.db that `lord run` writes)."""
    return Path(os.environ.get("LORD_SERVE_HOME") or root).resolve()


def base_env(root: Path, home: Path, prefect_port: int, mlflow_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "PWD": str(root),
        "PREFECT_HOME": str(home / ".prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_seconds: float = 120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_seconds:
        if proc.poll() is not None:
            raise FlowError(f"{url}: the process exited with code {proc.returncode}; see {log}.")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise FlowError(f"{url} did not answer within {timeout_seconds:.0f} s; see {log}.")


def _spawn(cmd: list[str], env: dict[str, str], root: Path, log: Path) -> subprocess.Popen:
    fh = open(log, "ab")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(cmd, env=env, cwd=root, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def start(root: Path, prefect_port: int | None = None, mlflow_port: int | None = None,
          deploy: bool = True) -> dict[str, Any]:
    """Start the three services (idempotent refusal if already running) and return the state dict."""
    root = root.resolve()
    home = serve_home(root)
    sdir = home / STATE_DIR
    state_file = sdir / "state.json"
    if state_file.is_file():
        raise FlowError(f"{state_file} exists: services already running (or a stale file); "
                        "run `lord serve --stop` first.")
    sdir.mkdir(parents=True, exist_ok=True)
    pp, mp = prefect_port or free_port(), mlflow_port or free_port()
    env = base_env(root, home, pp, mp)
    state: dict[str, Any] = {"prefect_port": pp, "mlflow_port": mp, "pids": {},
                             "PREFECT_API_URL": env["PREFECT_API_URL"], "MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]}
    try:
        log = sdir / "prefect-server.log"
        p = _spawn([_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(pp)], env, root, log)
        state["pids"]["prefect_server"] = p.pid
        _save(state_file, state)
        mlog = sdir / "mlflow-server.log"
        m = _spawn([_bin("mlflow"), "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
                    "--artifacts-destination", str(home / "mlartifacts"), "--host", "127.0.0.1",
                    "--port", str(mp), "--workers", "1"], env, root, mlog)
        state["pids"]["mlflow_server"] = m.pid
        _save(state_file, state)
        _wait_http(f"http://127.0.0.1:{pp}/api/health", p, log)
        _wait_http(f"http://127.0.0.1:{mp}/health", m, mlog)
        if deploy:
            dlog = sdir / "deploy.log"
            with open(dlog, "ab") as fh:
                subprocess.run([_bin("prefect"), "work-pool", "create", POOL, "--type", "process"],
                               env=env, cwd=root, stdout=fh, stderr=subprocess.STDOUT, check=False)
                r = subprocess.run([_bin("prefect"), "--no-prompt", "deploy", "--all"], env=env, cwd=root,
                                   stdout=fh, stderr=subprocess.STDOUT, check=False)
            if r.returncode != 0:
                raise FlowError(f"`prefect deploy --all` failed (exit {r.returncode}); see {dlog}.")
        wlog = sdir / "worker.log"
        w = _spawn([_bin("prefect"), "worker", "start", "--pool", POOL, "--limit", "1"], env, root, wlog)
        state["pids"]["worker"] = w.pid
        _save(state_file, state)
    except BaseException:
        stop(root)
        raise
    return state


def stop(root: Path, timeout_seconds: float = 30.0) -> list[str]:
    """SIGTERM each service's process group by recorded PID: worker before servers (a server stopped first
    leaves the worker retrying). Escalates to SIGKILL after ``timeout_seconds``."""
    state_file = serve_home(root.resolve()) / STATE_DIR / "state.json"
    if not state_file.is_file():
        return []
    state = json.loads(state_file.read_text())
    stopped = []
    for name in ("worker", "mlflow_server", "prefect_server"):
        pid = state["pids"].get(name)
        if pid and _terminate(pid, timeout_seconds):
            stopped.append(name)
    state_file.unlink()
    return stopped


def _terminate(pid: int, timeout_seconds: float) -> bool:
    try:
        os.killpg(pid, signal.SIGTERM)  # start_new_session made pid its group leader
    except ProcessLookupError:
        return False
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_seconds:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:  # not our child (stopped from another shell): poll the pid instead
            if not _alive(pid):
                return True
        time.sleep(0.3)
    os.killpg(pid, signal.SIGKILL)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return not (status.is_file() and status.read_text().split()[2] == "Z")


def _save(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def describe(state: dict[str, Any], root: Path) -> str:
    return "\n".join([
        f"Prefect UI   http://127.0.0.1:{state['prefect_port']}",
        f"MLflow UI    http://127.0.0.1:{state['mlflow_port']}",
        f"logs         {serve_home(root) / STATE_DIR}/*.log",
        "Use them from this shell:",
        f"  export PREFECT_API_URL={state['PREFECT_API_URL']} MLFLOW_TRACKING_URI={state['MLFLOW_TRACKING_URI']}",
        "  prefect deployment run lord-pipeline/default -p reduction=0.2 --watch",
        "Stop: lord serve --stop",
    ])
