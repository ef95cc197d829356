"""The one exception type of the flows package."""


from artifacts.errors import PipelineError


class FlowError(PipelineError):
    """Bad pipeline input or a broken orchestration precondition.

    Messages say what was given, what was expected and what to do.
    """
