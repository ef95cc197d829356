"""The one exception type of the ``vocab`` package."""

from __future__ import annotations

from artifacts.errors import PipelineError


class VocabError(PipelineError):
    """A vocabulary-trimming input (tokenizer type, keep size, coverage, corpus) is not usable; the message
    says what was given, what is supported and what to do."""
