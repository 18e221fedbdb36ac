"""The round driver's mailbox: messages by phase for the current epoch, later epochs held back.

`Inbox.collect` waits for every in-neighbour's message of a round, up to a deadline, and keeps track
of silence: an in-neighbour that missed a deadline gets only a short grace after that, one that
missed `SILENT_ROUNDS` deadlines in a row is reported silent, and one that the epoch the run follows
leaves out is not waited for at all (DESIGN §8: after a crash is detected nobody waits for the node
again). A silent neighbour still gets the short grace until that epoch arrives: a node whose only
in-neighbour died must not race ahead of the run on its own data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from ..protocol.envelope import Envelope
from ..protocol.message import Message

logger = logging.getLogger(__name__)

SILENT_ROUNDS = 3  # deadlines missed in a row before a neighbour is reported silent (and at least
SILENT_SECONDS = 10.0  # this long without a message from it: a neighbour still finishing the last epoch is not silent)
ABSENT_GRACE_S = 2.0  # how long an in-neighbour that missed a deadline is waited for
# Frames of later epochs kept until this node enters that epoch, in all and per sender (an honest sender
# is at most a few rounds into an epoch this node has not entered yet: a couple of frames a round).
MAX_HELD = 4096
MAX_HELD_BYTES = 1 << 30
MAX_HELD_PER_SENDER = 64
MAX_HELD_BYTES_PER_SENDER = 256 << 20
# A frame of an epoch that no record this node has read names, held this long, is let go: an honest
# sender entered that epoch from a record in the DHT, which this node reads within seconds of the
# frame (the frame wakes its read). Its pull value is superseded and its pushed mass is in the next
# running sum, so letting it go loses nothing; a member that parks frames of an epoch that never
# comes no longer keeps its share of the hold until the run ends.
UNCLAIMED_HOLD_S = 60.0


class HeldFrame(NamedTuple):
    sender: str  # peer id
    env: Envelope  # a frame of a later epoch
    since: float  # monotonic time it was held


class Inbox:
    def __init__(
        self,
        silent_seconds: float = SILENT_SECONDS,
        max_held: tuple[int, int] = (MAX_HELD, MAX_HELD_BYTES),
        max_held_per_sender: tuple[int, int] = (MAX_HELD_PER_SENDER, MAX_HELD_BYTES_PER_SENDER),
    ) -> None:
        self.silent_seconds = silent_seconds
        self.max_held, self.max_held_per_sender = max_held, max_held_per_sender  # (frames, payload bytes)
        self.last_heard: dict[int, float] = {}  # in-neighbour -> monotonic time of its last message
        self.by_phase: dict[str, list[Message]] = {}
        self.held: list[HeldFrame] = []
        self.arrival = asyncio.Event()
        self.misses: dict[int, int] = {}  # in-neighbour -> deadlines missed in a row
        self.entered = time.monotonic()
        self.newest_round = -1  # the latest round any in-neighbour has sent in this epoch
        self.sent_round: dict[tuple[str, int], int] = {}  # (phase, in-neighbour) -> its latest round sent in this epoch

    def put(self, msg: Message) -> None:
        self.by_phase.setdefault(msg.phase, []).append(msg)
        self.misses.pop(msg.src, None)
        self.newest_round = max(self.newest_round, msg.round)
        self._sent(msg.phase, msg.src, msg.round)
        self.last_heard[msg.src] = time.monotonic()
        self.arrival.set()

    def moved_past(self, src: int, phase: str, k: int) -> None:
        """In-neighbour `src` sent a `phase` message of round k that this node could not take (too far
        ahead of its round): it will not send the rounds before k again, so they are not waited for."""
        self._sent(phase, src, k)
        self.arrival.set()

    def _sent(self, phase: str, src: int, k: int) -> None:
        """Note that in-neighbour `src` has sent its `phase` message of round k in this epoch."""
        self.sent_round[(phase, src)] = max(self.sent_round.get((phase, src), -1), k)

    def hold(self, sender: str, env: Envelope) -> bool:
        """Keep a frame of a later epoch; False (not kept) when that would pass a bound, in all or for
        `sender`. The newest frame is the one refused: its sender hears so and sends full state later."""
        size = env.nbytes
        frames, nbytes = len(self.held), sum(h.env.nbytes for h in self.held)
        mine = [h.env.nbytes for h in self.held if h.sender == sender]
        if frames + 1 > self.max_held[0] or nbytes + size > self.max_held[1]:
            return False
        if len(mine) + 1 > self.max_held_per_sender[0] or sum(mine) + size > self.max_held_per_sender[1]:
            return False
        self.held.append(HeldFrame(sender, env, time.monotonic()))
        # a sender that moved on to a later epoch is not waited for in this one (RoundDriver.excluded): wake
        # a waiting round to see it. Unwoken, a member that read the record late, still in the old epoch,
        # waited out --round-timeout for a neighbour that had entered the new one, and its own
        # out-neighbours, in either epoch, waited behind it (60 s twice near a run's end, where the lead is short)
        self.arrival.set()
        return True

    def release_unclaimed(self, newest_epoch: int, after: float = UNCLAIMED_HOLD_S) -> list[HeldFrame]:
        """Let go of the frames of epochs after `newest_epoch` (the newest this node has read) held longer
        than `after` seconds; returns them."""
        now = time.monotonic()
        keep, unclaimed = [], []
        for h in self.held:
            (unclaimed if h.env.epoch > newest_epoch and now - h.since > after else keep).append(h)
        self.held = keep
        return unclaimed

    def enter_epoch(self, epoch: int, convert: Callable[[str, Envelope], Message | None]) -> int:
        """Forget the old epoch's messages and take the held ones of `epoch`; returns how many."""
        self.by_phase, self.misses, self.last_heard = {}, {}, {}
        self.entered = time.monotonic()
        self.newest_round, self.sent_round = -1, {}
        keep, taken = [], 0
        for held in self.held:
            sender, env = held.sender, held.env
            if env.epoch == epoch:
                msg = convert(sender, env)
                if msg is not None:
                    self.by_phase.setdefault(msg.phase, []).append(msg)
                    self.newest_round = max(self.newest_round, msg.round)
                    self._sent(msg.phase, msg.src, msg.round)  # it has come: asynchronous rounds must not wait again
                    taken += 1
            elif env.epoch > epoch:
                keep.append(held)
        self.held = keep
        return taken

    def _limit(self, waiting: list[int], limit: float) -> float:
        """`limit` while an in-neighbour waited for is present; the short grace once every one of them
        missed the last deadline."""
        return limit if any(j not in self.misses for j in waiting) else min(ABSENT_GRACE_S, limit)

    def late(self) -> set[int]:
        """In-neighbours that missed the last deadline."""
        return {j for j, n in self.misses.items() if n > 0}

    def silent(self) -> set[int]:
        """In-neighbours that missed SILENT_ROUNDS deadlines in a row and sent nothing for silent_seconds
        (counted from this node's entry into the epoch at the earliest)."""
        now = time.monotonic()
        return {
            j
            for j, n in self.misses.items()
            if n >= SILENT_ROUNDS and now - self.last_heard.get(j, self.entered) >= self.silent_seconds
        }

    async def wait_for_lag(
        self,
        phase: str,
        k: int,
        in_neighbours: tuple[int, ...],
        lag: int,
        limit: float,
        excluded: Callable[[], set[int]],
    ) -> None:
        """Asynchronous rounds: wait, up to `limit`, until every in-neighbour has sent a `phase` message of
        round k - lag or later (a slow node still sends every round, so this waits for its messages, never
        for its gradients). An in-neighbour that does not in time misses this round; one that missed the
        last deadline already gets only the short grace, as in `collect` (a crashed one must not cost every
        round its whole limit until the run's epoch leaves it out)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            self.arrival.clear()
            skip = excluded()
            late = [j for j in in_neighbours if j not in skip and self.sent_round.get((phase, j), -1) < k - lag]
            end = start + self._limit(late, limit)
            if not late or loop.time() >= end:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrival.wait(), end - loop.time())
        for j in late:
            self.misses[j] = self.misses.get(j, 0) + 1

    def take(self, phase: str, k: int) -> list[Message]:
        """Asynchronous rounds: every message of `phase` up to round k that has arrived, without waiting.
        A neighbour's messages of a later round stay for that round: taken early, pushed mass entered a
        round before its sender's own tau did and pulled values ran a round ahead of this node's (1-7% of
        messages; holding them gained 0.6-1.1 points on digits). Misses are `wait_for_lag`'s to count:
        counted here too, a silent neighbour missed two deadlines a round, and one not waited for (the
        push around a slow member) one it never had, which cut its next wait to the short grace."""
        return self._up_to(phase, k)

    async def collect(
        self,
        phase: str,
        k: int,
        in_neighbours: tuple[int, ...],
        timeout: float,
        stopping: Callable[[], bool],
        excluded: Callable[[], set[int]],
        wait: bool = True,
    ) -> list[Message]:
        """Messages of `phase` up to round k, after waiting for each in-neighbour's round-k message or
        its deadline (`timeout` for a present neighbour, a short grace for an absent one, none for a
        silent or excluded one). Messages of later rounds stay for later."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        waiting: list[int] = []
        while wait:
            self.arrival.clear()
            inbox = self.by_phase.get(phase, [])
            heard = {m.src for m in inbox if m.round >= k} | self.past(k)
            skip = excluded()
            waiting = [j for j in in_neighbours if j not in heard and j not in skip]
            limit = self._limit(waiting, timeout)
            if stopping():
                limit = min(limit, 1.0)  # stopping or leaving: give in-flight messages a moment, then go on
            elapsed = loop.time() - start
            if not waiting or elapsed >= limit:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.arrival.wait(), limit - elapsed)
        if waiting:
            newly = [j for j in waiting if j not in self.misses]
            if newly:
                logger.warning("round %d %s: going on without node(s) %s", k, phase, newly)
            for j in waiting:
                self.misses[j] = self.misses.get(j, 0) + 1
        return self._up_to(phase, k)

    def past(self, k: int) -> set[int]:
        """In-neighbours that sent a message of a round after k, in any phase: they will send nothing more for
        round k (a link delivers in order, so what they sent for it has come or is lost). One that entered
        this epoch a round late, having read its record late, never sends the rounds it ran in the old
        one: waiting for its push of such a round, while it waited for this node's pull of the next,
        held both for --round-timeout."""
        return {j for (_, j), r in self.sent_round.items() if r > k}

    def _up_to(self, phase: str, k: int) -> list[Message]:
        """Removes and returns the messages of `phase` up to round k; those of later rounds stay."""
        inbox = self.by_phase.get(phase, [])
        self.by_phase[phase] = [m for m in inbox if m.round > k]
        return [m for m in inbox if m.round <= k]
