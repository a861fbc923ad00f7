"""The one error type of the cost models: bad user input, said in one line."""


class SpecError(ValueError):
    """Bad user input about a model or GPU; the message names the field and the fix."""
