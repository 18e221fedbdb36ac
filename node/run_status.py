"""`p2pnode status`: what the DHT says about a run — its epoch, coordinator and members."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rich.table import Table

from ..protocol.membership import EpochRecord, MemberInfo, Membership, run_validators
from . import epochs
from .contributions import attested
from .errors import BadInput


@dataclass
class RunStatus:
    run_id: str
    record: EpochRecord | None  # the epoch the run follows
    infos: list[MemberInfo]  # live heartbeats

    def state_of(self, peer_id: str) -> str:
        """joined (a member of the epoch), leaving, gone (a member without a heartbeat or reported
        silent), joining (waiting to be let in), or the node's own status (done, left)."""
        info = next((m for m in self.infos if m.peer_id == peer_id), None)
        if self.record is None:
            return info.status if info else "gone"
        if peer_id in self.record.members:
            if peer_id in epochs.gone(self.record, self.infos):
                return "gone" if info is None or info.status in epochs.ACTIVE else info.status
            return "leaving" if info.status == "leaving" else "joined" if info.status == "training" else info.status
        return info.status if info else "gone"


def read_run_status(peers: list[str], run_id: str, owner: str | None = None) -> RunStatus:
    """Read a run's heartbeats and epoch records through a client-mode DHT peer (then shut it down).
    A closed run's `owner` key is needed to read it (every peer of a run uses the same validators)."""
    from ..protocol.admission import Admission, AdmissionError
    from .dht_process import start_dht, stop_dht

    try:
        validators = run_validators(run_id, owner=owner)
        admission = Admission(run_id, owner) if owner else None
    except AdmissionError as e:
        raise BadInput(str(e)) from None
    try:
        dht = start_dht(initial_peers=peers, client_mode=True, record_validators=validators)
    except Exception as e:
        raise BadInput(f"could not reach --peers ({type(e).__name__}: {e})") from None
    try:
        membership = Membership(dht, run_id, validators[0], admission=admission)
        infos, records = membership.members(), membership.epochs()
    finally:
        stop_dht(dht)
    ranked = sorted((r for r in records if r.members), key=lambda r: r.rank, reverse=True)
    return RunStatus(run_id, ranked[0] if ranked else None, infos)


def status_tables(status: RunStatus) -> list[Table]:
    """Two tables: the epoch (number, start round, coordinator) and one row per peer."""
    record, infos = status.record, status.infos
    head = Table(title=f"run {status.run_id}")
    for col in ("epoch", "from round", "members", "coordinator", "rounds"):
        head.add_column(col)
    if record is not None:
        coordinator = epochs.coordinator(record, infos)
        head.add_row(
            str(record.number),
            str(record.start_round),
            str(len(record.members)),
            coordinator[-10:] if coordinator else "-",
            str(record.rounds),
        )
    else:
        head.add_row("-", "-", "0", "-", "-")
    peers = list(record.members) if record is not None else []
    peers += [m.peer_id for m in infos if m.peer_id not in peers]
    table = Table(title=f"run {status.run_id}: {len(infos)} member(s)")
    columns = ("#", "peer", "classes", "state", "status", "round", "pass", "gradient", "batch", "loss", "accuracy")
    columns += ("sent", "seen", "attested by neighbours")
    for col in columns:
        table.add_column(col, justify="left" if col in ("peer", "state", "status", "classes") else "right")
    for peer in peers:
        m = next((x for x in infos if x.peer_id == peer), None)
        position = str(record.members.index(peer)) if record is not None and peer in record.members else "-"
        if m is None:
            table.add_row(position, peer[-10:], "-", status.state_of(peer), *["-"] * 9, attestation(infos, peer))
            continue
        table.add_row(
            position,
            m.peer_id[-10:],
            m.classes or "-",
            status.state_of(peer),
            m.status,
            f"{m.round}/{m.rounds}",
            str(m.train_epoch),
            gradient_time(m.step_seconds),
            batch_shown(m),
            f"{m.loss:.3f}" if m.loss >= 0 else "-",
            f"{100 * m.accuracy:.1f}%" if m.accuracy >= 0 else "-",
            f"{m.bytes_sent / 1e6:.1f} MB",
            f"{time.time() - m.updated:.0f} s ago",
            attestation(infos, peer),
        )
    return [head, table]


def batch_shown(m: MemberInfo) -> str:
    """A member's mini-batch (below the run's --batch-size: a paced slow member) and, where P2P-FT counts its
    late gradients with less than full weight, that weight (node/algorithms/late.py)."""
    batch = str(m.batch) if m.batch > 0 else "-"
    return batch if m.gradient_weight == 1 else f"{batch}, weight {m.gradient_weight:.2f}"


def gradient_time(seconds: float) -> str:
    """How long a member's gradients take (the median of its last ones), "-" before its first round."""
    if not seconds > 0:
        return "-"
    return f"{1000 * seconds:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def attestation(infos: list[MemberInfo], peer: str) -> str:
    """What the members that received from `peer` attest it contributed: rounds (the most any of
    them counted), megabytes and messages accepted/refused (summed), and by how many of them."""
    said = attested({m.peer_id: m.contributions for m in infos if m.peer_id != peer}, peer)
    if not said:
        return "-"
    rounds = max(v[0] for v in said.values())
    total = [sum(v[i] for v in said.values()) for i in (1, 2, 3)]
    return f"{rounds} rounds, {total[0] / 1e6:.1f} MB, {total[1]} ok / {total[2]} refused (by {len(said)})"
