"""The web UI's own error for things the user must fix (a bad setting, a taken user name, ...)."""


class WebError(Exception):
    """A mistake the user can fix; the message is one line. Commands print it as ``error: ...`` and exit 2."""
