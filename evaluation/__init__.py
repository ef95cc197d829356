"""Evaluation: held-out code perplexity; HumanEval generation, sandboxed execution and pass@k."""

from .errors import EvalError
from .evaluate import EvalConfig, evaluate_to_dir
from .perplexity import PerplexityConfig, PerplexityResult, perplexity

__all__ = ["EvalConfig", "EvalError", "PerplexityConfig", "PerplexityResult", "evaluate_to_dir", "perplexity"]
