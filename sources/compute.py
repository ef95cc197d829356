"""The compute-dtype policy, in one place: which float type forward-heavy work runs in.

bf16 where the hardware multiplies it natively (CUDA with bf16; CPUs with AMX-BF16 or AVX512-BF16), float32
everywhere else, with the same code. "auto" must look at the CPU rather than assume: measured on an AVX2-only
CPU (AMD EPYC, Zen 1, torch 2.13) a 512 x 896 x 4864 bf16 matmul was ~30x *slower* than float32 (no native
kernel), while on AMX CPUs it is ~5x faster. Numerically sensitive work (Gram/Hessian accumulation,
eigen/Cholesky, losses) stays wide whatever this returns: callers upcast there. Artifacts keep their stored
dtype: stages that write weights load them in float32 and compute in bf16 only through ``autocast``.

Overrides, strongest first: an explicit ``requested`` "float32"/"bfloat16" (a stage config's ``dtype``
field), then ``$LORD_DTYPE`` (what ``lord --dtype`` sets), then detection; ``requested="auto"`` defers. ``$LORD_NO_BF16=1`` makes "auto" behave as on a CPU without bf16 (tests
of the fallback path).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .errors import SourceError

DTYPE_ENV = "LORD_DTYPE"
NO_BF16_ENV = "LORD_NO_BF16"
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def compute_dtype(device: str | torch.device = "cpu", requested: str | None = None) -> torch.dtype:
    """The float type forwards run in on ``device``: explicit ``requested`` > ``$LORD_DTYPE`` > detection."""
    name = check_dtype_name(requested or "auto")
    if name == "auto":  # a config's default: the process-wide choice (`lord --dtype`), if any, decides
        name = check_dtype_name(os.environ.get(DTYPE_ENV) or "auto")
    dev = torch.device(device)
    if name == "auto":
        return torch.bfloat16 if native_bf16(dev) else torch.float32
    if name == "bfloat16" and dev.type == "cpu" and not native_bf16(dev):
        warnings.warn("compute dtype bfloat16 asked for on a CPU without AMX-BF16/AVX512-BF16: it runs, but "
                      "matmuls are emulated (~30x slower than float32 measured on an AVX2 CPU); use --dtype auto",
                      stacklevel=2)
    return _BY_NAME[name]


def check_dtype_name(name: str) -> str:
    """Validate a dtype name at the edge (configs, CLI) with a message naming the fix."""
    if name not in DTYPE_CHOICES:
        raise SourceError(f"dtype={name!r} is unknown; expected one of {list(DTYPE_CHOICES)} "
                          f"(auto: bf16 where the CPU/GPU multiplies it natively, else float32)")
    return name


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 natively (``$LORD_NO_BF16=1`` says no, for tests of the fallback)."""
    if os.environ.get(NO_BF16_ENV, "").strip() not in ("", "0"):
        return False
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return dev.type == "cpu" and bool(cpu_bf16_flags())


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The CPU's native-bf16 feature flags found in /proc/cpuinfo (empty off Linux or without them)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return tuple(f for f in _BF16_CPU_FLAGS if f in flags)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def autocast(device: str | torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast for forwards of a float32 model (weights stay float32); a no-op for float32.

    Inside it, accumulate statistics under ``wide()``: autocast would otherwise run their fp32 GEMMs in bf16.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def wide() -> Iterator[None]:
    """Turn autocast off for numerically sensitive work inside an ``autocast`` region (Grams, Hessians)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.autocast(device_type=dev, enabled=False), torch.autocast(device_type="cpu", enabled=False):
        yield


def describe(device: str | torch.device = "cpu", requested: str | None = None) -> dict[str, Any]:
    """What the policy decided and why, for metrics files and benchmark protocols."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dtype = compute_dtype(device, requested)
    return {"compute_dtype": dtype_name(dtype), "requested": requested or os.environ.get(DTYPE_ENV) or "auto",
            "native_bf16": native_bf16(device), "cpu_bf16_flags": list(cpu_bf16_flags()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
