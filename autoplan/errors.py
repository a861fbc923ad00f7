"""Errors a user can fix; the CLI prints them in one line, never a traceback."""


class UsageError(ValueError):
    """Bad command-line input; the message names the flag and the fix."""
