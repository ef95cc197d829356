"""The one exception type of the finetune package (docs/CONTRACTS.md: one per package)."""

from __future__ import annotations

from artifacts.errors import PipelineError


class FinetuneError(PipelineError):
    """Bad fine-tuning input: data file, model without targetable projections, or an invalid config."""
