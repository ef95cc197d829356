"""The one exception type of `sources`."""


from artifacts.errors import PipelineError


class SourceError(PipelineError):
    """A model, corpus or data spec that cannot be resolved; the message says what was given and what to do."""
