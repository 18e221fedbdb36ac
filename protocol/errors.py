"""The one exception type for bad user input (flags, files, specs), shared by `protocol/` and `node/`
(it lives here because `protocol/` imports nothing from `node/`)."""


class BadInput(ValueError):
    """A user-facing error: its message is one line that says what is wrong and what to do.

    The CLI prints it without a traceback and exits with code 2.
    """


def one_line(text: str, limit: int = 400) -> str:
    """`text` as one line of at most about `limit` characters: a library's own error message (torch's
    runs to ten lines) quoted inside ours must not break the CLI's one-line errors."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."
