"""Errors that mean "the user must change something": commands print them as one line."""


class UserError(Exception):
    """Bad input, a missing file or an unsupported setting; the message says what to fix."""
