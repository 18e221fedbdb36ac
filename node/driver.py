"""The round driver: runs a node's algorithm round after round and enters each membership epoch at
its start round (DESIGN §8).

Between rounds it follows the epoch record the run follows (`node.agent.record`): at its start round
the node takes its new position, neighbourhood and fresh links, or, if the record leaves it out, stops
training (to leave, or to rejoin as a joiner). In a round, each phase sends the algorithm's messages,
waits for the in-neighbours' (`Inbox.collect`), and applies them in the training thread.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from typing import TYPE_CHECKING

from ..protocol.membership import EpochRecord, MemberInfo
from . import epochs
from .algorithms.base import on_device
from .finish import FINISHED_WITHOUT_THIS_NODE
from .pace import SLOW_RATIO, unwrapped
from .topology import make_topology, slow_mixing_warning

if TYPE_CHECKING:
    from .daemon import Node

logger = logging.getLogger(__name__)

# --sync async: a round waits for its in-neighbours' messages of rounds k - MAX_LAG or later, in its later phases
# only while no member is slow (`excluded_in_later_phases`); a node whose gradients take SLOW_RATIO
# (node/pace.py) times as long as the other members' (the median), by a fifth of a round or more (WAIT_SHARE),
# goes on without waiting for them once an in-neighbour is ahead, so the others wait for its messages, never
# its gradients
MAX_LAG = 0
WAIT_SHARE = 0.2  # --sync async: a node waits for its own gradient if that makes its rounds at most this much longer
JUMP_AFTER_POLLS = 6  # a member far behind an epoch record jumps to it once it has followed it this many polls


class RoundDriver:
    """Drives one node; `await driver.train(record)` runs it from `record` to an outcome."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def enter_epoch(self, record: EpochRecord, k: int) -> None:
        """Run in `record`'s epoch from round k on: new positions, neighbourhood and fresh links."""
        node = self.node
        s = node.settings
        previous = node.record
        node.record = record
        node.index = record.members.index(node.peer_id)
        topo = make_topology(s.topology, len(record.members), s.seed)
        if previous is not None:  # the first epoch's count was warned about at start (build_settings)
            warning = slow_mixing_warning(s.topology, len(record.members), grown_from=len(previous.members))
            if warning:
                logger.warning("epoch %d: %s", record.number, warning)  # the run grew past what the ring mixes
        node.algorithm.enter_epoch(topo.neighbourhood(node.index), record.number)
        node.algorithm.iteration = k
        node.transport.enter_epoch(record, node.algorithm)
        # a member is a process: a peer that restarted since the last epoch left and joined again
        before = set(zip(previous.members, previous.incarnations, strict=True)) if previous is not None else set()
        after = set(zip(record.members, record.incarnations, strict=True))
        change = {
            "round": k,
            "epoch": record.number,
            "members": list(record.members),
            "joined": [p for p, i in sorted(after - before)] if previous else [],
            "left": [p for p, i in sorted(before - after)],
        }
        node.log.epochs.append(change)
        node.store.events.write(
            "epoch_change",
            start_round=k,
            **{x: change[x] for x in change if x != "round"},
        )
        if node.metrics is not None:
            node.metrics.epoch_changed(record.number, record.members)
        node.info.status = "training" if node.info.status != "leaving" else "leaving"
        node.agent.acknowledge(record)
        hood = node.algorithm.hood
        node.transport.reach(hood.in_neighbours)  # behind a NAT they could not open their links otherwise
        logger.info(
            "epoch %d at round %d: node %d of %d, in-neighbours %s, out-neighbours %s",
            record.number,
            k,
            node.index,
            len(record.members),
            list(hood.in_neighbours),
            list(hood.out_neighbours),
        )

    def hurry(self) -> bool:
        """Stopping or leaving: wait only briefly for in-neighbours (their messages still count if in time)."""
        node = self.node
        return node.stop_requested.is_set() or node.leave_by is not None

    def others_stay(self) -> bool:
        """Whether another live member of this epoch goes on training (else a leaver need not wait). A
        member still `joining` in the last heartbeat read counts: the epoch names it, so it is entering it
        (read right after the epoch formed, every other member still says `joining`)."""
        node = self.node
        alive = epochs.live(node.record, node.agent.infos)
        gone = epochs.gone(node.record, node.agent.infos)
        staying = ("joining", "training")
        return any(m.status in staying and p != node.peer_id and p not in gone for p, m in alive.items())

    def excluded(self) -> set[int]:
        """Positions of in-neighbours not to wait for: those the epoch the run follows leaves out (a
        bounded exemption: this node enters that epoch at its start round), the process included: a
        member that crashed and came back is let in again as a new process, and its old one never sends
        (before, its neighbours waited out --round-timeout and then crawled on the short grace up to the
        epoch that let it in again, hundreds of rounds ahead), those that said they left or are done,
        and those that already sent a message of a later epoch (they moved on). A neighbour that is
        merely silent still gets the short grace: a node whose in-neighbours all died must not race
        ahead of the run on its own data."""
        node = self.node
        out = {m.peer_id for m in node.agent.infos if m.status in ("left", "done")}
        latest = node.agent.record
        if latest is not None and latest.rank > node.record.rank:
            record = node.record
            out |= {p for p, i in zip(record.members, record.incarnations, strict=True) if not latest.includes(p, i)}
            # a sender of frames of an epoch this node has not read yet keeps its grace: skipping it would
            # let this node race ahead alone until it reads the record (it asks for it at once)
            out |= {h.sender for h in node.inbox.held if h.env.epoch <= latest.number}
        index_of = node.transport.index_of
        return {index_of[p] for p in out if p in index_of and p != node.peer_id}

    def excluded_in_later_phases(self) -> set[int]:
        """Asynchronous rounds: in-neighbours not to wait for in a later phase (P2P-FT's push, which a node
        sends after its gradient). While every member keeps pace, those of `excluded`: a round takes its
        neighbours' mass of that round, as with `wait` (taken as it came, a round late, it cost 0.6 points
        on equal machines). Once a member that does not pace its batch takes SLOW_RATIO times the members'
        median or longer for its gradients (their DHT records), none: waiting for the mass of the members
        around it chained every round through the slow one's wait for its own gradient (fast nodes' rounds
        1.41x the clean run's instead of 1.14x), so mass is added as it comes, and the running sums lose
        none of it. A member pacing its batch (`--pace-batch`) sends its push about on time, and its mass
        taken a round late cost more than the wait (docs/slow-volunteers.md: "A slow node's batch")."""
        full = self.node.settings.batch_size
        members = self._timed_members(with_own=True)
        times = [m.step_seconds for m in members]
        late = [m.step_seconds for m in members if not 0 < m.batch < full]  # a pacing member keeps pace
        if len(times) >= 2 and late and max(late) >= SLOW_RATIO * statistics.median(times):
            return set(range(len(self.node.record.members)))
        return self.excluded()

    def behind(self) -> bool:
        """Asynchronous rounds: whether this round must go on without waiting for this node's own gradient
        (node/pace.py): an in-neighbour is already in a later round and this machine is slow, its
        gradients taking SLOW_RATIO times as long as the other members' (from their DHT records) or
        longer, by WAIT_SHARE of a round or more. A node as fast as the others waits for its gradient (a
        stale one costs accuracy); a slow one keeps exchanging at the run's pace and folds its gradients
        in as they come."""
        node = self.node
        # a paced gradient started before mixing (`BackgroundGradients.start`) holds the round only for its rest
        seconds = getattr(node.algorithm.objective, "round_wait_seconds", None)
        if seconds is None:
            return False
        members = set(node.record.members) - {node.peer_id}
        others = [m for m in node.agent.infos if m.peer_id in members]
        # messages say where in-neighbours are; DHT records say it too for algorithms that seldom send (DIMAT)
        ahead = max([node.inbox.newest_round, *(m.round for m in others)]) > node.round
        pace = self.pace()
        if not (ahead and pace is not None and seconds >= SLOW_RATIO * pace):
            return False
        # waiting makes each round (seconds - pace) longer than the others': less than a fifth of a round is
        # cheaper than a late gradient (on a loaded machine gradients of a few ms vary 2x from one to the next)
        rounds = node.agent.round_times
        return not rounds or seconds - pace >= WAIT_SHARE * statistics.median(rounds)

    def gradient_budget(self) -> float | None:
        """`--pace-batch`: the seconds a paced gradient aims at: the other members' (`pace`) plus half the
        share of a round a node waits for its own gradient (WAIT_SHARE), so it is waited for (fresh) and
        makes the rounds at most a tenth longer. Aiming at the others' time alone made a machine give up
        whose gradients carry fixed costs (the default model's few ms): one sample took twice the others'
        5 ms and it went back to late gradients of 16, where a round of 39 ms could wait for a batch of 4."""
        pace = self.pace()
        if pace is None:
            return None
        rounds = self.node.agent.round_times
        return pace + WAIT_SHARE / 2 * statistics.median(rounds) if rounds else pace

    def pace(self) -> float | None:
        """The seconds the other members' gradients of the full --batch-size take (the median of their DHT
        records; None while none has said). A member pacing its batch (`--pace-batch`) is left out: its
        gradients are short because it matched them to the others', and counting them made every member
        chase the others' shrinking times down (in a testnet with one 5x node, the three others went to
        batches of 3-5 and the slow one to 1-2).
        Read from the gradient thread too: it only reads."""
        if self.node.record is None:
            return None
        full = self.node.settings.batch_size
        pace = [m.step_seconds for m in self._timed_members(with_own=False) if not 0 < m.batch < full]
        return statistics.median(pace) if pace else None

    def _timed_members(self, with_own: bool) -> list[MemberInfo]:
        """The members of this node's epoch that published their gradients' time (those known yet)."""
        node = self.node
        members = set(node.record.members) - (set() if with_own else {node.peer_id})
        return [m for m in node.agent.infos if m.peer_id in members and m.step_seconds > 0]

    def far_behind(self, latest: EpochRecord, k: int) -> bool:
        """Whether `latest` starts further ahead than any lead a coordinator schedules at this node's
        pace: this node fell behind the run (its side of a partition was slower, its machine slept, or
        its old epoch's other members moved on), and its old epoch would crawl there on timeouts."""
        lead = self.node.agent.lead_rounds()
        return latest.start_round - k > max(2 * lead, lead + 10)

    def others_entered(self, latest: EpochRecord) -> bool:
        """Whether another member of `latest` has entered it (its heartbeat acknowledges it): the run's
        rounds up to its start are over, and a node that fell behind them (a leaver nobody waits for, and
        with `--sync async` a slow one) would train the rest of its old epoch alone on its own data (a 5x
        leaver once ran 70 rounds so and saved a checkpoint at 80% where it had had 93%)."""
        me = self.node.peer_id
        entered = {m.peer_id for m in self.node.agent.infos if m.epoch_hash == latest.hash}
        return bool(entered & set(latest.members) - {me})

    def finished_without_this_node(self) -> bool:
        """Whether a member of this node's epoch finished the run in another epoch: the run went on without
        this node (its machine slept) and ended before this node read the epochs that left it out. Training
        on alone to the end would give a model nobody shares. (Members that finish in this node's own epoch
        are a run ending as usual.)"""
        record = self.node.record
        return bool(epochs.finished(record, (m for m in self.node.agent.infos if m.epoch_hash != record.hash)))

    async def train(self, record: EpochRecord) -> str:
        """Rounds until the end ('done'), a stop ('stopped'), a graceful leave ('left') or an epoch that
        leaves this node out ('left out'); FINISHED_WITHOUT_THIS_NODE when it woke from a stall to find
        nobody else of the run."""
        node = self.node
        loop = asyncio.get_running_loop()
        s = node.settings
        k = max(record.start_round, node.round if node.record is not None else 0)
        self.enter_epoch(record, k)
        await self.jump(node.round, k)
        while k < node.rounds:
            if node.stop_requested.is_set():
                return "stopped"
            if node.leave_by is not None and loop.time() > node.leave_by:
                logger.warning("no epoch without this node came within --leave-timeout: leaving anyway")
                return "left"
            if node.leave_by is not None and not self.others_stay():
                return "left"  # nobody stays to form an epoch without this node
            latest = node.agent.record
            if latest is not None and latest.rank > node.record.rank:
                due = k >= latest.start_round
                behind = not due and self.far_behind(latest, k)
                if not node.in_record(latest) and (due or behind or self.others_entered(latest)):
                    # left out; one far behind, or behind the others, stops now: waiting out the old epoch's
                    # rounds helps nobody
                    return "left" if node.leave_by is not None else "left out"
                if due:
                    self.enter_epoch(latest, k)  # at its start round, or at once if this node read it late
                # Being far from a record just read is no sign of having fallen behind: the coordinator's
                # lead is three polls at its pace, and under load this node's pace can halve a moment later
                # (the coordinator once jumped 487 rounds past its own fresh record; its neighbours, left
                # without it, crawled and jumped too).
                elif behind and node.agent.record_age() > JUMP_AFTER_POLLS * node.agent.poll:
                    # it enters at once at the start round; tracking restarts exactly there, whatever it skipped
                    logger.warning("epoch %d starts at round %d, far ahead of this node's round %d: jumping to it",
                                   latest.number, latest.start_round, k)  # fmt: skip
                    self.enter_epoch(latest, latest.start_round)
                    await self.jump(k, latest.start_round)
                    k = latest.start_round
            node.transport.release_unclaimed(max(node.record.number, latest.number if latest is not None else -1))
            if node.agent.deserted:  # it slept, and woke to find no trace of the others (node/membership.py)
                return FINISHED_WITHOUT_THIS_NODE
            if self.finished_without_this_node():  # it rejoins, learns that the run finished, writes its result
                logger.warning("members of this node's epoch finished the run in an epoch it has not read: left out")
                return "left out"
            started = time.perf_counter()
            await self.run_round(k)
            node.info.step_seconds = getattr(node.algorithm.objective, "seconds", None) or 0.0
            node.info.batch = getattr(unwrapped(node.algorithm.objective), "batch_size", 0)
            node.info.gradient_weight = node.algorithm.gradient_weight or 1.0
            k += 1
            node.round = node.info.round = k
            seconds = time.perf_counter() - started
            node.log.round_seconds += seconds
            node.agent.round_times.append(seconds)
            if node.metrics is not None:
                node.metrics.observe_round(k, seconds)
                node.metrics.set_bytes(node.links.bytes_sent, node.links.frames_sent)
            if k % node.per_epoch == 0 and node.algorithm.asynchronous:  # evaluate beside the rounds
                node.evaluations.append(asyncio.create_task(node.end_of_epoch(k // node.per_epoch)))
            elif k % node.per_epoch == 0:
                await node.end_of_epoch(k // node.per_epoch)
            if k % s.checkpoint_every == 0:
                await loop.run_in_executor(node.compute, node.checkpoint)
        return "done"

    async def jump(self, k: int, to: int) -> None:
        """Move this node from round k to round `to` without training the rounds between (it enters an
        epoch that starts there). A pass over the data that ends in the skipped rounds still gets its
        evaluation, of the parameters the node has now: the history stays one entry per pass it reached."""
        node = self.node
        node.round = node.info.round = to
        if k // node.per_epoch < to // node.per_epoch:
            await node.end_of_epoch(to // node.per_epoch)

    async def run_round(self, k: int) -> None:
        node = self.node
        loop = asyncio.get_running_loop()
        algo = node.algorithm
        for phase in algo.phases:
            out = await loop.run_in_executor(node.compute, algo.send, phase, k)
            await node.transport.send_all(out)
            waiting_since = time.perf_counter()
            if algo.asynchronous:  # mix the newest values and whatever mass has come
                # a round in which nobody sends (DIMAT between merges) is no round an in-neighbour missed
                if algo.expects_messages(phase, k):
                    limit = 1.0 if self.hurry() else node.settings.round_timeout
                    skip = self.excluded if phase == algo.phases[0] else self.excluded_in_later_phases
                    await node.inbox.wait_for_lag(phase, k, algo.hood.senders(k), MAX_LAG, limit, skip)
                arrived = node.inbox.take(phase, k)
            else:
                wait = bool(algo.hood.senders(k)) and algo.expects_messages(phase, k)
                arrived = await node.inbox.collect(
                    phase,
                    k,
                    algo.hood.senders(k),  # on a graph whose links change by round, that round's only
                    node.settings.round_timeout,
                    self.hurry,
                    self.excluded,
                    wait,
                )
            node.log.wait_seconds += time.perf_counter() - waiting_since
            for j in node.inbox.silent():
                node.agent.report_silent(node.record.members[j])
            # open a connection to every in-neighbour that missed a deadline, long before it counts as
            # silent: it can then send over it even if its own dials fail (lossy link, NAT, dial backoff)
            node.transport.reach(node.inbox.late())
            arrived = on_device(arrived, algo.params.device)
            await loop.run_in_executor(node.compute, algo.receive, phase, k, arrived)
