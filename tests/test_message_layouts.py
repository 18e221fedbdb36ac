"""What a daemon takes from a peer: only messages whose kind, tensors and sizes its algorithm sends.

Envelopes are checked for structure (test_envelope.py); these tests are about content. Before layouts,
a member's well-formed `value` without its tensor, or with one of the wrong length, was queued and made
the round's `incoming` raise in the compute thread (the daemon exited with a traceback), and a tensor of
one value broadcast over every parameter (a value of 1e6 moved the parameters by 5e5)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch
from test_exactness import problem

from p2pnode.node.algorithms import ALGORITHMS
from p2pnode.node.algorithms.base import StepRule
from p2pnode.node.rounds import MAX_HELD_PER_SENDER, UNCLAIMED_HOLD_S, Inbox
from p2pnode.node.topology import complete
from p2pnode.node.transport import AHEAD_ROUNDS, Transport
from p2pnode.protocol.codecs import get_codec
from p2pnode.protocol.envelope import from_message, pack
from p2pnode.protocol.message import Message

RUN = "layouts"
PEERS = ("me", "p1", "p2")
COMMUNICATING = sorted(name for name, cls in ALGORITHMS.items() if cls.communicates)


def node(name: str, i: int = 0, codec: str = "none"):
    objectives, _ = problem(n=3)
    x0 = torch.zeros(objectives[0].dim, dtype=torch.float64)
    algo = ALGORITHMS[name](
        complete(3).neighbourhood(i),
        objectives[i],
        x0,
        StepRule(lambda k: 1e-3),
        get_codec(codec) if codec != "none" else None,
    )
    algo.configure(iterations_per_epoch=1)  # DIMAT and its baselines merge every round
    return algo


@pytest.mark.parametrize("codec", ["none", "int8"])
@pytest.mark.parametrize("name", COMMUNICATING)
def test_every_message_an_algorithm_sends_fits_the_layouts_its_receivers_check(name, codec):
    """The check must never refuse an honest peer: every kind each built-in sends (values, copies and
    their keyframes, running-sum deltas and totals, SGP's weight, DIMAT's models) passes it."""
    assert ALGORITHMS[name].messages, f"{name} declares no message layouts: its receivers would check nothing"
    sender, receiver = node(name, 1, codec), node(name, 0, codec)
    sent = []
    for k in range(3):
        if k == 2:  # a link that lost a message sends full state next
            sender.request_keyframe(0)
        for phase in sender.phases:
            sent += [m for m in sender.send(phase, k) if m.dst == 0]
            sender.receive(phase, k, [])
    kinds = {(m.phase, m.kind, tuple(sorted(m.tensors))) for m in sent}
    assert kinds, f"{name} sent nothing to its out-neighbour"
    for m in sent:
        assert receiver.message_problem(m) is None, (m.phase, m.kind, sorted(m.tensors))
    if name == "p2pft":  # the keyframes as well as the increments were checked
        assert {k[:2] for k in kinds} >= (
            {("pull", "copy"), ("push", "total"), ("push", "delta")}
            if codec != "none"
            else {("pull", "value"), ("push", "total"), ("push", "delta")}
        )


def value(tensors: dict, phase: str = "pull", kind: str = "value", round_: int = 0) -> Message:
    return Message(1, 0, round_, phase, kind, tensors, seq=1)  # the first of its link


DIM = problem(n=3)[0][0].dim
MALFORMED = {
    "no tensor": ("p2pft", value({})),
    "a tensor of one value (it would broadcast)": ("p2pft", value({"v": torch.full((1,), 1e6)})),
    "a tensor too short": ("p2pft", value({"v": torch.zeros(DIM - 1)})),
    "a tensor of two dimensions": ("p2pft", value({"v": torch.zeros(1, DIM)})),
    "an extra tensor": ("p2pft", value({"v": torch.zeros(DIM), "w": torch.zeros(DIM)})),
    "a push kind in the pull phase": ("p2pft", value({"sigma": torch.zeros(DIM)}, kind="total")),
    "a running sum of the wrong length": ("p2pft", value({"sigma": torch.zeros(DIM + 3)}, "push", "total")),
    "a copy with both keyframe and increment": (
        "p2pft",
        value({"h": torch.zeros(DIM), "d": torch.zeros(DIM)}, kind="copy"),
    ),
    "an SGP weight of two values": ("sgp", value({"x": torch.zeros(DIM), "w": torch.ones(2)}, "push", "params")),
    "a DIMAT model without its tensor": ("dimat", value({"y": torch.zeros(DIM)}, "merge", "params")),
}


def transport_for(algo) -> tuple[Transport, Inbox, list]:
    inbox, refused = Inbox(), []
    transport = Transport(
        RUN,
        "me",
        inbox,
        known_peers=lambda: set(PEERS),
        on_refused=lambda sender, reason: refused.append((sender, reason)),
        on_heard=lambda *heard: None,
        on_newer_epoch=lambda epoch: None,
    )
    transport.algorithm, transport.epoch, transport.index = algo, 0, 0
    transport.index_of = {p: i for i, p in enumerate(PEERS)}
    return transport, inbox, refused


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_member_s_malformed_message_is_refused_on_arrival_and_its_good_one_for_that_round_is_taken(case):
    name, bad = MALFORMED[case]
    algo = node(name)
    transport, inbox, refused = transport_for(algo)
    frame = pack(from_message(bad, RUN, 0, "p1"))
    assert asyncio.run(transport.on_frame(frame, "p1")) is False
    assert inbox.by_phase.get(bad.phase, []) == [] and inbox.sent_round == {}
    assert [sender for sender, _ in refused] == ["p1"]
    # the refused frame did not use up the round: the sender's real message for it still gets in
    good = next(m for m in node(name, 1).send(algo.phases[0], 0) if m.dst == 0)
    assert asyncio.run(transport.on_frame(pack(from_message(good, RUN, 0, "p1")), "p1")) is True
    assert [m.kind for m in inbox.by_phase[good.phase]] == [good.kind]


def test_a_malformed_frame_held_for_a_later_epoch_is_dropped_when_the_node_enters_it():
    algo = node("p2pft")
    transport, inbox, refused = transport_for(algo)
    bad = value({"v": torch.zeros(3)})
    assert asyncio.run(transport.on_frame(pack(from_message(bad, RUN, 1, "p1")), "p1")) is True  # held
    assert len(inbox.held) == 1
    assert inbox.enter_epoch(1, transport.to_message) == 0
    assert inbox.by_phase == {} and inbox.held == []
    assert refused and "shape" in refused[0][1]


def test_frames_held_for_an_epoch_no_record_names_are_let_go_after_a_while_and_can_come_again():
    """A member could park frames of an epoch that never comes in its share of the hold until the run
    ended. Held past UNCLAIMED_HOLD_S with no record of their epoch read, they are let go (one refusal
    logged a sender), while frames of an epoch a record names, and young ones, stay; a let-go frame sent again is
    held again, not taken for a repeat of one already used."""
    algo = node("p2pft")
    transport, inbox, refused = transport_for(algo)
    good = next(m for m in node("p2pft", 1).send("pull", 0) if m.dst == 0)
    frames = {epoch: pack(from_message(good, RUN, epoch, "p1")) for epoch in (1, 7, 8)}
    for frame in frames.values():
        assert asyncio.run(transport.on_frame(frame, "p1")) is True
    transport.release_unclaimed(1)
    assert len(inbox.held) == 3 and refused == []  # young: the record may not have been read yet
    inbox.held = [h._replace(since=h.since - UNCLAIMED_HOLD_S - 1) for h in inbox.held]
    transport.release_unclaimed(1)
    assert [h.env.epoch for h in inbox.held] == [1]  # epoch 1 is named by a record this node has read
    assert len(refused) == 1 and refused[0][0] == "p1" and "epoch 8" in refused[0][1]
    assert asyncio.run(transport.on_frame(frames[7], "p1")) is True
    assert [h.env.epoch for h in inbox.held] == [1, 7]


def test_a_joiners_frame_of_an_epoch_this_node_has_not_read_is_held_and_taken_when_it_enters_it():
    """A joiner enters its first epoch at once and sends before its out-neighbours have read the record
    that lets it in. A peer of the run (`may_hold`: it heartbeats) outside the records read gets its frame
    of a later epoch held and taken when this node enters that epoch; before, it was refused as no member,
    and the round that needed it waited out --round-timeout at every member (a testnet stalled 60 s). A
    frame of an epoch this node has read, and any frame of a peer that is no member of the run, are refused."""
    algo = node("p2pft")
    transport, inbox, refused = transport_for(algo)
    transport.may_hold = lambda sender, epoch: sender == "joiner" and (epoch is None or epoch > 0)
    good = next(m for m in node("p2pft", 1).send("pull", 0) if m.dst == 0)
    assert asyncio.run(transport.on_frame(pack(from_message(good, RUN, 1, "joiner")), "joiner")) is True
    assert [h.sender for h in inbox.held] == ["joiner"] and refused == []
    assert asyncio.run(transport.on_frame(pack(from_message(good, RUN, 0, "joiner")), "joiner")) is False
    assert asyncio.run(transport.on_frame(pack(from_message(good, RUN, 1, "stranger")), "stranger")) is False
    assert [(s, r) for s, r in refused] == [
        ("joiner", "not a member of this run"),
        ("stranger", "not a member of this run"),
    ]
    transport.index_of = {"me": 0, "joiner": 1}  # epoch 1 lets the joiner in as this node's in-neighbour
    assert inbox.enter_epoch(1, transport.to_message) == 1
    assert [(m.src, m.kind) for m in inbox.by_phase["pull"]] == [(1, good.kind)]


@pytest.mark.parametrize("earlier_process", [True, False])
def test_frames_meant_for_the_process_before_a_restart_are_taken_and_dropped_not_held_until_refused(earlier_process):
    """A member that crashed and came back runs as a new process while the others still run an epoch
    whose member with its peer id is the old one, and send it a frame every round. Those frames are
    taken and dropped: held, they filled this sender's share of the hold within a round or two and were
    refused, and each refusal kept the sender off the link for 1-8 s. (Without the record that says so,
    the control case, they are held until the hold refuses them.)"""
    transport, inbox, refused = transport_for(node("p2pft"))
    transport.algorithm, transport.epoch = None, -1  # a process that has entered no epoch yet
    transport.sent_to_an_earlier_process = lambda epoch: earlier_process and epoch == 3
    good = next(m for m in node("p2pft", 1).send("pull", 0) if m.dst == 0)
    frames = [pack(from_message(replace(good, round=k), RUN, 3, "p1")) for k in range(MAX_HELD_PER_SENDER + 8)]
    taken = [asyncio.run(transport.on_frame(frame, "p1")) for frame in frames]
    if earlier_process:
        assert all(taken) and inbox.held == [] and refused == []
        # the epoch that lets this process in is another matter: its frames are held for it
        assert asyncio.run(transport.on_frame(pack(from_message(good, RUN, 4, "p1")), "p1")) is True
        assert [h.env.epoch for h in inbox.held] == [4]
    else:
        assert len(inbox.held) == MAX_HELD_PER_SENDER and not all(taken)
        assert refused and "too many frames held" in refused[0][1]


def test_a_frame_too_far_ahead_is_refused_and_its_sender_not_waited_for_in_the_rounds_it_moved_past():
    """A member whose only in-neighbour crashed runs ahead alone until the epoch that lets the old one's new
    process in; its frames more than AHEAD_ROUNDS ahead are refused (its next send is full state), and it
    will not send the rounds before them again. Waiting for them held its out-neighbour for --round-timeout
    and then a jump (a testnet with crash:2@3s,rejoin:2@3.5s, under load)."""
    transport, inbox, refused = transport_for(node("p2pft"))
    good = next(m for m in node("p2pft", 1).send("pull", 0) if m.dst == 0)
    far = replace(good, round=AHEAD_ROUNDS + 10)
    assert asyncio.run(transport.on_frame(pack(from_message(far, RUN, 0, "p1")), "p1")) is False
    assert refused and "too far ahead" in refused[0][1]
    assert inbox.by_phase.get("pull", []) == []  # refused: not used

    async def wait_in_round(k: int) -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await inbox.collect("pull", k, (1,), 30.0, lambda: False, set)
        return loop.time() - started

    assert asyncio.run(wait_in_round(5)) < 1.0
