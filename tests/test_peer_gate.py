"""A node's gate: which peers may open a stream to it (node/peer_gate.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from p2pnode.node.peer_gate import PeerGate

pytestmark = pytest.mark.timeout(30)


class FakeAgent:
    """What the gate reads of a membership agent: the record the run follows, heartbeats, wake()."""

    def __init__(self, members: tuple[str, ...] = (), heartbeats: tuple[str, ...] = ()) -> None:
        self.record = SimpleNamespace(members=members) if members else None
        self.infos = [SimpleNamespace(peer_id=p) for p in heartbeats]
        self.wakes = 0

    def wake(self) -> None:
        self.wakes += 1


class Invited:
    def __init__(self, *peers: str) -> None:
        self.peers = set(peers)

    def admitted(self, peer_id: str) -> bool:
        return peer_id in self.peers


def make_gate(running=None, admission=None, stopping=lambda: False, wait_s=0.2) -> PeerGate:
    return PeerGate(admission, lambda: running, stopping, wait_s=wait_s, poll_s=0.01)


def test_known_peers_are_none_until_an_epoch_is_known_then_the_members_of_both_records():
    gate = make_gate()
    assert gate.known_peers() is None
    gate.agent = FakeAgent(members=("a", "b"))
    assert gate.known_peers() == {"a", "b"}
    gate.running_record = lambda: SimpleNamespace(members=("b", "c"))
    assert gate.known_peers() == {"a", "b", "c"}


def test_a_peer_seen_only_by_its_heartbeat_is_a_member_of_an_open_run():
    gate = make_gate()
    gate.agent = FakeAgent(heartbeats=("new",))
    assert gate.is_member("new")
    assert not gate.is_member("stranger")


def test_a_joiners_frames_may_be_held_only_for_an_epoch_newer_than_the_record_this_node_follows():
    """A joiner heartbeats before the record that lets it in is read: its frames of a newer epoch than the
    followed record's may be held; of that epoch or an older one (which this node has read without it),
    not; a peer without a heartbeat, and in a closed run one without an invitation, never."""
    gate = make_gate()
    gate.agent = FakeAgent(members=("a", "b"), heartbeats=("a", "b", "joiner"))
    gate.agent.record.number = 1
    assert gate.may_hold("joiner", None) and gate.may_hold("joiner", 2)
    assert not gate.may_hold("joiner", 1) and not gate.may_hold("joiner", 0)
    assert not gate.may_hold("stranger", None) and not gate.may_hold("stranger", 2)
    closed = make_gate(admission=Invited("a", "b"))
    closed.agent = gate.agent
    assert not closed.may_hold("joiner", 2)


def test_a_closed_run_refuses_a_listed_peer_without_a_valid_invitation():
    gate = make_gate(running=SimpleNamespace(members=("a", "b")), admission=Invited("a"))
    assert gate.is_member("a")
    assert not gate.is_member("b")


def test_a_stranger_is_refused_after_the_wait_and_then_at_once_without_new_reads():
    async def scenario():
        gate = make_gate(wait_s=0.2)
        gate.agent = FakeAgent(members=("a",))
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert not await gate.admits("stranger")
        waited = loop.time() - started
        assert gate.agent.wakes == 1  # it asked for fresh membership reads before refusing
        started = loop.time()
        assert not await gate.admits("stranger")
        return waited, loop.time() - started, gate.agent.wakes

    waited, again, wakes = asyncio.run(scenario())
    assert waited >= 0.2
    assert again < 0.1
    assert wakes == 1


def test_a_peer_whose_record_arrives_during_the_wait_is_admitted():
    async def scenario():
        gate = make_gate(wait_s=5.0)
        gate.agent = FakeAgent(members=("a",))

        async def record_arrives():
            await asyncio.sleep(0.05)
            gate.agent.infos.append(SimpleNamespace(peer_id="joiner"))

        arrival = asyncio.create_task(record_arrives())
        admitted = await gate.admits("joiner")
        await arrival
        return admitted

    assert asyncio.run(scenario())


def test_a_stopping_node_refuses_an_unknown_peer_without_waiting():
    async def scenario():
        gate = make_gate(stopping=lambda: True, wait_s=5.0)
        gate.agent = FakeAgent(members=("a",))
        loop = asyncio.get_running_loop()
        started = loop.time()
        refused = not await gate.admits("stranger")
        return refused, loop.time() - started, await gate.admits("a")

    refused, took, member_admitted = asyncio.run(scenario())
    assert refused and took < 1.0
    assert member_admitted  # a member is admitted even then: its last messages still count
