"""The one exception type for bad user input (flags, files, specs)."""


class BadInput(ValueError):
    """A user-facing error: its message is one line that says what is wrong and what to do.

    The CLI prints it without a traceback and exits with code 2.
    """


class Diverged(BadInput):
    """A node's own parameters or tracker are no longer finite: its training diverged (a step size too
    large, or a hostile neighbour mixed in without `--robust clip`). It must not send them: no codec
    can encode them and no receiver would accept them."""


class RunFinished(BadInput):
    """The run a node waits to (re)join has finished: its members are done."""
