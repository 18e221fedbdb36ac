"""What each in-neighbour contributed, as this node saw it (the survey's incentive question).

A node counts, per peer that sent to it, the rounds in which it accepted a valid message from that
peer, the bytes of those messages, and how many messages it accepted and refused. It publishes the
summary in its member record, which the DHT stores signed by the node's key (in a closed run, the
key its peer id is derived from), so `p2pnode status` can show what each member's neighbours attest
it contributed. Counts are attestations by the receivers, not proofs: a lying member can only lie
about its own in-neighbours, and the status table shows every attester's figure side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

FIELDS = ("rounds", "bytes", "accepted", "refused")


@dataclass
class Contribution:
    rounds: int = 0  # rounds in which at least one valid message from the peer was accepted
    bytes: int = 0
    accepted: int = 0
    refused: int = 0
    last_round: int = -1

    def as_list(self) -> list[int]:
        return [self.rounds, self.bytes, self.accepted, self.refused]


class Contributions:
    """Per-sender counters; `summary()` is what goes into the member record and result.json."""

    MAX_PEERS = 256  # a flood of strangers must not grow the member record without bound

    def __init__(self) -> None:
        self.by_peer: dict[str, Contribution] = {}
        self.view: dict[str, list[int]] = {}  # the summary, kept current (the member record holds it)

    def _entry(self, peer: str) -> Contribution | None:
        if peer not in self.by_peer and len(self.by_peer) >= self.MAX_PEERS:
            return None
        return self.by_peer.setdefault(peer, Contribution())

    def accepted(self, peer: str, round_: int, nbytes: int) -> None:
        entry = self._entry(peer)
        if entry is None:
            return
        entry.accepted += 1
        entry.bytes += nbytes
        if round_ != entry.last_round:
            entry.rounds += 1
            entry.last_round = round_
        self.view[peer] = entry.as_list()

    def refused(self, peer: str) -> None:
        entry = self._entry(peer)
        if entry is not None:
            entry.refused += 1
            self.view[peer] = entry.as_list()

    def summary(self) -> dict[str, list[int]]:
        """{peer id: [rounds, bytes, accepted, refused]}."""
        return {peer: c.as_list() for peer, c in sorted(self.by_peer.items())}


def attested(records: dict[str, dict[str, list[int]]], peer: str) -> dict[str, list[int]]:
    """What each attester says `peer` contributed: {attester: [rounds, bytes, accepted, refused]},
    from every member's published summary (`records`: attester -> its summary)."""
    return {attester: summary[peer] for attester, summary in sorted(records.items()) if peer in summary}
