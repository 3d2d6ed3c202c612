"""User-facing errors."""


class InvalidInputError(ValueError):
    """Bad user input (weights, plans, images). The message is one line; the CLI prints
    ``error: <message>`` and exits non-zero instead of showing a traceback."""
