"""Fault hooks for the reliability tests, off unless their environment variable names a stage.

``LORD_FLOW_FAIL_STAGE=<stage>``: the stage raises before computing (a failed run to resume from).
``LORD_FLOW_KILL_STAGE=<stage>``: the process SIGKILLs itself while the stage is writing its artifact (as
soon as the stage's temp dir appears), the crash a power cut or OOM killer produces.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from flows.errors import FlowError

FAIL_ENV = "LORD_FLOW_FAIL_STAGE"
KILL_ENV = "LORD_FLOW_KILL_STAGE"


def maybe_fail(stage: str) -> None:
    if os.environ.get(FAIL_ENV) == stage:
        raise FlowError(f"fault injected: {FAIL_ENV}={stage}; unset it to run the stage.")


def maybe_kill_midwrite(stage: str, out_dir: Path) -> None:
    if os.environ.get(KILL_ENV) != stage:
        return

    def watch() -> None:
        while not any(out_dir.parent.glob(f".{out_dir.name}.tmp-*")):
            time.sleep(0.002)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()
