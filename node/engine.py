"""Runs per-node algorithm objects in lockstep over in-memory links (the simulator's network).

Nodes have a fixed id (their index in `nodes`) for as long as the run lasts; the members of the
current epoch are a list of those ids, and a member's position in it is its node number in the
epoch's topology and messages. `change_epoch` installs a new member list (DESIGN §8); a member in
`down` has crashed: it neither sends nor receives until an epoch leaves it out. A node whose values
stopped being finite (`Diverged`) sends nothing more.

A message arrives in the phase it was sent in, unless `delay(message)` holds it back that many
rounds (asynchronous rounds, tests); messages on a link arrive in the order they were sent (a
stream). How a slow node's gradients lag is its objective's business (`node/pace.py`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

from .algorithms.base import Algorithm, Message, on_device
from .errors import Diverged
from .topology import Topology

logger = logging.getLogger(__name__)

Filter = Callable[[Message], bool]
Delay = Callable[[Message], int]


class InMemoryNetwork:
    """Delivers every message of a phase before the next phase starts, counting what each node sends.

    `deliver`, if given, decides per message whether it arrives (tests use it to drop messages).
    """

    def __init__(
        self,
        nodes: Sequence[Algorithm | None],
        deliver: Filter | None = None,
        members: Sequence[int] | None = None,
        delay: Delay | None = None,
    ) -> None:
        self.nodes: list[Algorithm | None] = list(nodes)
        self.deliver = deliver
        self.delay = delay
        self.queues: dict[int, list[tuple[int, Message]]] = defaultdict(list)  # node id -> (due round, message)
        self.link_due: dict[tuple[int, int], int] = {}  # (sender id, receiver id) -> due round of its last message
        self.members: list[int] = list(range(len(self.nodes))) if members is None else list(members)
        self.epoch = 0
        self.down: set[int] = set()
        self.diverged: set[int] = set()
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
        self.queues.clear()  # messages of the old epoch number its nodes differently: nobody applies them
        self.link_due.clear()
        self.down -= set(self.members)  # a member of the new epoch runs (a restarted node is a new object)
        for position, node_id in enumerate(self.members):
            self.nodes[node_id].enter_epoch(topology.neighbourhood(position), self.epoch)

    def iteration(self, k: int) -> None:
        active = [n for n in self.members if n not in self.down]
        phases = self.nodes[active[0]].phases if active else ()
        for phase in phases:
            for node_id in active:
                for m in self._send(node_id, phase, k):
                    self.bytes_sent[node_id] += m.nbytes
                    self.messages_sent[node_id] += 1
                    if self.deliver is None or self.deliver(m):
                        self._post(node_id, k, m)
            for node_id in active:
                node = self.nodes[node_id]
                node.receive(phase, k, on_device(self._arrived(node_id, phase, k), node.params.device))

    def _send(self, node_id: int, phase: str, k: int) -> list[Message]:
        """A node's messages; a node that diverged sends nothing more (its neighbours mix without it)."""
        if node_id in self.diverged:
            return []
        try:
            return self.nodes[node_id].send(phase, k)
        except Diverged as e:
            logger.warning("%s; it sends nothing more", e)
            self.diverged.add(node_id)
            return []

    def _post(self, sender: int, k: int, m: Message) -> None:
        receiver = self.members[m.dst]
        due = k + (self.delay(m) if self.delay is not None else 0)
        due = max(due, self.link_due.get((sender, receiver), due))  # a link delivers in order
        self.link_due[sender, receiver] = due
        self.queues[receiver].append((due, m))

    def _arrived(self, node_id: int, phase: str, k: int) -> list[Message]:
        """The messages of `phase` that reached node `node_id` by round k, taken off its queue."""
        queue = self.queues[node_id]
        ready = [m for due, m in queue if due <= k and m.phase == phase]
        if ready:
            self.queues[node_id] = [(due, m) for due, m in queue if not (due <= k and m.phase == phase)]
        return ready

    def in_flight(self) -> list[Message]:
        """Messages sent and not yet read by their receiver."""
        return [m for queue in self.queues.values() for _, m in queue]
