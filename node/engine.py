"""Runs per-node algorithm objects in lockstep over in-memory links (the simulator's network)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from .algorithms.base import Algorithm, Message

Filter = Callable[[Message], bool]


class InMemoryNetwork:
    """Delivers every message of a phase before the next phase starts, counting what each node sends.

    `deliver`, if given, decides per message whether it arrives (tests use it to drop messages).
    """

    def __init__(self, nodes: Sequence[Algorithm], deliver: Filter | None = None) -> None:
        self.nodes = list(nodes)
        self.deliver = deliver
        self.bytes_sent = [0] * len(self.nodes)
        self.messages_sent = [0] * len(self.nodes)
        self._index = {a.node: i for i, a in enumerate(self.nodes)}

    def iteration(self, k: int) -> None:
        for phase in self.nodes[0].phases:
            inbox: dict[int, list[Message]] = defaultdict(list)
            for node in self.nodes:
                for m in node.outgoing(phase, k):
                    i = self._index[m.src]
                    self.bytes_sent[i] += m.nbytes
                    self.messages_sent[i] += 1
                    if self.deliver is None or self.deliver(m):
                        inbox[m.dst].append(m)
            for node in self.nodes:
                node.incoming(phase, k, inbox[node.node])
