"""Errors that mean "the user must change something": commands print them as one line."""


class UserError(Exception):
    """Bad input, a missing file or an unsupported setting; the message says what to fix.

    Packages that must not import the core (it loads the model runtime) mark their own such errors
    with a class attribute ``user_error = True`` instead; the dispatcher treats both alike."""


class RequestRefused(ValueError):
    """The engine will not run a request it received (e.g. its grammar cannot be compiled in time); the
    message says why. Raised by a request's stream before any output."""
