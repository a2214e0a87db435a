"""The error type that commands raise for a user mistake: shown as one line, no traceback."""


class CLIError(Exception):
    """A mistake in what the user asked for; the message says what to do instead."""
