"""Errors the CLI reports in one line: `BadInput` (exit code 2; defined in `protocol/errors.py`, which
the wire format shares) and the node's own kinds of it, and `RunFailed` (exit code 1)."""

from ..protocol.errors import BadInput

__all__ = ["BadInput", "Diverged", "RunFailed", "RunFinished"]


class Diverged(BadInput):
    """A node's own parameters or tracker are no longer finite: its training diverged (a step size too
    large, or a hostile neighbour mixed in without `--robust clip`). It must not send them: no codec
    can encode them and no receiver would accept them."""


class RunFailed(RuntimeError):
    """A run that could not complete though its input was fine (a testnet node that exited, a testnet
    past its --timeout): the CLI reports it in one line, with its logs' folder, and exit code 1."""


class RunFinished(BadInput):
    """The run a node waits to (re)join has finished: its members are done."""
