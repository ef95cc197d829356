"""The one exception type of the quant package."""

from __future__ import annotations


class QuantError(ValueError):
    """Bad quantization input: the message says what was given, what was expected and what to do."""
