"""Peak memory of a training run: process RSS high-water mark on CPU, max allocated on CUDA.

Linux keeps the RSS high-water mark (``VmHWM``) per process and lets a process reset it by writing ``5``
to ``/proc/self/clear_refs``: we read it after loading, reset, and read it again after training, so the
fine-tuning peak is not hidden under the load peak. Different configurations must run in separate
processes (``finetune.isolated``), or one run's freed-but-kept heap inflates the next.
"""

from __future__ import annotations

from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float | None:
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb() -> float | None:
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: ru_maxrss is the lifetime peak (kB on Linux, bytes on macOS)
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    return kb / 1024


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS; False where the kernel does not support it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def reset_cuda_peak(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def cuda_peak_mb(device: str) -> float | None:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None
