"""Evaluation: held-out code perplexity; HumanEval generation, sandboxed execution and pass@k."""

from .errors import EvalError
from .evaluate import EvalConfig, evaluate_to_dir
from .generate import GenerationConfig, generate_completions
from .humaneval import HumanEvalConfig, humaneval_to_dir
from .passk import mean_pass_at_k, pass_at_k
from .perplexity import PerplexityConfig, PerplexityResult, perplexity
from .sandbox import ExecResult, Sandbox, SandboxConfig

__all__ = [
    "EvalConfig", "EvalError", "ExecResult", "GenerationConfig", "HumanEvalConfig", "PerplexityConfig",
    "PerplexityResult", "Sandbox", "SandboxConfig", "evaluate_to_dir", "generate_completions", "humaneval_to_dir",
    "mean_pass_at_k", "pass_at_k", "perplexity",
]
