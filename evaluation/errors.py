"""The one exception type of `evaluation`."""


from artifacts.errors import PipelineError


class EvalError(PipelineError):
    """Bad evaluation input or a failed evaluation; the message says what was given and what to do."""
