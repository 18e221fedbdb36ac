"""Errors the CLI reports in one line (exit code 2): `BadInput` (defined in `protocol/errors.py`, which
the wire format shares) and the node's own kinds of it."""

from ..protocol.errors import BadInput

__all__ = ["BadInput", "Diverged", "RunFinished"]


class Diverged(BadInput):
    """A node's own parameters or tracker are no longer finite: its training diverged (a step size too
    large, or a hostile neighbour mixed in without `--robust clip`). It must not send them: no codec
    can encode them and no receiver would accept them."""


class RunFinished(BadInput):
    """The run a node waits to (re)join has finished: its members are done."""
