"""The one error of the embedded servers."""


class EmbeddedError(RuntimeError):
    """The embedded servers could not be started or stopped (the message says why)."""
