"""HumanEval (Chen et al. 2021): generate completions, execute them in the sandbox, report unbiased pass@k.

``humaneval_to_dir`` is the stage entry point (docs/CONTRACTS.md): a model spec in, an artifact dir out with
``completions.jsonl`` (what the model wrote), ``results.jsonl`` (per completion: status and reason),
``problems.jsonl`` (per problem: n, c, pass@k), ``sandbox.json`` (isolation actually in force),
``config.json`` and ``metrics.json``. Completions are appended to a work file beside ``out_dir`` while they
are generated, so a killed run resumes from there; the artifact itself appears atomically when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from artifacts import atomic_dir, sha256_file, sha256_json, write_json_atomic
from sources import SourceError
from sources.compute import check_dtype_name, compute_dtype, dtype_name
from sources.humaneval import HumanEvalProblem, load_humaneval

from .errors import EvalError
from .generate import GenerationConfig, generate_completions, read_jsonl
from .passk import mean_pass_at_k, pass_at_k
from .sandbox import STATUSES, Sandbox, SandboxConfig


@dataclass(frozen=True)
class HumanEvalConfig:
    """One HumanEval run. ``allow_execution`` must be True to run model code (the pipeline passes True)."""

    limit: int | None = None
    task_ids: tuple[str, ...] | None = None
    ks: tuple[int, ...] = (1,)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    allow_execution: bool = False
    dtype: str = "auto"  # compute dtype when this stage loads the model itself (sources/compute.py)

    def __post_init__(self) -> None:
        try:
            check_dtype_name(self.dtype)
        except SourceError as e:
            raise EvalError(str(e)) from e
        if isinstance(self.generation, dict):
            object.__setattr__(self, "generation", GenerationConfig(**self.generation))
        if isinstance(self.sandbox, dict):
            object.__setattr__(self, "sandbox", SandboxConfig(**self.sandbox))
        object.__setattr__(self, "ks", tuple(self.ks))
        if self.limit is not None and not (isinstance(self.limit, int) and 1 <= self.limit <= 164):
            raise EvalError(f"HumanEval limit={self.limit!r}; expected an int in [1, 164] or None for all")
        if self.task_ids is not None:
            if isinstance(self.task_ids, str) or not self.task_ids:
                raise EvalError(f"task_ids={self.task_ids!r}; expected a non-empty tuple like ('HumanEval/0',)")
            object.__setattr__(self, "task_ids", tuple(self.task_ids))
        if not self.ks or any(not isinstance(k, int) or k < 1 for k in self.ks):
            raise EvalError(f"ks={self.ks!r}; expected positive ints, e.g. (1,) or (1, 10)")
        if max(self.ks) > self.generation.n_samples:
            raise EvalError(f"ks={self.ks} asks for pass@{max(self.ks)} but n_samples="
                            f"{self.generation.n_samples}; draw n_samples >= {max(self.ks)} (with temperature > 0)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def problems(self) -> list[HumanEvalProblem]:
        return load_humaneval(task_ids=self.task_ids, limit=self.limit)


def execute_completions(problems: list[HumanEvalProblem], completions: list[dict[str, Any]], sandbox: Sandbox,
                        strip_prompt: bool | str = False, progress: bool = True) -> list[dict[str, Any]]:
    """Run every completion's program (prompt as the model saw it + completion + tests); one record each.
    A record's ``prompt_stripped`` says how its prompt was given; ``strip_prompt`` is for records without it."""
    by_id = {p.task_id: p for p in problems}
    programs = [by_id[c["task_id"]].program(c["completion"], strip_prompt=bool(c.get("prompt_stripped",
                                                                                     strip_prompt is True)))
                for c in completions]
    results = sandbox.run_many(programs, progress=progress, desc="humaneval execute")
    return [{"task_id": c["task_id"], "sample": c["sample"], "status": r.status, "reason": r.reason,
             "seconds": round(r.seconds, 4), "output": r.output[:2000], "output_truncated": r.output_truncated}
            for c, r in zip(completions, results, strict=True)]


def score(problems: list[HumanEvalProblem], results: list[dict[str, Any]], ks: tuple[int, ...]
          ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-problem (n, c, pass@k) and the mean pass@k over problems (unbiased estimator, passk.py)."""
    counts = {p.task_id: [0, 0] for p in problems}
    for r in results:
        counts[r["task_id"]][0] += 1
        counts[r["task_id"]][1] += r["status"] == "passed"
    missing = [t for t, (n, _) in counts.items() if n == 0]
    if missing:
        raise EvalError(f"no results for {missing[:5]}; rerun generation for these problems")
    per_problem = [{"task_id": t, "n": n, "c": c, **{f"pass_at_{k}": pass_at_k(n, c, k) for k in ks if k <= n}}
                   for t, (n, c) in counts.items()]
    return per_problem, mean_pass_at_k({t: (n, c) for t, (n, c) in counts.items()}, ks)


def run_humaneval(model: torch.nn.Module, tokenizer: Any, cfg: HumanEvalConfig, work_dir: Path,
                  progress: bool = True) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Generate (resumable in ``work_dir/completions.jsonl``), execute, score. Returns (metrics, tables)."""
    sandbox = Sandbox(cfg.sandbox, allow_execution=cfg.allow_execution)  # refuse before an hour of generation
    problems = cfg.problems()
    t0 = time.perf_counter()
    completions = generate_completions(model, tokenizer, {p.task_id: p.prompt for p in problems},
                                       cfg.generation, Path(work_dir) / "completions.jsonl", progress=progress)
    gen_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    results = execute_completions(problems, completions, sandbox, cfg.generation.strip_prompt, progress=progress)
    exec_seconds = time.perf_counter() - t1
    per_problem, means = score(problems, results, cfg.ks)
    # tokens/s over the completions generated in this process (resumed ones carry their own seconds)
    n_tokens = sum(c["n_new_tokens"] for c in completions)
    gen_time = sum(c["seconds"] for c in completions)
    metrics = {
        **means,
        "n_problems": len(problems),
        "n_samples": cfg.generation.n_samples,
        "n_passed": sum(r["status"] == "passed" for r in results),
        "status_counts": {s: sum(r["status"] == s for r in results) for s in STATUSES},
        "n_new_tokens": n_tokens,
        "tokens_per_second": n_tokens / gen_time if gen_time > 0 else 0.0,
        "generation_seconds": gen_seconds,
        "execution_seconds": exec_seconds,
        "executions_per_second": len(results) / exec_seconds if exec_seconds > 0 else 0.0,
        "seconds": time.perf_counter() - t0,
    }
    tables = {"completions": completions, "results": results, "problems": per_problem,
              "sandbox": [sandbox.describe()]}
    return metrics, tables


def humaneval_to_dir(model: str, cfg: HumanEvalConfig, out_dir: Path, progress: bool = True,
                     loaded: tuple[Any, Any] | None = None, cache: bool = False) -> dict[str, Any]:
    """Stage entry point: ``model`` is anything ``sources.load_model`` accepts; returns the metrics dict.

    ``loaded``: ``(model, tokenizer)`` already loaded from ``model`` by the caller (the evaluation stage
    measures perplexity first), so the weights are not loaded twice. ``cache``: reuse (and store) the result
    of a plain model dir (the dense baseline) in the user cache, keyed on its content (``result_cache_dir``).
    """
    from sources import load_model

    Sandbox(cfg.sandbox, allow_execution=cfg.allow_execution)  # fail fast: before loading or writing anything
    out_dir = Path(out_dir)
    cached = result_cache_dir(model, cfg) if cache else None
    if cached is not None and (cached / "metrics.json").is_file():
        with atomic_dir(out_dir) as tmp:
            for f in cached.iterdir():
                if f.is_file() and f.name != "MANIFEST.json":
                    shutil.copy2(f, tmp / f.name)
        return {**json.loads((cached / "metrics.json").read_text()), "humaneval_cache_hit": True}
    work = out_dir.with_name(f".{out_dir.name}.partial")
    key = resume_key(model, cfg)
    if (work / "key.json").exists() and json.loads((work / "key.json").read_text()) != key:
        shutil.rmtree(work)  # a different model or config: its partial completions are not ours to resume
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / "key.json", key)
    net, tok = loaded if loaded is not None else load_model(model, dtype=compute_dtype("cpu", cfg.dtype))
    metrics, tables = run_humaneval(net, tok, cfg, work, progress=progress)
    metrics["model"] = str(model)
    with atomic_dir(out_dir) as tmp:
        for name in ("completions", "results", "problems"):
            _write_jsonl(tmp / f"{name}.jsonl", tables[name])
        write_json_atomic(tmp / "sandbox.json", tables["sandbox"][0])
        write_json_atomic(tmp / "config.json", cfg.to_dict())
        write_json_atomic(tmp / "metrics.json", metrics)
    shutil.rmtree(work, ignore_errors=True)
    if cached is not None:
        with atomic_dir(cached) as tmp:
            for f in out_dir.iterdir():
                if f.is_file() and f.name != "MANIFEST.json":
                    shutil.copy2(f, tmp / f.name)
    return metrics


def result_cache_dir(model: str, cfg: HumanEvalConfig) -> Path | None:
    """Where a plain model dir's HumanEval result is kept across runs, or None for other models.

    Key: the model's file checksums, the config, the compute dtype "auto" resolves to, torch/transformers
    versions and the code that generates, executes and scores (evaluation/*.py, sources/humaneval.py). Only
    plain HF dirs (the dense baseline) are cached: other artifact kinds load through code outside this key.
    """
    import transformers

    from artifacts import content_digest
    from sources import cache_root, resolve_model_dir
    from sources.artifact import artifact_kind

    where = resolve_model_dir(model)
    if not isinstance(where, Path) or not (where / "MANIFEST.json").is_file():
        return None
    if artifact_kind(where) != "dense":
        return None
    here = Path(__file__).resolve().parent
    code = {f.name: sha256_file(f) for f in [*sorted(here.glob("*.py")), here.parent / "sources" / "humaneval.py"]}
    key = sha256_json({"model_files": content_digest(where), "config": json.loads(json.dumps(cfg.to_dict())), "code": code,
                       "compute_dtype": dtype_name(compute_dtype("cpu", cfg.dtype)), "torch": torch.__version__,
                       "transformers": transformers.__version__})
    return cache_root().parent / "humaneval" / key[:24]


def resume_key(model: str, cfg: HumanEvalConfig) -> dict[str, Any]:
    """What partial completions belong to: the model spec (+ its artifact manifest digest) and the config."""
    manifest = Path(str(model)) / "MANIFEST.json"
    digest = sha256_json(json.loads(manifest.read_text())) if manifest.is_file() else None
    return {"model": str(model), "model_manifest": digest, "config": json.loads(json.dumps(cfg.to_dict()))}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")


def load_results(out_dir: Path) -> list[dict[str, Any]]:
    """Per-completion results of a finished HumanEval artifact dir."""
    return read_jsonl(Path(out_dir) / "results.jsonl")
