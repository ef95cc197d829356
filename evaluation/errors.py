"""The one exception type of `evaluation`."""


class EvalError(ValueError):
    """Bad evaluation input or a failed evaluation; the message says what was given and what to do."""
