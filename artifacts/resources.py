"""Resource guards checked before compute: will the model fit in memory, will the artifact fit on disk.

Failing here, with the numbers, beats an OOM kill or a half-written checkpoint an hour in.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from artifacts.errors import PipelineError


class ResourceError(PipelineError):
    """Not enough memory or disk for the requested work; the message gives the numbers and a fix."""


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (or the cgroup limit if lower); a large number where unknown."""
    avail = 1 << 62
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = Path(f).read_text().strip()
            if raw.isdigit():
                avail = min(avail, int(raw))
        except OSError:
            pass
    return avail


def check_memory(need_bytes: int, what: str) -> None:
    budget = int(os.environ.get("LORD_MEMORY_BUDGET_BYTES", available_memory_bytes()))
    if need_bytes > budget:
        raise ResourceError(f"{what} needs about {need_bytes / 2**30:.1f} GiB of memory but only "
                            f"{budget / 2**30:.1f} GiB is available; use a smaller model, --device cuda, "
                            f"or free memory (LORD_MEMORY_BUDGET_BYTES overrides the budget)")


def check_disk(path: Path, need_bytes: int, what: str) -> None:
    path = Path(path)
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if need_bytes > free:
        raise ResourceError(f"{what} needs about {need_bytes / 2**30:.2f} GiB on disk at {probe} but only "
                            f"{free / 2**30:.2f} GiB is free; free space or point the output elsewhere")
