"""Evaluation: held-out code perplexity; HumanEval generation, sandboxed execution and pass@k."""

from .errors import EvalError
from .perplexity import PerplexityConfig, PerplexityResult, perplexity

__all__ = ["EvalError", "PerplexityConfig", "PerplexityResult", "perplexity"]
