"""The one exception type for bad user input (flags, files, specs), shared by `protocol/` and `node/`
(it lives here because `protocol/` imports nothing from `node/`)."""


class BadInput(ValueError):
    """A user-facing error: its message is one line that says what is wrong and what to do.

    The CLI prints it without a traceback and exits with code 2.
    """
