"""The one error type of the command line: a user's mistake, reported as one line."""

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in the command's arguments or inputs: reported as one line, exit status 2."""
