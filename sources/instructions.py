"""Code instruction data for QLoRA, built offline: docstring -> function pairs mined with ``ast``.

No instruction set ships in a package here (shared/DATA.md), so we build one from real code: every public
module-level function with a docstring in a few installed, well-documented packages becomes one example,
``instruction`` = signature + docstring, ``output`` = the function's source without its docstring. The
CPython stdlib is deliberately *not* mined (it is the calibration / held-out perplexity corpus) and neither
is HumanEval. The result is deterministic for a given set of installed package versions, deduplicated, and
identified by the sha256 of its JSONL bytes, which is what a pipeline caches on.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import random
import sysconfig
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import SourceError

# Pure-Python packages our own dependencies pull in (torch -> networkx, sympy, mpmath, jinja2, fsspec;
# pandas -> dateutil; ...), so they are installed wherever this project is.
DEFAULT_PACKAGES: tuple[str, ...] = (
    "networkx", "sympy", "mpmath", "jinja2", "fsspec", "packaging", "click", "dateutil", "pandas", "numpy",
)


class InstructionDataError(SourceError):
    """Instruction data could not be built from the requested packages."""


@dataclass(frozen=True)
class InstructionConfig:
    """What to mine and how much. ``max_examples`` is the size knob; ``seed`` picks the subsample."""

    packages: tuple[str, ...] = DEFAULT_PACKAGES
    max_examples: int = 2000
    min_body_lines: int = 2
    max_body_lines: int = 40
    min_doc_chars: int = 40
    max_doc_chars: int = 1500
    seed: int = 0
    exclude_dirs: tuple[str, ...] = field(default=("tests", "test", "testing", "_vendor", "vendored"))

    def __post_init__(self) -> None:
        if not self.packages:
            raise InstructionDataError("InstructionConfig.packages is empty; name at least one installed package.")
        if self.max_examples < 1:
            raise InstructionDataError(f"max_examples={self.max_examples}; expected >= 1.")
        if not 1 <= self.min_body_lines <= self.max_body_lines:
            raise InstructionDataError(
                f"body line bounds ({self.min_body_lines}, {self.max_body_lines}); expected 1 <= min <= max."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InstructionSet:
    records: list[dict[str, str]]
    digest: str                       # sha256 of the JSONL bytes written by ``write_jsonl``
    package_versions: dict[str, str]  # what was mined; missing packages are simply absent
    n_candidates: int                 # unique pairs found before subsampling


def build_instructions(cfg: InstructionConfig = InstructionConfig()) -> InstructionSet:
    """Mine, deduplicate and deterministically subsample docstring -> function pairs."""
    versions: dict[str, str] = {}
    candidates: dict[str, dict[str, str]] = {}  # keyed by normalised output, so duplicates collapse
    for package in cfg.packages:
        root = package_root(package)
        if root is None:
            continue
        if _in_stdlib(root):
            raise InstructionDataError(
                f"package {package!r} is part of the Python standard library ({root}), which is the calibration "
                f"and held-out perplexity corpus; training on it would leak the evaluation. Name an installed "
                f"third-party package instead."
            )
        versions[package] = _version(package)
        for path in sorted(root.rglob("*.py")):
            if any(part in cfg.exclude_dirs for part in path.relative_to(root).parts[:-1]):
                continue
            for rec in _pairs_from_file(path, cfg):
                key = " ".join(rec["output"].split())
                candidates.setdefault(key, rec)
    if not candidates:
        raise InstructionDataError(
            f"no docstring -> function pairs found in packages {list(cfg.packages)} (installed: "
            f"{sorted(versions)}); install one of them or pass your own JSONL with instruction/output fields."
        )
    records = [candidates[k] for k in sorted(candidates)]
    seen_instr: set[str] = set()
    unique = []
    for rec in records:  # a docstring copied onto overloads would teach two answers to one question
        if rec["instruction"] not in seen_instr:
            seen_instr.add(rec["instruction"])
            unique.append(rec)
    random.Random(cfg.seed).shuffle(unique)
    chosen = unique[: cfg.max_examples]
    return InstructionSet(chosen, _digest(chosen), versions, len(unique))


def write_jsonl(records: list[dict[str, str]], path: Path) -> str:
    """Write records as JSONL ({"instruction", "output"} per line) and return the sha256 of the bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _jsonl_bytes(records)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def build_instructions_file(path: Path, cfg: InstructionConfig = InstructionConfig()) -> dict[str, Any]:
    """Build the default instruction set into ``path`` (JSONL) with a sidecar ``<path>.meta.json``."""
    inst = build_instructions(cfg)
    digest = write_jsonl(inst.records, path)
    meta = {"n_examples": len(inst.records), "n_candidates": inst.n_candidates, "sha256": digest,
            "package_versions": inst.package_versions, "config": cfg.to_dict()}
    Path(f"{path}.meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    return meta


# ---------------------------------------------------------------------------------------------- helpers
def installed_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """``{package: version}`` of the installed ones: what the default instruction set would be mined from."""
    return {p: _version(p) for p in packages if package_root(p) is not None}


def package_root(package: str) -> Path | None:
    """The directory of an installed top-level package (None: not installed, or a single module)."""
    # find_spec on a top-level name locates it without importing (and so without running) the package.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent is missing, or an empty name
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _in_stdlib(root: Path) -> bool:
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    root = root.resolve()
    return stdlib in root.parents and "site-packages" not in root.parts and "dist-packages" not in root.parts


def _version(package: str) -> str:
    for dist in (package, {"dateutil": "python-dateutil", "attr": "attrs"}.get(package, package)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def _pairs_from_file(path: Path, cfg: InstructionConfig) -> list[dict[str, str]]:
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for node in tree.body:  # module level only: methods lean on class context the prompt would not show
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        rec = _pair(node, lines, cfg)
        if rec is not None:
            out.append(rec)
    return out


def _pair(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str],
          cfg: InstructionConfig) -> dict[str, str] | None:
    doc = _summary(ast.get_docstring(node, clean=True) or "")
    if not doc or not cfg.min_doc_chars <= len(doc) <= cfg.max_doc_chars:
        return None
    doc_node = node.body[0]
    rest = node.body[1:]
    if not rest or doc_node.end_lineno is None or node.end_lineno is None:
        return None
    # keep the signature (lines up to the docstring), drop the docstring, keep the body
    sig_lines = lines[node.lineno - 1 : doc_node.lineno - 1]
    body_lines = lines[doc_node.end_lineno : node.end_lineno]
    while body_lines and not body_lines[0].strip():
        body_lines = body_lines[1:]
    n_body = sum(1 for b in body_lines if b.strip() and not b.strip().startswith("#"))
    if not cfg.min_body_lines <= n_body <= cfg.max_body_lines or not sig_lines:
        return None
    code = textwrap.dedent("\n".join(sig_lines + body_lines)).rstrip()
    signature = textwrap.dedent("\n".join(sig_lines)).strip()
    if "NotImplementedError" in code or "\t" in code:
        return None
    instruction = f"Write a Python function with this signature:\n{signature}\n\nIt should do the following:\n{doc}"
    return {"instruction": instruction, "output": code}


_SECTION_STARTS = (">>>", ":param", ":return", ".. ", "Args:", "Arguments:", "Returns:", "Raises:", "Example",
                   "Parameters", "Returns", "Yields", "Raises", "See Also", "Notes", "References", "Examples")


def _summary(doc: str) -> str:
    """The prose part of a docstring: paragraphs before the first section (numpy/google/rst) or doctest.

    Parameter tables and doctests make most docstrings 5-20x longer than the code they describe; what a
    user would type as an instruction is the description.
    """
    kept: list[str] = []
    for para in doc.split("\n\n"):
        first = para.strip().splitlines()[0] if para.strip() else ""
        if first.startswith(_SECTION_STARTS) or set(para.strip().splitlines()[1:2]) & {"-" * len(first), "=" * len(first)}:
            break
        kept.append(para.strip())
    return "\n\n".join(p for p in kept if p)


def _jsonl_bytes(records: list[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode()


def _digest(records: list[dict[str, str]]) -> str:
    return hashlib.sha256(_jsonl_bytes(records)).hexdigest()
