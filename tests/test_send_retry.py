"""A send that fails (a dial lost to a lossy link, libp2p's dial backoff) must not cost a member its
place: the sender tries that peer again long before the receiver would report it silent, and the
receiver opens a connection to an in-neighbour as soon as it misses a deadline, so the sender can
reach it over that connection even while its own dials fail."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from p2pnode.node.rounds import SILENT_SECONDS, Inbox
from p2pnode.node.transport import RETRY_FIRST_S, RETRY_MAX_S, Transport
from p2pnode.protocol.message import Message


class ScriptedLinks:
    """Links whose sends and reaches succeed or fail as scripted; counts those that were tried."""

    def __init__(self, outcomes: list[bool], reaches: list[bool] | None = None) -> None:
        self.outcomes = outcomes
        self.reaches = reaches or []
        self.tried = 0
        self.reached = 0

    async def reach(self, peer) -> bool:
        self.reached += 1
        return self.reaches.pop(0)  # fails at once, as while libp2p's dial backoff refuses the peer

    async def send(self, peer, data: bytes) -> bool:
        self.tried += 1
        await asyncio.sleep(0.01)  # a dial takes a while: sends to the same peer queue up meanwhile
        return self.outcomes.pop(0)


def make_transport(links: ScriptedLinks, keyframes: list[int]) -> Transport:
    transport = Transport(
        "run",
        "me",
        Inbox(),
        known_peers=lambda: None,
        on_refused=lambda sender, reason: None,
        on_heard=lambda *heard: None,
        on_newer_epoch=lambda epoch: None,
    )
    transport.links = links
    transport.peer_of = {1: "out-neighbour"}
    transport.algorithm = SimpleNamespace(request_keyframe=keyframes.append)
    return transport


def test_a_peer_whose_send_failed_is_tried_again_well_before_the_receiver_would_report_it_silent():
    async def scenario():
        links, keyframes = ScriptedLinks([False, False, False, False, False, True]), []
        transport = make_transport(links, keyframes)
        loop = asyncio.get_running_loop()
        skips = []
        for _ in range(5):
            transport.unreachable[1] = (0.0, transport.unreachable.get(1, (0.0, 0))[1])  # the skip has run out
            await transport._send_one(1, "out-neighbour", b"frame", transport.epoch)
            until, _ = transport.unreachable[1]
            skips.append(round(until - loop.time(), 1))
        tried = links.tried
        await transport._send_one(1, "out-neighbour", b"frame", transport.epoch)  # within the last skip: not tried
        skipped_without_trying = links.tried == tried
        transport.unreachable[1] = (0.0, transport.unreachable[1][1])
        await transport._send_one(1, "out-neighbour", b"frame", transport.epoch)  # succeeds: reachable again
        transport.shutdown()
        return skips, skipped_without_trying, transport.unreachable, keyframes

    skips, skipped_without_trying, unreachable, keyframes = asyncio.run(scenario())
    assert skips == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert RETRY_FIRST_S <= SILENT_SECONDS / 4 and RETRY_MAX_S < SILENT_SECONDS
    assert skipped_without_trying
    assert unreachable == {}
    assert keyframes == [1] * 6, "every failed or skipped send must make the next one carry full state"


def test_sends_queued_behind_a_failed_one_that_fail_with_it_count_as_one_failure():
    async def scenario():
        links = ScriptedLinks([False, False, False])
        transport = make_transport(links, [])
        await asyncio.gather(*(transport._send_one(1, "out-neighbour", b"frame", transport.epoch) for _ in range(3)))
        until, failures = transport.unreachable[1]
        skip = until - asyncio.get_running_loop().time()
        transport.shutdown()
        return links.tried, failures, skip

    tried, failures, skip = asyncio.run(scenario())
    assert tried == 3 and failures == 1 and 0.9 < skip <= RETRY_FIRST_S


def test_an_in_neighbour_that_cannot_be_reached_is_tried_again_on_the_retry_schedule_not_every_round():
    """Seen in CI: a node catching up after a healed partition ran hundreds of rounds a second, and tried
    a hello to its in-neighbour in every one of them (each refused at once by the dial backoff)."""

    async def scenario():
        links = ScriptedLinks([], reaches=[False, False, True])
        transport = make_transport(links, [])
        transport.peer_of = {1: "in-neighbour"}
        for _ in range(50):  # 50 rounds in quick succession, the in-neighbour late in each
            transport.reach([1])
            await asyncio.sleep(0.001)  # a round: the reach attempt of the last one has finished
        first = links.reached
        until, failures = transport.unreached["in-neighbour"]
        skip = until - asyncio.get_running_loop().time()
        transport.unreached["in-neighbour"] = (0.0, failures)  # the wait has run out
        transport.reach([1])
        await asyncio.sleep(0.01)
        second = transport.unreached["in-neighbour"][1]
        transport.unreached["in-neighbour"] = (0.0, second)
        transport.reach([1])
        await asyncio.sleep(0.01)
        transport.shutdown()
        return first, skip, second, links.reached, transport.unreached

    first, skip, failures, reached, unreached = asyncio.run(scenario())
    assert first == 1 and 0.9 < skip <= RETRY_FIRST_S
    assert failures == 2 and reached == 3
    assert unreached == {}, "a reach that worked clears the wait"


def test_a_send_that_fails_after_an_epoch_change_does_not_mark_the_new_peer_unreachable():
    async def scenario():
        links = ScriptedLinks([False])
        transport = make_transport(links, [])
        send = asyncio.create_task(transport._send_one(1, "old peer", b"frame", transport.epoch - 1))
        await send
        transport.shutdown()
        return transport.unreachable

    assert asyncio.run(scenario()) == {}


def message(src: int, k: int) -> Message:
    return Message(src=src, dst=0, round=k, phase="mix", kind="values", tensors={})


def test_an_in_neighbour_is_late_from_its_first_missed_deadline_until_it_is_heard_again():
    async def scenario():
        inbox = Inbox()
        inbox.put(message(1, 0))
        await inbox.collect("mix", 0, (1, 2), 0.05, lambda: False, set)
        after_first_miss = inbox.late(), inbox.silent()
        inbox.put(message(2, 1))
        await inbox.collect("mix", 1, (1, 2), 0.05, lambda: False, set)
        return after_first_miss, inbox.late()

    (late, silent), late_after = asyncio.run(scenario())
    assert late == {2} and silent == set(), "one missed deadline makes a neighbour late, not silent"
    assert late_after == {1}


def test_a_round_stops_waiting_for_an_in_neighbour_as_soon_as_a_frame_of_its_next_epoch_is_held():
    """The in-neighbour entered the next epoch (it read the record first) and will never send this round
    of the old one; its first frame of the new epoch is held, which makes it excluded. The waiting round
    must see that at once, not when its --round-timeout runs out."""
    from p2pnode.protocol.envelope import Envelope

    async def scenario():
        inbox = Inbox()
        moved_on = lambda: {1} if any(h.sender == "peer-1" for h in inbox.held) else set()  # noqa: E731
        frame = Envelope(run="r", epoch=1, round=5, phase="mix", seq=1, sender="peer-1", kind="values", tensors={})

        async def hold_soon():
            await asyncio.sleep(0.1)
            assert inbox.hold("peer-1", frame)

        loop = asyncio.get_running_loop()
        started = loop.time()
        _, arrived = await asyncio.gather(hold_soon(), inbox.collect("mix", 5, (1,), 30.0, lambda: False, moved_on))
        return loop.time() - started, arrived

    waited, arrived = asyncio.run(scenario())
    assert arrived == []
    assert waited < 5.0, f"waited {waited:.1f} s of a 30 s round timeout for a neighbour that had moved on"


def test_a_round_does_not_wait_for_a_phase_an_in_neighbour_skipped_once_its_next_round_has_come():
    """An in-neighbour that entered this epoch a round late never sends the push of the round it ran in
    the old epoch; its pull of the next round shows it has moved past. Waiting for the push (while it waits
    for this node's next pull) held both for the round timeout."""

    async def scenario():
        inbox = Inbox()
        inbox.put(Message(src=1, dst=0, round=6, phase="pull", kind="values", tensors={}))
        loop = asyncio.get_running_loop()
        started = loop.time()
        arrived = await inbox.collect("push", 5, (1,), 30.0, lambda: False, set)
        return loop.time() - started, arrived, inbox.late()

    waited, arrived, late = asyncio.run(scenario())
    assert arrived == [] and waited < 1.0, f"waited {waited:.1f} s for a push its sender had moved past"
    assert late == set(), "a neighbour that moved on missed no deadline"


def test_an_old_epochs_refused_frame_does_not_hold_back_the_new_epochs_first_frames_to_the_same_peer():
    """A node that ran ahead had its frames refused as too far ahead; it then entered the next epoch, where
    the same peer is its out-neighbour at the same position. The old frame's refusal, answered after the
    change, marked the new link unreachable and its first frames of the new epoch were skipped, so the peer
    waited out --round-timeout for them."""

    async def scenario():
        links, keyframes = ScriptedLinks([False, True]), []
        transport = make_transport(links, keyframes)
        transport.epoch = 0
        refused = asyncio.create_task(transport._send_one(1, "out-neighbour", b"old frame", 0))
        await asyncio.sleep(0)
        transport.epoch, transport.unreachable = 1, {}  # enter_epoch: same peer, same position
        await refused
        await transport._send_one(1, "out-neighbour", b"new frame", 1)
        transport.shutdown()
        return links.tried, transport.unreachable, keyframes

    tried, unreachable, keyframes = asyncio.run(scenario())
    assert tried == 2, "the new epoch's frame was sent, not skipped"
    assert unreachable == {} and keyframes == []
