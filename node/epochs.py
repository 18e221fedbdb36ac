"""Membership epochs: which record a node follows and what the coordinator proposes (DESIGN §8).

Pure decisions over what a node read from the DHT (heartbeats and epoch records); the I/O lives in
`node/membership.py`. Every node applies the same rules to the same data, so they agree without a
server:
- the record everyone follows is the compatible one with the highest number (ties: lowest proposer);
- the coordinator is the live member of that record with the lowest peer id; if it dies, the next
  lowest takes over because the dead one is no longer live;
- the coordinator proposes the next epoch when a member is gone (expired heartbeat, or reported
  silent by a live member), is leaving, or a compatible peer outside the record wants in (a joiner,
  or the members of another epoch after a partition healed). Survivors keep their order, joiners are
  appended. The new epoch takes effect `lead` rounds after the furthest member's round, so that
  every member reads it before then. One change at a time: nothing new is proposed until every
  member that stays has entered the current record (its heartbeat names the record's hash).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from ..protocol.membership import EpochRecord, MemberInfo

MIN_LEAD_ROUNDS = 3  # an epoch takes effect at least this many rounds after it is proposed
ACTIVE = ("joining", "training", "leaving")  # statuses of peers that still take part or want to

# (member peer ids) -> (rounds, rounds per pass over the data): the run's length, fixed at epoch 0
Schedule = Callable[[list[MemberInfo]], tuple[int, int]]


def compatible(info: MemberInfo, fingerprint: str, settings_hash: str) -> bool:
    return info.fingerprint == fingerprint and info.settings_hash == settings_hash


def current_record(records: Iterable[EpochRecord], fingerprint: str, settings_hash: str) -> EpochRecord | None:
    """The record the run follows: the highest-ranked one with this run's trunk and settings."""
    ok = [r for r in records if r.fingerprint == fingerprint and r.settings_hash == settings_hash and r.members]
    return max(ok, key=lambda r: r.rank, default=None)


def live(record: EpochRecord, infos: Iterable[MemberInfo]) -> dict[str, MemberInfo]:
    """Members of `record` with a fresh heartbeat from the same process that are still taking part
    (a peer that restarted since has a new incarnation: its old membership is gone)."""
    return {m.peer_id: m for m in infos if record.includes(m.peer_id, m.incarnation) and m.status in ACTIVE}


def gone(record: EpochRecord, infos: list[MemberInfo]) -> set[str]:
    """Members of `record` that no longer take part: no heartbeat, or reported silent by a live member
    of the same epoch (a neighbour that has not heard from it for several rounds)."""
    alive = live(record, infos)
    silent = {p for m in alive.values() if m.epoch_hash == record.hash for p in m.silent}
    return (set(record.members) - set(alive)) | (silent & set(record.members))


def finished(record: EpochRecord, infos: Iterable[MemberInfo]) -> set[str]:
    """Members of `record` (the same processes) that reached the run's last round. They are not gone:
    the run has ended for this epoch, and no epoch follows it."""
    return {m.peer_id for m in infos if m.status == "done" and record.includes(m.peer_id, m.incarnation)}


def coordinator(record: EpochRecord, infos: list[MemberInfo]) -> str | None:
    """The live member of `record` with the lowest peer id."""
    out = gone(record, infos)
    candidates = [p for p in record.members if p not in out]
    return min(candidates, default=None)


def joiners(record: EpochRecord, infos: list[MemberInfo], fingerprint: str, settings_hash: str) -> list[str]:
    """Compatible peers outside `record` that want in: joiners, and members of another epoch (a healed
    partition: they follow a record that lost, and are let in like joiners). Sorted by peer id."""
    return sorted(
        m.peer_id
        for m in infos
        if not record.includes(m.peer_id, m.incarnation)
        and compatible(m, fingerprint, settings_hash)
        and (m.status == "joining" or (m.status == "training" and m.epoch_hash != record.hash))
    )


def next_epoch(
    record: EpochRecord, infos: list[MemberInfo], me: str, lead: int, now: float | None = None
) -> EpochRecord | None:
    """What coordinator `me` proposes after `record`, or None (no change, not its turn, or too late).

    Members run within a few rounds of each other (each waits for its in-neighbours), so the
    furthest round reported, the coordinator's own included, plus `lead` is still ahead of everyone."""
    if coordinator(record, infos) != me or finished(record, infos):
        # a member that is done ended the run: one that reads this later (its machine slept) must not
        # take it for gone and go on in an epoch of its own
        return None
    now = time.time() if now is None else now
    alive = live(record, infos)
    furthest = max((m.round for m in alive.values() if m.status != "joining"), default=record.start_round)
    if record.start_round > furthest:
        return None  # the last change has not taken effect yet: batch the next one after it
    out = gone(record, infos)
    leaving = {p for p, m in alive.items() if m.status == "leaving"}
    new = joiners(record, infos, record.fingerprint, record.settings_hash)
    if not (out or leaving or new):
        return None
    if any(m.epoch_hash != record.hash for p, m in alive.items() if p not in out):
        # Not every member that stays has entered it yet. Records are one per proposer, so a member that
        # read the next one first would never see this one: it would stay in the epoch before, sending to
        # its old neighbours, while its new ones wait out timeouts for it (seen under load in CI).
        return None
    # Members of a healed partition trained on their own side meanwhile, maybe past this side's rounds:
    # the new epoch starts ahead of them too (one that entered late, far ahead of the others, would
    # wait out timeouts in every round while they catch up). The members behind jump forward to it.
    furthest = max([furthest] + [m.round for m in infos if m.peer_id in new and m.status == "training"])
    start = furthest + max(lead, MIN_LEAD_ROUNDS)
    if start >= record.rounds:  # near the end: a shorter lead (a member that reads it late enters late)
        start = furthest + MIN_LEAD_ROUNDS
    if start >= record.rounds:
        return None  # the run ends first
    survivors = [p for p in record.members if p not in out and p not in leaving]
    members = survivors + [p for p in new if p not in survivors]
    if not members:
        return None
    incarnation = {p: i for p, i in zip(record.members, record.incarnations, strict=True)}
    incarnation |= {m.peer_id: m.incarnation for m in infos if m.peer_id in new}
    return EpochRecord(
        number=record.number + 1,
        start_round=start,
        members=tuple(members),
        incarnations=tuple(incarnation[p] for p in members),
        donors=tuple(survivors),
        rounds=record.rounds,
        per_epoch=record.per_epoch,
        fingerprint=record.fingerprint,
        settings_hash=record.settings_hash,
        proposer=me,
        created=now,
    )


def first_epoch(
    infos: list[MemberInfo],
    me: MemberInfo,
    nodes: int,
    schedule: Schedule,
    previous: EpochRecord | None = None,
    now: float | None = None,
    settled: bool = True,
) -> EpochRecord | None:
    """Epoch 0 of a new run, or the first epoch of a run whose members are all gone (everyone
    restarted): proposed by the first of the peers it takes, once `nodes` compatible peers are
    waiting. It starts at the furthest round they checkpointed; a run that went on keeps its schedule.

    A restarted run may go on with fewer (as many as its last epoch had), but only once `settled`:
    this node has waited a while for the others. Its last epoch can be smaller than the run (one
    formed while everyone was leaving), and its members come back seconds apart: the first one back
    must not train the rest of the run alone and leave the others a finished run."""
    waiting = waiting_peers(infos, me, one_per_share=previous is None)
    needed = nodes if previous is None or not settled else min(nodes, len(previous.members))
    if len(waiting) < needed:
        return None
    chosen = waiting if previous is not None else waiting[:nodes]
    if chosen[0].peer_id != me.peer_id:
        return None
    start = max(m.round for m in chosen)
    if previous is not None and start > 0:
        rounds, per_epoch = previous.rounds, previous.per_epoch
    else:
        rounds, per_epoch = schedule(chosen)
    return EpochRecord(
        number=0 if previous is None else previous.number + 1,
        start_round=start,
        members=tuple(m.peer_id for m in chosen),
        incarnations=tuple(m.incarnation for m in chosen),
        donors=(),
        rounds=rounds,
        per_epoch=per_epoch,
        fingerprint=me.fingerprint,
        settings_hash=me.settings_hash,
        proposer=me.peer_id,
        created=time.time() if now is None else now,
    )


def _same_share(a: MemberInfo, b: MemberInfo) -> bool:
    """Both take their data by the same --index of --split (no --classes of their own)."""
    return a.index >= 0 and a.index == b.index and not a.classes and not b.classes


def waiting_peers(infos: Iterable[MemberInfo], me: MemberInfo, one_per_share: bool = True) -> list[MemberInfo]:
    """The compatible peers waiting to join, in order; with `one_per_share`, a new run's view: of two
    peers on one share of --split only the first (the other stops at `index_taken`)."""
    waiting = sorted(
        (m for m in infos if m.status == "joining" and compatible(m, me.fingerprint, me.settings_hash)),
        key=lambda m: m.sort_key,
    )
    return [m for m in waiting if index_taken(waiting, m) is None] if one_per_share else waiting


def index_taken(infos: Iterable[MemberInfo], me: MemberInfo) -> MemberInfo | None:
    """A peer waiting for a new run's first epoch with this node's --index and before it in order: two
    volunteers given the same --index would train one share of --split twice and leave another untrained."""
    return next(
        (
            m
            for m in infos
            if m.peer_id != me.peer_id
            and m.status == "joining"
            and _same_share(m, me)
            and m.sort_key < me.sort_key
            and compatible(m, me.fingerprint, me.settings_hash)
        ),
        None,
    )
