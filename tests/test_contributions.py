"""Contribution records: what each in-neighbour sent, counted by the receiver and attested in status."""

from __future__ import annotations

from p2pnode.node.contributions import Contributions
from p2pnode.node.run_status import attestation
from p2pnode.protocol.membership import MemberInfo


def test_rounds_count_once_per_round_whatever_the_number_of_phases():
    seen = Contributions()
    for round_ in range(5):
        seen.accepted("alice", round_, 100)  # pull
        seen.accepted("alice", round_, 50)  # push
    seen.refused("alice")
    seen.refused("mallory")
    assert seen.summary() == {"alice": [5, 750, 10, 1], "mallory": [0, 0, 0, 1]}
    assert seen.view == seen.summary()  # what the member record carries is always current


def test_a_flood_of_strangers_does_not_grow_the_record_without_bound():
    seen = Contributions()
    for i in range(10 * Contributions.MAX_PEERS):
        seen.refused(f"stranger{i}")
    assert len(seen.summary()) == Contributions.MAX_PEERS


def test_status_shows_what_the_receivers_attest_not_what_a_member_claims_for_itself():
    def info(peer: str, contributions: dict) -> MemberInfo:
        return MemberInfo(peer_id=peer, fingerprint="f", settings_hash="s", samples=1, contributions=contributions)

    infos = [
        info("a", {"b": [10, 2_000_000, 20, 0], "a": [999, 0, 0, 0]}),
        info("c", {"b": [8, 1_000_000, 16, 2]}),
        info("b", {"b": [10**6, 10**12, 10**6, 0]}),  # b's claim about itself is ignored
    ]
    assert attestation(infos, "b") == "10 rounds, 3.0 MB, 36 ok / 2 refused (by 2)"
    assert attestation(infos, "a") == "-"  # only a's own claim
    assert attestation(infos, "nobody") == "-"
