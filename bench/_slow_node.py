"""Shared by the simulator benches that give node 3 a slow objective of their own."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import p2pnode.node.simulator as simulator
from p2pnode.node.algorithms.base import Objective


@contextlib.contextmanager
def slow_node_as(make: Callable[[Objective, float, bool], Objective]) -> Iterator[None]:
    """Let the simulator build its slow nodes' objectives with `make` while the block runs."""
    original = simulator.slow_objective
    simulator.slow_objective = make
    try:
        yield
    finally:
        simulator.slow_objective = original
