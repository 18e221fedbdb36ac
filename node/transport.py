"""A node's messages on the wire: frames in (validated, held back by epoch) and frames out (encoded,
delivered in the background so that a slow or dead out-neighbour never stalls a round).

The round driver calls `send_all` with an algorithm's messages and reads what arrived from `inbox`
(`node/rounds.py`); `enter_epoch` renumbers the peers for a new membership epoch.

A sender gets one message per (epoch, phase, round), for rounds within a window around this node's
(`SeenRounds`): a second, different one is refused and is a strike on the link layer (`Links.strike`);
the same frame again (a retry after a broken stream) is acknowledged and not used twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from hivemind.p2p import PeerID

from ..protocol.envelope import (
    Envelope,
    ProtocolError,
    from_message,
    pack,
    to_message,
    unpack,
)
from ..protocol.links import Links
from ..protocol.membership import EpochRecord
from ..protocol.message import Message
from .algorithms import Algorithm
from .rounds import UNCLAIMED_HOLD_S, Inbox

logger = logging.getLogger(__name__)

INLINE_BYTES = 1 << 20  # messages below this are encoded and decoded on the event loop
# After a failed send (or hello) a peer is skipped for RETRY_FIRST_S, doubling with each failure in a row up to
# RETRY_MAX_S. The first retry must come well before the receiver reports this node silent (its
# SILENT_SECONDS, 10 s): one dial lost to a lossy link must not cost a member its place in the run.
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 8.0

# A frame of this node's epoch for a round further ahead than this is refused: each accepted one waits in the
# inbox until its round, so this bounds a sender's share of it to about phases x AHEAD_ROUNDS frames. Honest
# senders do run ahead: in a directed ring a node does not wait for its out-neighbours, and on a busy 2-core
# machine the daemon tests saw leads of 13 rounds (refusing those made the runs re-form needlessly).
AHEAD_ROUNDS = 64
BEHIND_ROUNDS = 256  # frames further behind are refused: no memory is kept of what was taken for them
SEEN_PER_SENDER = 2048  # (epoch, phase, round) keys remembered per sender, oldest forgotten first

Key = tuple[int, str, int]  # (epoch, phase, round)
_T = TypeVar("_T")  # what the work run by `Transport._off_loop` returns


def waiting(waits: dict, key: int | PeerID, now: float) -> bool:
    """Whether `key` (a peer) failed lately and is not to be tried again yet. `waits` maps a key to
    (not tried again until, failures in a row)."""
    return now < waits.get(key, (0.0, 0))[0]


def note_failure(waits: dict, key: int | PeerID, now: float) -> None:
    """`key` failed: wait RETRY_FIRST_S, doubling with each failure in a row up to RETRY_MAX_S. A failure
    while it already waits (a send queued behind the one that failed, failing with it) counts once."""
    until, failures = waits.get(key, (0.0, 0))
    if now >= until:
        waits[key] = (now + min(RETRY_MAX_S, RETRY_FIRST_S * 2**failures), failures + 1)


class SeenRounds:
    """The frames each sender delivered, by (epoch, phase, round), for rounds within a window of this node's."""

    def __init__(self, ahead: int = AHEAD_ROUNDS, behind: int = BEHIND_ROUNDS, per_sender: int = SEEN_PER_SENDER):
        self.ahead, self.behind, self.per_sender = ahead, behind, per_sender
        self.seen: dict[str, OrderedDict[Key, int]] = {}  # sender -> key -> hash of the frame taken for it
        self._pruned_at = -1

    def check(self, sender: str, key: Key, digest: int, current: int | None) -> str:
        """'new' (now remembered), 'repeat' (that very frame again), 'twice' (another frame for a key already
        taken), 'ahead' or 'behind' (outside the window around round `current`; None: no window yet)."""
        if current is not None:
            if key[2] > current + self.ahead:
                return "ahead"
            if key[2] < current - self.behind:
                return "behind"
            self._prune(current)
        keys = self.seen.setdefault(sender, OrderedDict())
        if key in keys:
            return "repeat" if keys[key] == digest else "twice"
        keys[key] = digest
        if len(keys) > self.per_sender:
            keys.popitem(last=False)
        return "new"

    def _prune(self, current: int) -> None:
        if current <= self._pruned_at:
            return
        self._pruned_at = current
        for keys in self.seen.values():
            for key in [k for k in keys if k[2] < current - self.behind]:
                del keys[key]

    def forget(self, sender: str, key: Key) -> None:
        self.seen.get(sender, {}).pop(key, None)

    def keep_only(self, senders: set[str]) -> None:
        for sender in set(self.seen) - senders:
            del self.seen[sender]


class Transport:
    """Frames between this node and its neighbours, for the epoch it is in.

    `known_peers()` lists who may send (None: no epoch known yet, frames are held); `may_hold(peer,
    epoch)` says whether a peer outside them may still have frames of `epoch` (None: of some epoch)
    held, as a joiner in a record this node has not read yet; `on_refused`, `on_heard` and
    `on_newer_epoch` tell the node about refused frames, live neighbours and an epoch it has not read
    yet."""

    def __init__(
        self,
        run_id: str,
        peer_id: str,
        inbox: Inbox,
        known_peers: Callable[[], set[str] | None],
        on_refused: Callable[[str, str], None],
        on_heard: Callable[[str, int, int], None],  # sender, round, frame bytes
        on_newer_epoch: Callable[[int], None],
        may_hold: Callable[[str, int | None], bool] | None = None,
        sent_to_an_earlier_process: Callable[[int], bool] | None = None,
    ) -> None:
        self.run_id, self.peer_id, self.inbox = run_id, peer_id, inbox
        self.may_hold = may_hold or (lambda sender, epoch: False)
        self.sent_to_an_earlier_process = sent_to_an_earlier_process or (lambda epoch: False)
        self.known_peers, self.on_refused, self.on_heard, self.on_newer_epoch = (
            known_peers,
            on_refused,
            on_heard,
            on_newer_epoch,
        )
        self.links: Links | None = None
        self.algorithm: Algorithm | None = None
        self.epoch = -1
        self.index = -1
        self.index_of: dict[str, int] = {}
        self.peer_of: dict[int, PeerID] = {}
        self.pending: dict[asyncio.Task, PeerID] = {}  # background sends and their destination
        self.unreachable: dict[int, tuple[float, int]] = {}  # out-neighbour -> (skipped until, failures in a row)
        self.reaching: set[PeerID] = set()  # in-neighbours being reached now (`reach`)
        self.unreached: dict[PeerID, tuple[float, int]] = {}  # in-neighbour -> (not tried again until, failures)
        self.seen = SeenRounds()
        self._decode = ThreadPoolExecutor(2, thread_name_prefix="p2pnode-decode")

    # --- receiving -------------------------------------------------------------------------------

    async def on_frame(self, data: bytes, peer: PeerID) -> bool:
        """Validate and queue one message; never raises (a bad message is logged and dropped)."""
        sender = str(peer)
        known = self.known_peers()
        # A joiner enters its first epoch at once and sends before its out-neighbours have read the record
        # that lets it in: refused, its first frames were lost, and the round that needed one waited out
        # --round-timeout (60 s, every member). A peer of the run outside the records read is decoded, and
        # its frame held if it is of a later epoch than this node has read.
        stranger = known is not None and sender not in known
        if stranger and not self.may_hold(sender, None):
            return self._refuse(sender, "not a member of this run")

        def decode() -> Envelope:
            env = unpack(data, run=self.run_id, senders=[sender])
            if env.sender != sender:
                raise ProtocolError(f"envelope claims sender {env.sender[-8:]} but came from {sender[-8:]}")
            return env

        try:
            env = await self._off_loop(decode, len(data))
        except ProtocolError as e:
            return self._refuse(sender, str(e))
        if stranger and not self.may_hold(sender, env.epoch):
            return self._refuse(sender, "not a member of this run")
        if env.epoch < self.epoch:
            return True  # sent before the sender entered this epoch: harmless, ignored
        if env.epoch > self.epoch and self.sent_to_an_earlier_process(env.epoch):
            # this process restarted, and the sender still runs an epoch whose member with this peer id is the
            # process before: taken and dropped. Held, they filled the hold in a round or two and were refused
            # ("too many frames held"), and each refusal kept the sender off this link for 1-8 s
            return True
        key = (env.epoch, env.phase, env.round)
        # A frame of a later epoch is held, bounded by the inbox; this node's round says nothing about it
        # (a joiner or a returning node may be far behind the round that epoch starts at).
        current = self._round() if env.epoch == self.epoch else None
        verdict = self.seen.check(sender, key, hash(data), current)
        if verdict == "ahead" and sender in self.index_of:
            # refused, so the sender sends full state later, but it has moved past this node's rounds up to
            # env.round: waiting for them (it will not send them again) held this node for --round-timeout
            self.inbox.moved_past(self.index_of[sender], env.phase, env.round)
        if verdict != "new":
            return self._judge_repeat(peer, env, verdict)
        try:
            if env.epoch > self.epoch or self.algorithm is None:
                self._hold(sender, env)
                return True
            msg = await self._off_loop(lambda: self.to_message(sender, env, strict=True), len(data))
        except ProtocolError as e:
            self.seen.forget(sender, key)  # not taken: the sender may send another frame for it
            return self._refuse(sender, str(e))
        if env.epoch != self.epoch:  # this node entered a later epoch while a large frame was decoded
            return True
        self.inbox.put(msg)
        self.on_heard(sender, env.round, len(data))
        return True

    def _round(self) -> int | None:
        """This node's round (None before it runs an epoch)."""
        return None if self.algorithm is None else self.algorithm.iteration

    def _judge_repeat(self, peer: PeerID, env: Envelope, verdict: str) -> bool:
        if verdict == "repeat":
            return True  # a retry of a frame already taken: acknowledged, not used twice
        where = f"round {env.round} phase {env.phase!r} of epoch {env.epoch}"
        if verdict == "twice":
            reason = f"a second, different message for {where}"
            if self.links is not None:
                self.links.strike(peer, reason)
            return self._refuse(str(peer), reason)
        return self._refuse(str(peer), f"{where} is too far {verdict} of this node's round {self._round()}")

    def _hold(self, sender: str, env: Envelope) -> None:
        """Keep a frame of an epoch this node has not entered yet; raises ProtocolError when the hold is full."""
        if not self.inbox.hold(sender, env):
            raise ProtocolError(f"too many frames held back for a later epoch (epoch {env.epoch})")
        if env.epoch > self.epoch:
            self.on_newer_epoch(env.epoch)  # the sender entered a later epoch first: keep it for then

    def release_unclaimed(self, newest_epoch: int) -> None:
        """Let go of frames held for an epoch after `newest_epoch` that no record has named for a while
        (rounds.UNCLAIMED_HOLD_S); logged and counted as refused once a sender, which may send those rounds again."""
        by_sender: dict[str, list[int]] = {}
        for h in self.inbox.release_unclaimed(newest_epoch):
            self.seen.forget(h.sender, (h.env.epoch, h.env.phase, h.env.round))
            by_sender.setdefault(h.sender, []).append(h.env.epoch)
        for sender, epochs in by_sender.items():
            held = f"{len(epochs)} frames of epoch {max(epochs)} held {UNCLAIMED_HOLD_S:.0f} s"
            self._refuse(sender, f"{held}: no epoch record names that epoch")

    def _refuse(self, sender: str, reason: str) -> bool:
        logger.warning("dropped a message from %s: %s", sender[-8:], reason)
        self.on_refused(sender, reason)
        return False

    def to_message(self, sender: str, env: Envelope, strict: bool = False) -> Message | None:
        if sender not in self.index_of or env.phase not in self.algorithm.phases:
            if strict:
                raise ProtocolError(f"not an in-neighbour in epoch {env.epoch}, or phase {env.phase!r} unknown")
            return None
        msg = to_message(env, self.index_of[sender], self.index)
        problem = self.algorithm.message_problem(msg)
        if problem is None:
            return msg
        if strict:
            raise ProtocolError(problem)
        self._refuse(sender, problem)  # a frame held for this epoch: dropped now, and its sender told
        return None

    # --- sending ---------------------------------------------------------------------------------

    async def send_all(self, messages: list[Message]) -> None:
        """Encode now, deliver in the background.

        Sends to one peer stay in order (the link's lock is FIFO). A failed send makes the algorithm
        send full state (a keyframe) on that link next time, and the peer is skipped for a while."""
        if not messages:
            return

        def encode(m: Message) -> bytes:
            return pack(from_message(m, self.run_id, m.epoch, self.peer_id))

        frames = await self._off_loop(lambda: [encode(m) for m in messages], sum(m.nbytes for m in messages))
        for m, frame in zip(messages, frames, strict=True):
            peer = self.peer_of[m.dst]
            task = asyncio.create_task(self._send_one(m.dst, peer, frame, m.epoch))
            self.pending[task] = peer
            task.add_done_callback(lambda t: self.pending.pop(t, None))

    async def _off_loop(self, work: Callable[[], _T], nbytes: int) -> _T:
        """Run encode/decode work in the decode pool, or inline when it is small: a thread hop costs
        more than packing a small message and would add to every round's latency."""
        if nbytes < INLINE_BYTES:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._decode, work)

    async def _send_one(self, dst: int, peer: PeerID, frame: bytes, epoch: int) -> None:
        """Send one frame of `epoch`; a failure in that epoch skips the link for a while (`note_failure`)."""
        loop = asyncio.get_running_loop()
        if waiting(self.unreachable, dst, loop.time()):
            self.algorithm.request_keyframe(dst)
            return
        if await self.links.send(peer, frame):
            self.unreachable.pop(dst, None)
        elif epoch == self.epoch:
            # still the same link. After an epoch change position dst may be another peer, or the same one:
            # an old epoch's frame refused then (too far ahead, say) must not skip the new epoch's first frames
            note_failure(self.unreachable, dst, loop.time())
            self.algorithm.request_keyframe(dst)

    def reach(self, in_neighbours: Iterable[int]) -> None:
        """Open a connection to each in-neighbour that has no link open to this node (`Links.reach`), in
        the background, so it can send here even if nobody can dial this node (behind a NAT). One that
        could not be reached is tried again on the schedule of a failed send (1, 2, 4, then every 8 s),
        not every round: while libp2p's dial backoff refuses it, each try fails at once."""
        now = asyncio.get_running_loop().time()
        for j in in_neighbours:
            peer = self.peer_of.get(j)
            if peer is None or peer in self.reaching or waiting(self.unreached, peer, now):
                continue
            self.reaching.add(peer)
            task = asyncio.create_task(self._reach_one(peer))
            task.add_done_callback(lambda t, peer=peer: self.reaching.discard(peer))

    async def _reach_one(self, peer: PeerID) -> None:
        if await self.links.reach(peer):
            self.unreached.pop(peer, None)
        else:
            note_failure(self.unreached, peer, asyncio.get_running_loop().time())

    async def drain(self, limit: float = 30.0) -> None:
        """Wait (at most `limit` seconds) for the background sends to finish."""
        if self.pending:
            await asyncio.wait(list(self.pending), timeout=limit)

    # --- epochs ----------------------------------------------------------------------------------

    def enter_epoch(self, record: EpochRecord, algorithm: Algorithm) -> None:
        """Number the peers as `record` does; take the frames held for it; give up sends to peers
        that are not in it (they would only wait out their timeouts)."""
        self.algorithm, self.epoch = algorithm, record.number
        self.index = record.members.index(self.peer_id)
        self.index_of = {p: i for i, p in enumerate(record.members)}
        self.peer_of = {i: PeerID.from_base58(p) for i, p in enumerate(record.members)}
        self.unreachable = {}
        staying = set(self.peer_of.values())
        for task, peer in list(self.pending.items()):
            if peer not in staying:
                task.cancel()
        self.inbox.enter_epoch(record.number, self.to_message)
        self.seen.keep_only(set(record.members) | {h.sender for h in self.inbox.held})

    def cancel(self) -> None:
        for task in list(self.pending):
            task.cancel()

    def shutdown(self) -> None:
        self.cancel()
        self._decode.shutdown(wait=True)
