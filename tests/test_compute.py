"""The compute-dtype policy (sources/compute.py): detection, overrides, the forced fallback, and both dtypes
through real stage entry points on the tiny model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from sources import SourceError, compute
from sources.compute import DTYPE_ENV, NO_BF16_ENV, autocast, compute_dtype, describe, wide


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(DTYPE_ENV, raising=False)
    monkeypatch.delenv(NO_BF16_ENV, raising=False)
    return monkeypatch


def _cpu_flags(monkeypatch, flags: tuple[str, ...]) -> None:
    monkeypatch.setattr(compute, "cpu_bf16_flags", lambda: flags)


def test_auto_follows_the_cpu_flags(clean_env) -> None:
    _cpu_flags(clean_env, ("amx_bf16", "avx512_bf16"))
    assert compute_dtype("cpu") == torch.bfloat16
    _cpu_flags(clean_env, ())
    assert compute_dtype("cpu") == torch.float32
    assert describe("cpu")["compute_dtype"] == "float32"


def test_forced_fallback_on_a_bf16_cpu(clean_env) -> None:
    _cpu_flags(clean_env, ("amx_bf16",))
    clean_env.setenv(NO_BF16_ENV, "1")
    assert compute_dtype("cpu") == torch.float32
    assert describe("cpu")["native_bf16"] is False


def test_explicit_beats_env_beats_auto(clean_env) -> None:
    _cpu_flags(clean_env, ("avx512_bf16",))
    clean_env.setenv(DTYPE_ENV, "float32")
    assert compute_dtype("cpu") == torch.float32
    assert compute_dtype("cpu", "bfloat16") == torch.bfloat16
    assert compute_dtype("cpu", "auto") == torch.float32  # a config's "auto" defers to the process choice
    clean_env.delenv(DTYPE_ENV)
    assert compute_dtype("cpu", "auto") == torch.bfloat16


def test_bf16_without_native_support_runs_but_warns(clean_env) -> None:
    _cpu_flags(clean_env, ())
    with pytest.warns(UserWarning, match="emulated"):
        assert compute_dtype("cpu", "bfloat16") == torch.bfloat16


def test_unknown_name_is_a_clear_error(clean_env) -> None:
    with pytest.raises(SourceError, match="float32"):
        compute_dtype("cpu", "float16")
    clean_env.setenv(DTYPE_ENV, "fp8")
    with pytest.raises(SourceError, match="auto"):
        compute_dtype("cpu")


def test_autocast_computes_bf16_and_wide_keeps_fp32() -> None:
    x, w = torch.randn(8, 16), torch.randn(16, 4)
    with autocast("cpu", torch.float32):
        assert (x @ w).dtype == torch.float32
    with autocast("cpu", torch.bfloat16):
        assert (x @ w).dtype == torch.bfloat16
        with wide():
            assert (x.T @ x).dtype == torch.float32  # Grams / Hessians stay float32 inside a bf16 region


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_evaluate_stage_in_both_dtypes(dtype, tmp_path, clean_env) -> None:
    from evaluation import EvalConfig, evaluate_to_dir

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bf16 on a CPU without it: emulated, fine for a tiny model
        m = evaluate_to_dir("tinycoder-random", EvalConfig(seq_len=32, n_windows=2, dtype=dtype), tmp_path / "e")
    assert m["compute_dtype"] == dtype and m["ppl"] > 1
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["compute_dtype"] == dtype


def test_perplexity_bf16_close_to_float32(clean_env) -> None:
    from evaluation import perplexity
    from sources import code_split, load_model

    files = code_split().heldout[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = {dt: perplexity(*load_model("tinycoder-random", dtype=dt), files, seq_len=64, n_windows=2,
                                  progress=False).ppl for dt in (torch.float32, torch.bfloat16)}
    assert results[torch.bfloat16] == pytest.approx(results[torch.float32], rel=0.02)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_calibration_in_both_dtypes_keeps_wide_statistics(dtype, tmp_path, clean_env) -> None:
    from lord import CalibConfig, collect_stats_to_file
    from lord.stats import load_stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = collect_stats_to_file("tinycoder-random", tmp_path / "stats.safetensors",
                                  CalibConfig(n_seqs=4, seq_len=32, dtype=dtype))
    assert m["compute_dtype"] == dtype
    stats, meta = load_stats(tmp_path / "stats.safetensors")
    assert meta["compute_dtype"] == dtype
    assert all(s.gram.dtype == torch.float32 and torch.isfinite(s.gram).all() for s in stats.values())


def test_cli_dtype_sets_the_process_policy(clean_env, capsys) -> None:
    import os

    from flows.cli import _parser

    args = _parser().parse_args(["--dtype", "float32", "compare"])
    assert args.dtype == "float32"
    args = _parser().parse_args(["run", "--dtype", "bfloat16"])
    assert args.dtype == "bfloat16"
    assert os.environ.get(DTYPE_ENV) is None  # parsing alone changes nothing; main() sets it


def test_cli_dtype_reaches_the_eval_stage(clean_env, tmp_path, capsys) -> None:
    from flows.cli import main

    clean_env.setenv(DTYPE_ENV, "auto")  # main() sets it for the process: restored after the test
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--dtype", "bfloat16", "eval", "--model", "tinycoder-random", "--out", str(tmp_path / "e"),
                     "--seq-len", "32", "--n-windows", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["compute_dtype"] == "bfloat16"
