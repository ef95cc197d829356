"""The one exception type of the quant package."""

from __future__ import annotations

from artifacts.errors import PipelineError


class QuantError(PipelineError):
    """Bad quantization input: the message says what was given, what was expected and what to do."""
