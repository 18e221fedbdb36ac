"""A node's view of the run's membership, kept fresh in the background (DESIGN §8).

`MembershipAgent` publishes this node's heartbeat, reads the run's heartbeats and epoch records
every `poll` seconds, and, when this node is the coordinator, proposes the next epoch (the rules are
in `node/epochs.py`). The round driver reads `agent.record` (the epoch the run follows) between
rounds and reports silent in-neighbours through `agent.report_silent`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable

from hivemind.utils import get_dht_time

from ..protocol.membership import EpochRecord, MemberInfo, Membership
from . import epochs
from .errors import BadInput, RunFinished

logger = logging.getLogger(__name__)

EPOCH_TTL = 3600.0  # epoch records live this long unless the coordinator refreshes them
LEAD_CAP_ROUNDS = 500  # an epoch is never scheduled further ahead than this
BEATS_IN_FLIGHT = 3  # heartbeats stored at once at most (each waits out unresponsive DHT peers)
RESTART_GRACE_BEATS = 2  # a restarted run waits this many heartbeats for all its nodes before going on with fewer
STALL_BEATS = 3  # this process heard nothing of its own loops for this many heartbeats: the machine slept
WAKE_GRACE_BEATS = 5  # after such a stall, reads finding nobody count towards going on alone only this much later


def settings_differences(theirs: dict[str, str], ours: dict[str, str], most: int = 4) -> str:
    """'--epochs 10 there, 40 here; --lr ...' for the run settings two peers show differently ('' if
    either shows none: an older peer)."""
    if not theirs or not ours:
        return ""
    names = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
    shown = [f"--{k.replace('_', '-')} {theirs.get(k, '(none)')} there, {ours.get(k, '(none)')} here" for k in names]
    return "; ".join(shown[:most]) + (f"; {len(shown) - most} more" if len(shown) > most else "")


class MembershipAgent:
    """Heartbeats, epoch records and the coordinator role of one node. Build with `await create(...)`."""

    def __init__(self, membership: Membership, info: MemberInfo, heartbeat: float) -> None:
        self.membership = membership
        self.info = info
        self.heartbeat = heartbeat
        self.poll = min(1.0, heartbeat)
        self.infos: list[MemberInfo] = []
        self._seen: dict[str, tuple[MemberInfo, float]] = {}  # every member read, with its record's expiration
        self.records: list[EpochRecord] = []
        self.record: EpochRecord | None = None  # the epoch record the run follows
        self._followed_at = time.monotonic()  # when this node began to follow `record`
        self.round_times: deque[float] = deque(maxlen=20)  # recent seconds per round, to schedule epochs ahead
        self.on_change: Callable[[EpochRecord], None] | None = None
        self._silent: set[str] = set()
        self._tasks: list[asyncio.Task] = []
        self._refreshed = 0.0
        self._wake = asyncio.Event()
        self._pending: set[asyncio.Task] = set()  # announcements in flight
        self._alone_since: float | None = None  # when a read first left this node the only one of its epoch
        self._last_tick = time.monotonic()  # the latest turn of the heartbeat or read loop
        self._woke_at = -math.inf  # when this process last resumed after a stall (a machine that slept)
        self.deserted = False  # woke from a stall to find no other member's record: see `_woke_to_nobody`

    @classmethod
    async def create(cls, membership: Membership, info: MemberInfo, heartbeat: float) -> MembershipAgent:
        self = cls(membership, info, heartbeat)
        await self.announce()
        self._last_tick = time.monotonic()  # a slow first store is no stall
        self._tasks = [asyncio.create_task(self._beat()), asyncio.create_task(self._watch())]
        return self

    async def shutdown(self) -> None:
        if self._pending:  # let status changes (left, done) reach the DHT before it stops
            await asyncio.wait(list(self._pending), timeout=5.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    # --- publishing ------------------------------------------------------------------------------

    async def announce(self) -> None:
        """Publish this node's heartbeat now (status changes should not wait for the next beat)."""
        self.info.silent = sorted(self._silent)
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.membership.announce, self.info)
        except Exception as e:
            logger.warning("membership refresh failed: %s", e)

    def announce_soon(self) -> None:
        """Publish now without waiting for it (`shutdown` lets such publications finish first)."""
        task = asyncio.get_running_loop().create_task(self.announce())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    def report_silent(self, peer_id: str) -> None:
        if peer_id not in self._silent:
            self._silent.add(peer_id)
            logger.warning("reporting peer %s silent: no message for several rounds", peer_id[-8:])
            self.announce_soon()

    def heard_from(self, peer_id: str) -> None:
        self._silent.discard(peer_id)

    def acknowledge(self, record: EpochRecord) -> None:
        """This node now runs in `record`'s epoch (published with the next heartbeat, or now)."""
        self.info.epoch, self.info.epoch_hash = record.number, record.hash
        self._silent &= set(record.members)
        self.announce_soon()

    async def _beat(self) -> None:
        """A heartbeat every `heartbeat` s, on that schedule whatever a store takes: a DHT peer that stops
        answering (a laptop asleep) makes stores take seconds, and waiting for one before the next let
        this node's record expire between them (its coordinator then dropped a live member)."""
        while True:
            await asyncio.sleep(self.heartbeat)
            self._tick()
            if len(self._pending) < BEATS_IN_FLIGHT:
                self.announce_soon()

    # --- reading and coordinating ----------------------------------------------------------------

    def _tick(self) -> None:
        """Note a turn of a loop; a gap of STALL_BEATS heartbeats or more means this process was stopped
        (its machine slept) and has just resumed."""
        now = time.monotonic()
        if now - self._last_tick >= STALL_BEATS * self.heartbeat:
            self._woke_at = now
            logger.info("resumed after %.0f s without a heartbeat (did the machine sleep?)", now - self._last_tick)
        self._last_tick = now

    async def refresh(self) -> None:
        """Read heartbeats and epoch records now; propose the next epoch if this node coordinates."""
        self._tick()
        loop = asyncio.get_running_loop()
        try:
            read = await loop.run_in_executor(None, self.membership.read_members)
            self.records = await loop.run_in_executor(None, self.membership.epochs)
        except Exception as e:
            logger.warning("reading the run's membership failed: %s", e)
            return
        self.infos = self._remember(read, get_dht_time())
        found = epochs.current_record(self.records, self.info.fingerprint, self.info.settings_hash)
        if found is not None and (self.record is None or found.rank > self.record.rank):
            self._follow(found)
            logger.info(
                "epoch %d from round %d: %d member(s), coordinator %s",
                found.number,
                found.start_round,
                len(found.members),
                found.proposer[-8:],
            )
        if self.record is not None and self.record.proposer == self.info.peer_id:
            await self._keep_alive(self.record)
        if self.record is not None and self.info.epoch_hash:
            await self._coordinate(self.record)

    def _remember(self, read: list[tuple[MemberInfo, float]], now: float) -> list[MemberInfo]:
        """The members `read` names, and those an earlier read saw whose records have not expired yet:
        a read that missed a heartbeat (slow, partial DHT answers) must not make a member look gone."""
        seen = {info.peer_id: (info, expires) for info, expires in read}
        for peer, (info, expires) in self._seen.items():
            if expires > now and (peer not in seen or seen[peer][0].updated < info.updated):
                seen[peer] = (info, expires)
        self._seen = seen
        return sorted((info for info, _ in seen.values()), key=lambda m: m.sort_key)

    def lead_rounds(self) -> int:
        """How many rounds ahead to schedule an epoch: three polls' worth at the current pace (the
        median of recent rounds), so every member reads the record before it takes effect. A member
        that reads it late still enters at its next round (DESIGN §8 tolerates it: links restart)."""
        if not self.round_times:
            return epochs.MIN_LEAD_ROUNDS
        pace = statistics.median(self.round_times)
        return min(LEAD_CAP_ROUNDS, math.ceil(3 * self.poll / max(pace, 1e-4)) + 2)

    async def _coordinate(self, record: EpochRecord) -> None:
        lead = self.lead_rounds()
        own = dataclasses.replace(self.info, updated=time.time())  # this node's round is fresh, not extrapolated
        mine = [m for m in self.infos if m.peer_id != self.info.peer_id] + [own]
        proposal = epochs.next_epoch(record, mine, self.info.peer_id, lead)
        if proposal is None:
            self._alone_since = None
        elif self._confirmed_alone(record, proposal):
            if self._woke_to_nobody(record, proposal):
                self._desert(record)
            else:
                await self.propose(proposal)

    def _leaves_alone(self, record: EpochRecord, proposal: EpochRecord) -> bool:
        """Whether `proposal` leaves this node alone where `record` had others."""
        return proposal.members == (self.info.peer_id,) and len(record.members) > 1

    def _confirmed_alone(self, record: EpochRecord, proposal: EpochRecord) -> bool:
        """False until reads a heartbeat apart agree that everyone else left, the first of them
        WAKE_GRACE_BEATS heartbeats or more after this process last resumed from a stall. A node that
        wakes from sleep reads the DHT through a routing table of peers that have exited: one read, and
        in CI once two reads 2 s apart, found neither the others' heartbeats nor their done records, and
        it trained the rest of the run alone."""
        if not self._leaves_alone(record, proposal):
            self._alone_since = None
            return True
        now = time.monotonic()
        if now - self._woke_at < WAKE_GRACE_BEATS * self.heartbeat:
            self._alone_since = None
            return False
        if self._alone_since is None:
            self._alone_since = now
            logger.info("no other member of epoch %d found; reading again before going on alone", record.number)
        return now - self._alone_since >= self.heartbeat

    def _woke_to_nobody(self, record: EpochRecord, proposal: EpochRecord) -> bool:
        """Whether this process resumed from a stall while following `record` and reads (past the wake
        grace) find no record at all of its other members: no heartbeat, no `left`, no `done`. Their
        records lived in their own DHT processes; once those exit, a node that slept through the end of
        the run cannot tell a finished run from one whose members crashed. Either way, training the rest
        alone gives a model nobody shares (in CI it did so, to 33.6%)."""
        if not self._leaves_alone(record, proposal) or self._woke_at < self._followed_at:
            return False
        others = set(record.members) - {self.info.peer_id}
        return not any(m.peer_id in others for m in self.infos)

    def _desert(self, record: EpochRecord) -> None:
        if not self.deserted:
            logger.warning(
                "woke from a stall to find no record of the other %d member(s) of epoch %d: the run finished "
                "or went on without this node; ending with its own parameters (restart to rejoin a run still going)",
                len(record.members) - 1,
                record.number,
            )
        self.deserted = True

    async def propose(self, record: EpochRecord) -> None:
        loop = asyncio.get_running_loop()
        try:
            stored = await loop.run_in_executor(None, self.membership.propose, record, EPOCH_TTL)
        except Exception as e:
            logger.warning("proposing epoch %d failed: %s", record.number, e)
            return
        if stored:
            self._refreshed = loop.time()
            logger.info(
                "proposed epoch %d from round %d: members %s",
                record.number,
                record.start_round,
                [p[-8:] for p in record.members],
            )
            self.records.append(record)
            if self.record is None or record.rank > self.record.rank:
                self._follow(record)

    def _follow(self, record: EpochRecord) -> None:
        self.record, self._followed_at = record, time.monotonic()
        if self.on_change is not None:
            self.on_change(record)

    def record_age(self) -> float:
        """Seconds since this node began to follow its current record (read it, or proposed it)."""
        return time.monotonic() - self._followed_at

    async def _keep_alive(self, record: EpochRecord) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() - self._refreshed > EPOCH_TTL / 4:
            with contextlib.suppress(Exception):
                await loop.run_in_executor(None, self.membership.propose, record, EPOCH_TTL)
            self._refreshed = loop.time()

    async def _watch(self) -> None:
        while True:
            await self.refresh()
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll)

    def wake(self) -> None:
        self._wake.set()

    # --- joining ---------------------------------------------------------------------------------

    async def wait_for_epoch(
        self,
        run_id: str,
        nodes: int,
        schedule: epochs.Schedule,
        timeout: float,
        stopped: Callable[[], bool],
        after: EpochRecord | None = None,
    ) -> EpochRecord | None:
        """Wait for an epoch record that names this node's process (newer than `after`); propose epoch 0
        when the run has none (or only one whose members are all gone) and `nodes` compatible peers are
        waiting. None if `stopped()` first; BadInput after `timeout` s, RunFinished if the run has finished."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        settle_at = loop.time() + RESTART_GRACE_BEATS * self.heartbeat
        refused: set[str] = set()
        last_count = -1
        me = self.info
        while loop.time() < deadline and not stopped():
            await self.refresh()
            record, infos = self.record, self.infos
            self._log_refused(infos, refused)
            named = record is not None and record.includes(me.peer_id, me.incarnation)
            if named and (after is None or record.rank > after.rank):
                return record
            alive = set(epochs.live(record, infos)) if record is not None else set()
            stale = record is not None and not alive
            # a left-out node may still hold the epoch it was in (it missed the later ones): it is live there itself
            if record is not None and not alive - {me.peer_id} and epochs.finished(record, infos):
                raise RunFinished(
                    f"run {run_id!r} has finished (its members are done): there is nothing to join; "
                    "start a new run with another --run-id"
                )
            taken = epochs.index_taken(infos, me) if record is None else None
            if taken is not None:
                raise BadInput(
                    f"peer {taken.peer_id[-8:]} already takes --index {me.index} in run {run_id!r}: give this node "
                    f"another --index (0-{nodes - 1}), or its own --classes"
                )
            if record is None or stale:
                settled = loop.time() >= settle_at
                proposal = epochs.first_epoch(infos, me, nodes, schedule, record if stale else None, settled=settled)
                if proposal is not None:
                    await self.propose(proposal)
                    continue
            count = len(epochs.waiting_peers(infos, me))  # two on one --index count once
            if count != last_count:
                if record is None or stale:
                    logger.info("%d of %d members present", count, nodes)
                else:
                    logger.info("run in progress (epoch %d): waiting to be let in as a joiner", record.number)
                last_count = count
            await asyncio.sleep(self.poll)
        if stopped():
            return None
        raise BadInput(f"only {last_count} of {nodes} members joined run {run_id!r} within {timeout:.0f} s")

    def _log_refused(self, infos: list[MemberInfo], refused: set[str]) -> None:
        """One warning per peer whose trunk or settings differ from this run's."""
        me = self.info
        for m in infos:
            if m.peer_id in refused or epochs.compatible(m, me.fingerprint, me.settings_hash):
                continue
            refused.add(m.peer_id)
            differ = settings_differences(m.settings, me.settings)
            if m.fingerprint != me.fingerprint:  # the frozen trunk's weights: --model, --model-seed, the weights file
                same = "the same settings: another --checkpoint file or pretrained weights" if m.settings else ""
                detail, what = differ or same or f"{m.fingerprint} vs {me.fingerprint}", "trunk differs"
            else:
                detail, what = differ or f"{m.settings_hash} vs {me.settings_hash}", "settings differ"
            logger.warning("refusing peer %s: its %s from this run's (%s)", m.peer_id[-8:], what, detail)
