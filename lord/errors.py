"""The one exception type of the ``lord`` package."""

from __future__ import annotations

from artifacts.errors import PipelineError


class LordError(PipelineError):
    """A LoRD input (model, statistics, plan, checkpoint) is not what was expected; the message says how to fix it."""
