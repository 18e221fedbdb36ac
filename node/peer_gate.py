"""Which peers a node lets in: who may open a stream to it, and whose rounds' messages it takes (DESIGN §9).

A stream is admitted or refused before anything is read from it (`protocol/links.py` asks `admits`).
A member is a peer named by the epoch this node runs in or by the record the run follows, or one
whose heartbeat this node has read; in a closed run it must also have shown a valid, unrevoked
invitation. A peer not known yet may be a member whose record this node has not read (it just
started, or the peer just joined): its stream waits a few seconds for the next membership reads.
A refused peer is refused at once for the same few seconds, so a stranger's streams cost nothing more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from hivemind.p2p import PeerID

from ..protocol.admission import Admission
from ..protocol.membership import EpochRecord
from .membership import MembershipAgent

ADMIT_WAIT_S = 5.0  # how long a stream from a peer not known yet waits, unread, for the membership reads
POLL_S = 0.25  # how often such a stream looks again
REFUSED_MEMORY = 4096  # refused peers remembered at most (then forgotten all at once)


class PeerGate:
    def __init__(
        self,
        admission: Admission | None,
        running_record: Callable[[], EpochRecord | None],
        stopping: Callable[[], bool],
        wait_s: float = ADMIT_WAIT_S,
        poll_s: float = POLL_S,
    ) -> None:
        """`admission`: a closed run's invitations (None: an open run). `running_record()`: the epoch
        this node runs in (None before its first). `stopping()`: the node is stopping (refuse at once)."""
        self.admission = admission
        self.running_record = running_record
        self.stopping = stopping
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.agent: MembershipAgent | None = None  # set once the node has joined the DHT
        self.refused_until: dict[str, float] = {}

    def known_peers(self) -> set[str] | None:
        """Peers that may send to this node: members of its epoch and of the record the run follows
        (None while this node knows of no epoch yet: frames are then held back)."""
        followed = self.agent.record if self.agent is not None else None
        records = [r for r in (self.running_record(), followed) if r is not None]
        return {p for r in records for p in r.members} if records else None

    def may_hold(self, peer_id: str, epoch: int | None) -> bool:
        """Whether frames of `epoch` (None: of any) from `peer_id`, who is in no epoch record this node has
        read, may be held for later: it is a member of the run as this node knows it (a heartbeat; in a
        closed run, a valid invitation) and the epoch is newer than the record this node follows, so the
        record that lets it in may not have been read yet."""
        followed = self.agent.record if self.agent is not None else None
        newer = epoch is None or followed is None or epoch > followed.number
        return newer and self.is_member(peer_id)

    def is_member(self, peer_id: str) -> bool:
        """A member of the run as this node knows it now (in a closed run, with a valid, unrevoked invitation)."""
        if self.admission is not None and not self.admission.admitted(peer_id):
            return False
        heartbeats = {m.peer_id for m in self.agent.infos} if self.agent is not None else set()
        return peer_id in heartbeats | (self.known_peers() or set())

    async def admits(self, peer: PeerID | str) -> bool:
        """Whether `peer` may open a stream to this node; waits `wait_s` at most for the membership reads."""
        peer_id = str(peer)
        loop = asyncio.get_running_loop()
        if loop.time() < self.refused_until.get(peer_id, 0.0):
            return False
        if self.is_member(peer_id):
            return True
        if self.agent is not None:
            self.agent.wake()  # read the membership records now rather than at the next heartbeat
        deadline = loop.time() + self.wait_s
        while loop.time() < deadline and not self.stopping():
            await asyncio.sleep(self.poll_s)
            if self.is_member(peer_id):
                return True
        if len(self.refused_until) >= REFUSED_MEMORY:
            self.refused_until.clear()
        self.refused_until[peer_id] = loop.time() + self.wait_s
        return False
