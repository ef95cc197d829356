"""Configs are declared once (frozen dataclasses validated in ``__post_init__``): every CLI flag that sets a
config field must default to that field's default, so defaults live in one place."""

from __future__ import annotations

import dataclasses

import pytest

from evaluation import EvalConfig, GenerationConfig
from finetune import FinetuneConfig
from flows.cli import _parser
from lord.config import CalibConfig, DecomposeConfig
from quant import QuantConfig

# (argv, config, fields the command fills from its flags; None = every flag named like a field)
CASES = [
    (["calibrate", "--out", "x"], CalibConfig, None),
    (["decompose", "--out", "x"], CalibConfig, None),
    (["decompose", "--out", "x"], DecomposeConfig, None),
    (["quantize", "--model", "m", "--out", "x"], QuantConfig, ("bits",)),
    (["finetune", "--model", "m", "--out", "x"], FinetuneConfig, None),
    # eval's --batch-size is the HumanEval generation batch (GenerationConfig), not EvalConfig.batch_size
    (["eval", "--model", "m", "--out", "x"], EvalConfig, ("seq_len", "n_windows")),
    (["eval", "--model", "m", "--out", "x"], GenerationConfig, ("batch_size", "max_new_tokens")),
]


@pytest.mark.parametrize(("argv", "cls", "only"), CASES, ids=[f"{a[0]}-{c.__name__}" for a, c, _ in CASES])
def test_cli_defaults_equal_config_defaults(argv, cls, only):
    ns = vars(_parser().parse_args(argv))
    shared = [f for f in dataclasses.fields(cls) if f.name in ns and ns[f.name] is not None
              and (only is None or f.name in only)]
    assert shared, f"no flag of {argv[0]} sets a {cls.__name__} field"
    for f in shared:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        value = tuple(ns[f.name]) if isinstance(default, tuple) else ns[f.name]
        assert value == default, f"lord {argv[0]} --{f.name.replace('_', '-')} defaults to {value!r}, " \
                                 f"{cls.__name__}.{f.name} to {default!r}"
