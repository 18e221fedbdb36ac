"""The membership-epoch rules every node applies to what it reads from the DHT (node/epochs.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from types import SimpleNamespace

import pytest

from p2pnode.node import epochs
from p2pnode.node.driver import RoundDriver
from p2pnode.node.errors import BadInput, RunFinished
from p2pnode.node.finish import FINISHED_WITHOUT_THIS_NODE
from p2pnode.node.membership import WAKE_GRACE_BEATS, MembershipAgent, settings_differences
from p2pnode.protocol.membership import EpochRecord, MemberInfo

FP, SH = "trunk", "settings"


def info(peer: str, status: str = "training", round_: int = 100, record: EpochRecord | None = None, **kw) -> MemberInfo:
    m = MemberInfo(
        peer_id=peer,
        fingerprint=FP,
        settings_hash=SH,
        samples=10,
        status=status,
        round=round_,
        incarnation=f"i{peer}",
        **kw,
    )
    if record is not None:
        m.epoch, m.epoch_hash = record.number, record.hash
    return m


def record(members, number: int = 0, proposer: str = "A", start: int = 0, rounds: int = 1000) -> EpochRecord:
    return EpochRecord(
        number, start, tuple(members), tuple(f"i{p}" for p in members), (), rounds, 10, FP, SH, proposer, 0.0
    )


def schedule(members):
    return 500, 10


def test_the_run_follows_the_highest_epoch_and_on_a_tie_the_lowest_proposer():
    a, b, c = record("AB", 1, "B"), record("AB", 2, "C"), record("CD", 2, "A")
    assert epochs.current_record([a, b, c], FP, SH) == c
    other = EpochRecord(9, 0, ("X",), ("iX",), (), 10, 1, "other-trunk", SH, "A", 0.0)
    assert epochs.current_record([a, other], FP, SH) == a  # another run's trunk is never followed


def test_coordinator_is_the_lowest_live_member_and_the_next_takes_over_when_it_dies():
    r = record("ABC")
    infos = [info(p, record=r) for p in "ABC"]
    assert epochs.coordinator(r, infos) == "A"
    assert epochs.coordinator(r, infos[1:]) == "B"  # A's heartbeat expired


def test_a_member_reported_silent_by_a_neighbour_is_gone_even_with_a_fresh_heartbeat():
    r = record("ABC")
    infos = [info("A", record=r), info("B", record=r, silent=["C"]), info("C", record=r)]
    assert epochs.gone(r, infos) == {"C"}
    proposal = epochs.next_epoch(r, infos, "A", lead=5)
    assert proposal is not None and proposal.members == ("A", "B") and proposal.number == 1
    assert proposal.start_round == 105 and proposal.donors == ("A", "B")


def test_silence_reported_from_another_epoch_does_not_count():
    r = record("ABC")
    stale = info("B", record=record("ABC", number=7), silent=["C"])
    assert epochs.gone(r, [info("A", record=r), stale, info("C", record=r)]) == set()


def test_only_the_coordinator_proposes_and_nothing_while_an_epoch_is_pending():
    r = record("ABC")
    infos = [info(p, record=r) for p in "AB"]  # C gone
    assert epochs.next_epoch(r, infos, "B", lead=5) is None
    assert epochs.next_epoch(r, infos, "A", lead=5) is not None
    pending = record("ABC", start=200)
    assert epochs.next_epoch(pending, [info(p, record=pending) for p in "AB"], "A", lead=5) is None


def test_nothing_new_is_proposed_until_every_member_that_stays_has_entered_the_current_epoch():
    # Under load in CI: epoch 1 (from round 204) was in effect for A, which had passed round 204, while B,
    # the coordinator, was still at round 161 in epoch 0. Proposing epoch 2 then made B skip epoch 1 (one
    # record per proposer: it never read 1) and keep sending to a crashed peer while A waited for it.
    before, current = record("ABCX"), record("ABC", number=1, proposer="B", start=204)
    infos = [info("A", round_=210, record=current), info("B", round_=161, record=before)]
    infos += [info("C", round_=205, record=current), info("D", "joining", 0)]
    assert epochs.next_epoch(current, infos, "A", lead=5) is None  # B has not entered epoch 1 yet
    infos[1] = info("B", round_=204, record=current)
    proposal = epochs.next_epoch(current, infos, "A", lead=5)
    assert proposal is not None and proposal.members == ("A", "B", "C", "D") and proposal.start_round == 215


def test_a_member_gone_from_the_current_epoch_does_not_hold_up_the_next():
    before, current = record("ABCX"), record("ABC", number=1, start=204)
    stuck = info("C", round_=150, record=before, status="training")  # alive, never entered: reported silent
    infos = [info("A", round_=210, record=current, silent=["C"]), info("B", round_=209, record=current), stuck]
    proposal = epochs.next_epoch(current, infos, "A", lead=5)
    assert proposal is not None and proposal.members == ("A", "B")


def test_survivors_keep_their_order_and_joiners_are_appended():
    r = record("CAB")
    infos = [info(p, record=r) for p in "CAB"] + [info("E", "joining", 0), info("D", "joining", 0)]
    infos[2].status = "leaving"
    proposal = epochs.next_epoch(r, infos, "A", lead=5)
    assert proposal.members == ("C", "A", "D", "E")  # B leaves, D and E join in peer-id order
    assert proposal.donors == ("C", "A")


def test_a_joiner_with_another_trunk_or_settings_is_never_let_in():
    r = record("AB")
    infos = [info(p, record=r) for p in "AB"]
    stranger = info("C", "joining", 0)
    stranger.fingerprint = "other"
    assert epochs.next_epoch(r, [*infos, stranger], "A", lead=5) is None


def test_members_of_a_healed_partition_are_let_in_like_joiners():
    ours, theirs = record("AB", 3, "A"), record("CD", 3, "C")
    infos = [info(p, record=ours) for p in "AB"] + [info(p, record=theirs) for p in "CD"]
    assert epochs.current_record([ours, theirs], FP, SH) == ours  # lower proposer wins the tie
    proposal = epochs.next_epoch(ours, infos, "A", lead=5)
    assert proposal.members == ("A", "B", "C", "D") and proposal.number == 4


def test_a_healed_partition_starts_its_merged_epoch_ahead_of_the_side_that_trained_further():
    ours, theirs = record("AB", 3, "A", start=50), record("CD", 3, "C", start=50)
    infos = [info(p, record=ours, round_=200) for p in "AB"] + [info(p, record=theirs, round_=450) for p in "CD"]
    proposal = epochs.next_epoch(ours, infos, "A", lead=5)
    assert proposal.start_round == 455  # not 205: C and D would enter 250 rounds ahead of A and B


def test_a_fresh_joiners_checkpoint_round_does_not_move_the_start():
    ours = record("AB", 3, "A", start=50)
    infos = [info(p, record=ours, round_=200) for p in "AB"] + [info("C", status="joining", round_=900)]
    assert epochs.next_epoch(ours, infos, "A", lead=5).start_round == 205


def test_no_epoch_is_proposed_past_the_end_of_the_run():
    r = record("AB", rounds=103)
    assert epochs.next_epoch(r, [info("A", record=r)], "A", lead=5) is None


def test_epoch_zero_waits_for_enough_peers_and_is_proposed_by_the_first_in_order():
    peers = [info("B", "joining", 0, index=1), info("A", "joining", 0, index=0)]
    assert epochs.first_epoch(peers[:1], peers[0], 2, schedule) is None
    assert epochs.first_epoch(peers, peers[0], 2, schedule) is None  # B is not first (index 1)
    first = epochs.first_epoch(peers, peers[1], 2, schedule)
    assert first.members == ("A", "B") and first.number == 0 and first.rounds == 500


def test_a_second_peer_on_one_index_of_the_split_is_left_out_of_epoch_zero_and_told_to_change_it():
    a, b, c = info("A", "joining", 0, index=0), info("B", "joining", 0, index=0), info("C", "joining", 0, index=1)
    assert epochs.first_epoch([a, b], a, 2, schedule) is None  # one share of the split is not two members
    assert epochs.first_epoch([a, b, c], a, 2, schedule).members == ("A", "C")  # was ("A", "B"): C's share untrained
    assert epochs.index_taken([a, b, c], b) is a
    assert epochs.index_taken([a, b, c], a) is None and epochs.index_taken([a, b, c], c) is None
    own = dataclasses.replace(b, classes="2-3")  # its own --classes: --index only orders the members
    assert epochs.index_taken([a, own], own) is None
    assert epochs.first_epoch([a, own], a, 2, schedule).members == ("A", "B")
    assert epochs.index_taken([dataclasses.replace(a, status="training"), b], b) is None  # a run in progress

    membership = RecordedMembership([a, b], [])
    agent = MembershipAgent(membership, b, heartbeat=0.05)
    started = time.monotonic()
    with pytest.raises(BadInput, match=r"peer A already takes --index 0 in run 'run': give this node another"):
        asyncio.run(agent.wait_for_epoch("run", 3, schedule, 30.0, lambda: False))  # before: --join-timeout
    assert time.monotonic() - started < 5.0


def test_the_first_peer_on_an_index_counts_a_second_one_there_once(caplog):
    # A waits while B (same --index) has not stopped yet: it said "2 of 2 members present" and no epoch came
    a, b = info("A", "joining", 0, index=0), info("B", "joining", 0, index=0)
    agent = MembershipAgent(RecordedMembership([a, b], []), a, heartbeat=0.05)
    with caplog.at_level("INFO"), pytest.raises(BadInput, match=r"only 1 of 2 members joined run 'run' within"):
        asyncio.run(agent.wait_for_epoch("run", 2, schedule, 0.5, lambda: False))
    assert "1 of 2 members present" in caplog.text and "2 of 2" not in caplog.text


def test_a_peer_refused_for_its_settings_is_told_which_ones_differ(caplog):
    ours = {"epochs": "40", "lr": "0.01", "model": "vit_digits", "codec": "int8"}
    theirs = {**ours, "epochs": "10", "lr": "0.05"}
    assert settings_differences(theirs, ours) == "--epochs 10 there, 40 here; --lr 0.05 there, 0.01 here"
    assert settings_differences(theirs, {}) == ""  # an older peer shows none: only the hashes then
    many = {k: "x" for k in ours} | {"seed": "1"}
    assert settings_differences(many, ours, most=2).endswith("; 3 more")
    me = info("A", "joining", 0, settings=ours)
    other = dataclasses.replace(info("B", "joining", 0, settings=theirs), settings_hash="other")
    agent = MembershipAgent(RecordedMembership([me, other], []), me, heartbeat=0.05)
    with caplog.at_level("WARNING"):
        agent._log_refused([me, other], set())
    assert "refusing peer B: its settings differ from this run's (--epochs 10 there, 40 here; --lr" in caplog.text
    seeded = dataclasses.replace(info("C", "joining", 0, settings={**ours, "model_seed": "1"}), fingerprint="other")
    weights = dataclasses.replace(info("D", "joining", 0, settings=ours), fingerprint="other")
    with caplog.at_level("WARNING"):
        agent._log_refused([seeded, weights], set())
    assert "refusing peer C: its trunk differs from this run's (--model-seed 1 there, (none) here)" in caplog.text
    assert "refusing peer D: its trunk differs from this run's (the same settings: another --checkpoint" in caplog.text


def test_a_whole_run_restarted_from_checkpoints_starts_at_the_furthest_round_with_its_schedule():
    old = record("AB", number=4, rounds=800)
    peers = [info("A", "joining", 120), info("B", "joining", 130)]
    again = epochs.first_epoch(peers, peers[0], 2, schedule, previous=old)
    assert again.number == 5 and again.start_round == 130 and again.rounds == 800


def test_the_first_member_back_of_a_restarted_run_waits_for_the_others_before_going_on_alone():
    old = record("A", number=1, rounds=800)  # formed while B was leaving: smaller than the run
    back = [info("A", "joining", 21)]
    assert epochs.first_epoch(back, back[0], 2, schedule, previous=old, settled=False) is None
    both = [*back, info("B", "joining", 20)]
    assert epochs.first_epoch(both, back[0], 2, schedule, previous=old, settled=False).members == ("A", "B")
    alone = epochs.first_epoch(back, back[0], 2, schedule, previous=old, settled=True)
    assert alone.members == ("A",) and alone.start_round == 21 and alone.rounds == 800


def test_epoch_records_round_trip_and_their_hash_changes_with_the_members():
    r = record("AB", 2)
    assert EpochRecord.from_dict(r.to_dict()) == r
    assert record("AB", 2).hash != record("AC", 2).hash


def test_a_member_that_restarted_is_a_new_member_appended_with_its_new_incarnation():
    r = record("ABC")
    back = info("B", "joining", 40)
    back.incarnation = "restarted"
    infos = [info("A", record=r), back, info("C", record=r)]
    assert "B" in epochs.gone(r, infos) and not r.includes("B", "restarted")
    proposal = epochs.next_epoch(r, infos, "A", lead=5)
    assert proposal.members == ("A", "C", "B") and proposal.incarnations == ("iA", "iC", "restarted")


def test_a_record_left_in_the_dht_by_an_earlier_run_has_no_live_members():
    old = record("AB")
    again = [info("A", "joining", 10), info("B", "joining", 10)]
    for m in again:
        m.incarnation = "new-" + m.peer_id
    assert epochs.live(old, again) == {}


def test_testnet_membership_history_merges_the_epochs_every_finishing_node_saw():
    from p2pnode.node.testnet import epoch_changes

    def change(epoch, members, joined=(), left=()):
        return {"epoch": epoch, "members": list(members), "joined": list(joined), "left": list(left)}

    full = [change(0, "abcd"), change(1, "abc", left="d"), change(2, "abcde", joined="de")]
    returner = [change(0, "abcd"), change(2, "abcde")]  # restored epoch 0, then entered epoch 2 itself
    # the node that came back finished first: its view must not hide the crash or its own return
    merged = epoch_changes({3: {"epochs": returner}, 0: {"epochs": full}, 4: {"epochs": full[2:]}})
    assert merged == full


def test_a_node_that_jumps_to_an_epochs_start_round_keeps_one_evaluation_per_pass_it_reached():
    evaluated = []

    async def end_of_epoch(epoch):
        evaluated.append((epoch, node.round))

    node = SimpleNamespace(per_epoch=10, round=19, info=SimpleNamespace(round=19), end_of_epoch=end_of_epoch)
    driver = RoundDriver(node)
    asyncio.run(driver.jump(19, 20))  # a restart at round 19 into an epoch from round 20: pass 2 ended there
    asyncio.run(driver.jump(20, 25))  # within pass 3: nothing to evaluate yet
    asyncio.run(driver.jump(25, 57))  # passes 3 to 5 skipped: one evaluation, of the parameters of now
    assert evaluated == [(2, 20), (5, 57)] and node.round == node.info.round == 57


def test_a_leaver_waits_for_an_epoch_while_another_member_still_entering_the_run_stays():
    r = record("AB")
    node = SimpleNamespace(record=r, peer_id="A", agent=SimpleNamespace(infos=[]))
    driver = RoundDriver(node)
    for status, stays in (("joining", True), ("training", True), ("leaving", False), ("left", False)):
        node.agent.infos = [info("A", "leaving", record=r), info("B", status, record=r)]
        assert driver.others_stay() is stays, status
    node.agent.infos = [info("A", "leaving", record=r)]  # B's heartbeat expired: gone
    assert not driver.others_stay()


class RecordedMembership:
    """What a node reads from the DHT, fixed: heartbeats and epoch records."""

    def __init__(self, infos: list[MemberInfo], records: list[EpochRecord]) -> None:
        self.infos, self.records = infos, records

    def announce(self, info: MemberInfo) -> bool:
        return True

    def read_members(self) -> list[tuple[MemberInfo, float]]:
        return [(m, float("inf")) for m in self.infos]

    def epochs(self) -> list[EpochRecord]:
        return self.records


def wait_as_left_out_node(others_status: str, timeout: float):
    """Node C was in epoch 0 (ABC), epoch 1 (AB) left it out; A and B have `others_status`."""
    old, last = record("ABC"), record("AB", 1, start=50)
    me = info("C", status="joining", round_=40, record=old)
    membership = RecordedMembership([info(p, status=others_status, record=last) for p in "AB"] + [me], [old, last])
    agent = MembershipAgent(membership, me, heartbeat=0.05)
    return asyncio.run(agent.wait_for_epoch("run", 3, schedule, timeout, lambda: False, after=old))


def test_a_left_out_node_learns_at_once_that_the_run_finished_without_it():
    started = time.monotonic()
    with pytest.raises(RunFinished, match="has finished"):
        wait_as_left_out_node("done", timeout=30.0)  # before: it waited the whole --join-timeout
    assert time.monotonic() - started < 5.0


def test_a_left_out_node_that_never_read_the_epoch_without_it_learns_that_the_run_finished():
    """Its machine slept through epoch 1 (AB) and the end: its reads still show only epoch 0 (ABC),
    where it is live itself. A and B being done there means the run finished, not that it goes on."""
    old, last = record("ABC"), record("AB", 1, start=50)
    me = info("C", status="joining", round_=40, record=old)
    membership = RecordedMembership([info(p, status="done", record=last) for p in "AB"] + [me], [old])
    agent = MembershipAgent(membership, me, heartbeat=0.05)
    started = time.monotonic()
    with pytest.raises(RunFinished, match="has finished"):  # before: it waited the whole --join-timeout
        asyncio.run(agent.wait_for_epoch("run", 3, schedule, 30.0, lambda: False, after=old))
    assert time.monotonic() - started < 5.0


def test_members_that_are_done_are_not_gone_and_no_epoch_follows_them():
    """The woken sleeper's race: it read A and B done but not the epoch they finished in. As the only
    live member of its old epoch it coordinates it; it must not propose an epoch of its own (that epoch
    outranked theirs, and it trained the rest of the run alone)."""
    r = record("ABC")
    infos = [info("A", "done", record=r), info("B", "done", record=r), info("C", round_=40, record=r)]
    assert epochs.coordinator(r, infos) == "C" and epochs.finished(r, infos) == {"A", "B"}
    assert epochs.next_epoch(r, infos, "C", lead=5) is None
    infos[1] = info("B", round_=40, record=r)  # B is gone, not done: without A's being done C would propose
    assert epochs.next_epoch(r, [infos[1], infos[2]], "B", lead=5).members == ("B", "C")


def test_a_left_out_node_waits_to_rejoin_a_run_still_in_progress():
    with pytest.raises(BadInput, match="members joined") as caught:
        wait_as_left_out_node("training", timeout=0.3)
    assert not isinstance(caught.value, RunFinished)


def node_c_at_round_40(old: EpochRecord, latest: EpochRecord, rounds: int, infos: list[MemberInfo]):
    """Node C's driver in epoch `old` at round 40 of `rounds`, having read `latest` and `infos`; rounds
    only count themselves: (driver, node, list of the rounds run)."""
    ran = []

    async def count(*args):
        ran.append(args)

    node = SimpleNamespace(
        record=old,
        round=40,
        rounds=rounds,
        per_epoch=100,
        peer_id="C",
        info=SimpleNamespace(incarnation="iC", round=40),
        stop_requested=asyncio.Event(),
        leave_by=None,
        agent=SimpleNamespace(record=latest, lead_rounds=lambda: 20, round_times=[], infos=infos, deserted=False),
        in_record=lambda r: r.includes("C", "iC"),
        settings=SimpleNamespace(checkpoint_every=1000),
        algorithm=SimpleNamespace(objective=None, asynchronous=False, gradient_weight=None),
        log=SimpleNamespace(round_seconds=0.0),
        metrics=None,
        transport=SimpleNamespace(release_unclaimed=lambda newest_epoch: None),
    )
    driver = RoundDriver(node)
    driver.enter_epoch = lambda r, k: setattr(node, "record", r)
    driver.run_round = count
    return driver, node, ran


def test_a_node_far_behind_an_epoch_that_leaves_it_out_stops_its_old_epochs_rounds():
    """Its machine slept: the others formed an epoch without it, far ahead. Crawling through the old
    epoch's rounds on timeouts would help nobody: train() returns 'left out' before any round."""
    old = record("ABC")
    driver, node, ran = node_c_at_round_40(old, record("AB", 1, start=400), 1000, [])
    assert asyncio.run(driver.train(old)) == "left out"
    assert ran == []
    near = record("AB", 1, start=45)  # within the lead: it runs its old epoch's rounds up to the start
    node.agent.record, node.rounds = near, 45
    assert asyncio.run(driver.train(old)) == "done" and len(ran) == 5


def test_a_member_jumps_to_a_far_epoch_only_after_following_it_for_a_while():
    """Under load the coordinator's lead (three polls at its pace) can be more than twice this node's
    lead of a moment later. A record it has just read is not a sign that it fell behind: it trains its
    rounds up to the start. One it has followed for JUMP_AFTER_POLLS polls is: it jumps there."""
    old, latest = record("ABC"), record("ABC", 1, start=400)
    for age, first_round in ((0.5, 40), (10.0, 400)):
        driver, node, ran = node_c_at_round_40(old, latest, 1000, [])
        node.agent.poll, node.agent.record_age = 1.0, lambda age=age: age
        evaluated = []

        async def end_of_epoch(epoch, evaluated=evaluated):
            evaluated.append(epoch)

        async def count(k, ran=ran, node=node):
            ran.append(k)
            if len(ran) == 5:
                node.stop_requested.set()

        node.end_of_epoch, driver.run_round = end_of_epoch, count
        assert asyncio.run(driver.train(old)) == "stopped"
        assert ran == list(range(first_round, first_round + 5)), (age, ran)
        assert evaluated == ([4] if first_round == 400 else [])  # the skipped passes' one evaluation


def test_a_node_whose_epoch_members_finished_in_another_epoch_stops_and_one_at_the_usual_end_goes_on():
    """A node that slept holds epoch 0 (ABC) and has not read epoch 1 (AB), which A and B finished in:
    train() returns 'left out' before any round (it then learns the run finished). A and B done in its
    own epoch are a run ending as usual: it runs its last rounds."""
    old, last = record("ABC"), record("AB", 1, start=30)
    driver, node, ran = node_c_at_round_40(old, old, 45, [info(p, "done", record=last) for p in "AB"])
    assert asyncio.run(driver.train(old)) == "left out" and ran == []
    node.agent.infos = [info(p, "done", record=old) for p in "AB"]
    assert asyncio.run(driver.train(old)) == "done" and len(ran) == 5


def test_a_member_missing_from_one_read_stays_until_its_record_expires():
    """With a DHT peer frozen (a laptop asleep), reads of the run's key come back slow and partial:
    one read without B's heartbeat must not make B gone (the coordinator dropped a live member so)."""
    r = record("ABC")
    a, b, c = (info(p, record=r) for p in "ABC")
    agent = MembershipAgent(RecordedMembership([], []), a, heartbeat=2.0)
    assert [m.peer_id for m in agent._remember([(a, 110.0), (b, 108.0), (c, 108.0)], now=100.0)] == ["A", "B", "C"]
    missed = agent._remember([(a, 112.0)], now=102.0)  # B's and C's records still live at 108
    assert [m.peer_id for m in missed] == ["A", "B", "C"] and epochs.gone(r, missed) == set()
    later = dataclasses.replace(b, round=120, updated=b.updated + 5)
    agent._remember([(a, 112.0), (later, 115.0)], now=103.0)
    kept = agent._remember([(a, 112.0), (b, 108.0)], now=104.0)  # an older copy of B's record: the newest wins
    assert [m.round for m in kept] == [100, 120, 100]
    gone_c = agent._remember([(a, 114.0)], now=109.0)  # C's record expired at 108: now it is gone
    assert [m.peer_id for m in gone_c] == ["A", "B"] and epochs.gone(r, gone_c) == {"C"}
    assert epochs.gone(r, agent._remember([], now=116.0)) == {"A", "B", "C"}


def coordinator_a_whose_reads_find(reads: list[list[MemberInfo]], heartbeat: float) -> list[list[EpochRecord]]:
    """A coordinates epoch ABC; each refresh, `heartbeat` / 2 s apart, reads the next list of
    heartbeats (besides its own). The epochs A had proposed after each read."""
    r = record("ABC", proposer="B")  # B proposed it: A does not keep it alive, only proposes changes
    me = info("A", round_=100, record=r)
    membership = RecordedMembership([me], [r])
    proposed = []
    membership.propose = lambda rec, ttl: proposed.append(rec) or True
    agent = MembershipAgent(membership, me, heartbeat=heartbeat)

    async def scenario():
        after = []
        for others in reads:
            membership.infos = [me, *others]
            await agent.refresh()
            after.append(list(proposed))
            await asyncio.sleep(heartbeat / 2)
        return after

    return asyncio.run(scenario())


def test_a_node_goes_on_alone_only_when_reads_a_heartbeat_apart_find_nobody():
    first, second, third = coordinator_a_whose_reads_find([[], [], []], heartbeat=0.2)
    assert first == second == []  # the first two reads were 0.1 s apart: not yet
    assert [(p.number, p.members) for p in third] == [(1, ("A",))]


def test_one_read_that_misses_everyone_does_not_leave_a_woken_node_alone():
    """The woken sleeper's race, again: its first read after a long stall found neither the others'
    heartbeats nor their done records (the test of this in test_daemon.py then failed once in CI)."""
    r = record("ABC", proposer="B")
    done = [info(p, "done", record=r) for p in "BC"]
    assert coordinator_a_whose_reads_find([[], done, done], heartbeat=0.2) == [[], [], []]


def coordinator_a_that_stalls_then_reads(others: list[MemberInfo], heartbeat: float):
    """A coordinates epoch ABC proposed by B; its first read finds nobody, then its process stops for
    4 heartbeats (a machine asleep) and 20 reads heartbeat / 2 apart find `others`. (agent, epochs
    proposed, [(seconds since the wake, epochs proposed, deserted) after each read])."""
    r = record("ABC", proposer="B")
    me = info("A", round_=100, record=r)
    membership = RecordedMembership([me], [r])
    proposed: list[EpochRecord] = []
    membership.propose = lambda rec, ttl: proposed.append(rec) or True
    agent = MembershipAgent(membership, me, heartbeat=heartbeat)

    async def scenario() -> list[tuple[float, int, bool]]:
        await agent.refresh()  # finds nobody: the first read of the window
        await asyncio.sleep(4 * heartbeat)  # the process is stopped: neither loop turns
        membership.infos = [me, *others]
        woke = time.monotonic()
        seen = []
        for _ in range(20):
            await agent.refresh()
            seen.append((time.monotonic() - woke, len(proposed), agent.deserted))
            await asyncio.sleep(heartbeat / 2)
        return seen

    return agent, proposed, asyncio.run(scenario())


def test_a_node_that_woke_from_a_stall_to_find_nobody_ends_instead_of_training_alone():
    """The woken sleeper's race: in CI two reads 2 s apart right after the wake both found nobody, and
    once (the others' DHT processes had exited with their done records) every read did, and it trained
    the rest of the run alone. After a gap of STALL_BEATS heartbeats in its own loops, reads finding
    nobody count only WAKE_GRACE_BEATS heartbeats later, and then the node is `deserted` (its driver
    ends with its own parameters): it never proposes an epoch of its own."""
    heartbeat = 0.1
    agent, proposed, seen = coordinator_a_that_stalls_then_reads([], heartbeat)
    early = [d for since, _, d in seen if since < WAKE_GRACE_BEATS * heartbeat]
    assert early and not any(early), seen  # before the grace: neither gone on alone nor ended
    assert agent.deserted and proposed == [], seen


def test_a_woken_node_that_reads_its_peers_left_goes_on_alone_as_an_awake_one_would():
    """Records that say the others left are no ambiguity: the woken node goes on alone, as it would had
    it been awake when they left."""
    r = record("ABC", proposer="B")
    left = [info(p, "left", record=r) for p in "BC"]
    agent, proposed, _ = coordinator_a_that_stalls_then_reads(left, heartbeat=0.1)
    assert not agent.deserted and [p.members for p in proposed] == [("A",)]


def test_a_woken_node_that_reads_a_live_peer_neither_ends_nor_goes_on_alone():
    r = record("ABC", proposer="B")
    agent, proposed, _ = coordinator_a_that_stalls_then_reads([info("B", record=r)], heartbeat=0.1)
    assert not agent.deserted and [p.members for p in proposed] == [("A", "B")]


def test_a_deserted_node_ends_with_its_own_parameters_before_any_round():
    old = record("ABC")
    driver, node, ran = node_c_at_round_40(old, old, 140, [])
    node.agent.deserted = True
    assert asyncio.run(driver.train(old)) == FINISHED_WITHOUT_THIS_NODE and ran == []


def test_dropping_a_member_while_others_remain_is_not_delayed():
    """Only going on alone waits for a confirming read: B gone, C live, A drops B at its first read."""
    r = record("ABC", proposer="B")
    c = info("C", round_=100, record=r)
    (proposed,) = coordinator_a_whose_reads_find([[c]], heartbeat=0.2)
    assert [p.members for p in proposed] == [("A", "C")]


def test_a_node_left_out_by_an_epoch_the_others_have_entered_stops_its_old_epochs_rounds():
    """A leaver nobody waits for (and with --sync async a slow one) can fall behind the epoch that
    drops it: once the others have entered it, its old epoch's rounds would be trained alone on its own
    data, so train() returns before any round. While they are still in the old epoch it runs its rounds
    up to the start, as before."""
    old, latest = record("ABC"), record("AB", 1, start=45)
    entered = [info(p, round_=46, record=latest) for p in "AB"]
    driver, node, ran = node_c_at_round_40(old, latest, 1000, entered)
    assert asyncio.run(driver.train(old)) == "left out" and ran == []
    node.leave_by = 1e12
    node.agent.infos.append(info("C", "leaving", round_=40, record=old))
    assert asyncio.run(driver.train(old)) == "left" and ran == []
    node.leave_by = None
    node.agent.infos = [info(p, round_=44, record=old) for p in "AB"]  # still in the old epoch
    assert asyncio.run(driver.train(old)) == "left out" and len(ran) == 5


def test_a_member_that_crashed_and_came_back_is_not_waited_for_in_its_old_process():
    """C crashed and restarted before anyone dropped it: the next epoch lets C in again as a new process
    (incarnation iC2). Its old process never sends, so this node's rounds of the old epoch stop waiting
    for it, as for a member the next epoch leaves out (before: --round-timeout, then the short grace in
    every phase up to that epoch's start, 200 rounds ahead in a testnet). Members whose process the next
    epoch keeps are still waited for."""
    old = record("ABC")
    back = EpochRecord(1, 60, ("A", "B", "C"), ("iA", "iB", "iC2"), (), 1000, 10, FP, SH, "A", 0.0)
    node = SimpleNamespace(
        peer_id="A",
        record=old,
        agent=SimpleNamespace(infos=[info(p, record=old) for p in "AB"], record=back),
        transport=SimpleNamespace(index_of={"A": 0, "B": 1, "C": 2}),
        inbox=SimpleNamespace(held=[]),
    )
    driver = RoundDriver(node)
    assert driver.excluded() == {2}
    node.agent.record = record("ABC", 1, start=60)  # the same processes: nobody to skip
    assert driver.excluded() == set()
    node.agent.record = old  # no newer epoch read yet: C still gets its deadline and the grace
    assert driver.excluded() == set()
