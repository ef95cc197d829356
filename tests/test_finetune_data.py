"""Instruction data mined from installed packages (sources.instructions): real, deterministic, deduplicated."""

from __future__ import annotations

import ast
import json

import pytest

from finetune.data import load_instructions
from sources.instructions import (
    InstructionConfig,
    InstructionDataError,
    _summary,
    build_instructions,
    build_instructions_file,
)

SMALL = InstructionConfig(packages=("packaging", "click", "jinja2"), max_examples=50, seed=0)


def test_pairs_are_real_functions_and_deterministic(tmp_path):
    a, b = build_instructions(SMALL), build_instructions(SMALL)
    assert a.digest == b.digest and a.records == b.records
    assert 0 < len(a.records) <= 50 and a.n_candidates >= len(a.records)
    for rec in a.records:
        tree = ast.parse(rec["output"])  # every answer is a complete, parseable function ...
        fn = tree.body[0]
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        assert ast.get_docstring(fn) is None  # ... with its docstring moved into the instruction
        assert fn.name in rec["instruction"]
    assert len({r["output"] for r in a.records}) == len(a.records)
    assert len({r["instruction"] for r in a.records}) == len(a.records)
    other = build_instructions(InstructionConfig(packages=SMALL.packages, max_examples=50, seed=1))
    assert other.digest != a.digest  # the seed picks the subsample


def test_file_round_trip_and_size_knob(tmp_path):
    meta = build_instructions_file(tmp_path / "inst.jsonl", InstructionConfig(packages=("packaging",), max_examples=7))
    assert meta["n_examples"] == 7 and meta["package_versions"]["packaging"]
    assert json.loads((tmp_path / "inst.jsonl.meta.json").read_text())["sha256"] == meta["sha256"]
    assert len(load_instructions(tmp_path / "inst.jsonl")) == 7


def test_never_mines_the_stdlib():
    with pytest.raises(InstructionDataError, match="no docstring -> function pairs"):
        build_instructions(InstructionConfig(packages=("not_an_installed_package_xyz",)))
    with pytest.raises(InstructionDataError, match="standard library"):
        build_instructions(InstructionConfig(packages=("packaging", "json")))


def test_summary_drops_parameter_sections():
    doc = "Add two numbers.\n\nMore prose.\n\nParameters\n----------\na : int\n\n>>> add(1, 2)\n3"
    assert _summary(doc) == "Add two numbers.\n\nMore prose."
