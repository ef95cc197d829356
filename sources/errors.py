"""The one exception type of `sources`."""


class SourceError(ValueError):
    """A model, corpus or data spec that cannot be resolved; the message says what was given and what to do."""
