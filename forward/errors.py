"""The one exception type of the ``forward`` package."""

from __future__ import annotations


class ForwardError(ValueError):
    """A model the forward toolkit cannot walk (unknown family, unusual layer calls) or malformed token ids."""
