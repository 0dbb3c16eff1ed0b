"""The base of errors a user can act on: the command line prints their one-line message, no traceback."""


class UserError(ValueError):
    """A bad input (path, file, query, option) named in the message."""
