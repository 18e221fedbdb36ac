"""Runs per-node algorithm objects in lockstep over in-memory links (the simulator's network).

Nodes have a fixed id (their index in `nodes`) for as long as the run lasts; the members of the
current epoch are a list of those ids, and a member's position in it is its node number in the
epoch's topology and messages. `change_epoch` installs a new member list (DESIGN §8); a member in
`down` has crashed: it neither sends nor receives until an epoch leaves it out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

from .algorithms.base import Algorithm, Message, on_device
from .topology import Topology

Filter = Callable[[Message], bool]


class InMemoryNetwork:
    """Delivers every message of a phase before the next phase starts, counting what each node sends.

    `deliver`, if given, decides per message whether it arrives (tests use it to drop messages).
    """

    def __init__(
        self, nodes: Sequence[Algorithm | None], deliver: Filter | None = None, members: Sequence[int] | None = None
    ) -> None:
        self.nodes: list[Algorithm | None] = list(nodes)
        self.deliver = deliver
        self.members: list[int] = list(range(len(self.nodes))) if members is None else list(members)
        self.epoch = 0
        self.down: set[int] = set()
        self.bytes_sent = [0] * len(self.nodes)
        self.messages_sent = [0] * len(self.nodes)

    def member(self, position: int) -> Algorithm:
        """The node object at `position` of the current epoch's member list."""
        return self.nodes[self.members[position]]

    def change_epoch(self, members: Sequence[int], topology: Topology) -> None:
        """From the next iteration on, `members` (node ids, in order) run on `topology` (over positions)."""
        if topology.n != len(members):
            raise ValueError(f"topology has {topology.n} nodes for {len(members)} members")
        self.epoch += 1
        self.members = list(members)
        self.down -= set(self.members)  # a member of the new epoch runs (a restarted node is a new object)
        for position, node_id in enumerate(self.members):
            self.nodes[node_id].enter_epoch(topology.neighbourhood(position), self.epoch)

    def iteration(self, k: int) -> None:
        active = [(p, n) for p, n in enumerate(self.members) if n not in self.down]
        phases = self.nodes[active[0][1]].phases if active else ()
        for phase in phases:
            inbox: dict[int, list[Message]] = defaultdict(list)
            for _, node_id in active:
                for m in self.nodes[node_id].send(phase, k):
                    self.bytes_sent[node_id] += m.nbytes
                    self.messages_sent[node_id] += 1
                    if self.deliver is None or self.deliver(m):
                        inbox[m.dst].append(m)
            for position, node_id in active:
                node = self.nodes[node_id]
                node.receive(phase, k, on_device(inbox[position], node.params.device))
