"""The one exception type users see: a clear, one-line message about their input."""


class BottlecacheError(ValueError):
    """A user-facing error: bad input, a missing or mismatched cache, an offline download.

    The command line prints ``str(error)`` on one line and exits with code 2.
    """


class CacheMismatchError(BottlecacheError):
    """A cache (or head) was built with a configuration other than the one the caller expects."""
