"""The base of every error the pipeline raises on purpose.

Each package keeps its own subclass (``SourceError``, ``LordError``, ``QuantError``, ``FinetuneError``,
``EvalError``, ``FlowError``, ``ForwardError``, ``ArtifactError``, ``ResourceError``); callers that only
need "a pipeline error with a message that says what to do" (the CLI, flows) catch ``PipelineError``.
Deliberately not a ``ValueError``: a corrupt artifact or a failed probe is not a bad argument.
"""

from __future__ import annotations


class PipelineError(Exception):
    """An input, artifact or run the pipeline cannot use; the message says what was given and what to do."""
