"""The one exception type of the ``forward`` package."""

from __future__ import annotations

from artifacts.errors import PipelineError


class ForwardError(PipelineError):
    """A model the forward toolkit cannot walk (unknown family, unusual layer calls) or malformed token ids."""
