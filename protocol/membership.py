"""Run membership through the hivemind DHT (DESIGN §6, §8).

Two keys per run, each a dictionary with one subkey per writer. The subkey carries the writer's RSA
public key, so `RSASignatureValidator` lets only that peer write it; `SchemaValidator` checks the
value's shape. Every peer of a run must use the same validators (`run_validators`) or reads hang.
- `p2pnode_RUN_members`: each node's `MemberInfo`, a heartbeat (the DHT has no delete: a record
  expires unless refreshed). It carries the node's status, round, the membership epoch it is in
  (its acknowledgement) and the peers it reports silent.
- `p2pnode_RUN_epochs`: `EpochRecord`s, written by the coordinator of the run (signed, its own
  subkey). The record everyone follows is the one with the highest number (ties: lowest proposer).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

import hivemind
import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils import get_dht_time

from .admission import Admission, AdmissionValidator, Revocation

if TYPE_CHECKING:
    from hivemind.dht.routing import DHTValue
    from hivemind.utils import ValueWithExpiration
    from hivemind.utils.crypto import RSAPrivateKey

logger = logging.getLogger(__name__)

DONE_TTL = 3600.0  # how long a finished member's last record stays in the DHT


class _Compatible(pydantic.BaseModel):
    """Fields a later version adds pass (this version ignores them when it reads the record): without
    this, a peer running an older p2pnode would refuse every record of a newer one, and its reads hang."""

    class Config:
        extra = pydantic.Extra.allow


class _MemberRecord(_Compatible):
    peer_id: pydantic.StrictStr
    index: pydantic.StrictInt
    fingerprint: pydantic.StrictStr
    settings_hash: pydantic.StrictStr
    samples: pydantic.StrictInt
    status: pydantic.StrictStr
    round: pydantic.StrictInt
    rounds: pydantic.StrictInt
    train_epoch: pydantic.StrictInt
    epoch: pydantic.StrictInt
    epoch_hash: pydantic.StrictStr
    silent: list[pydantic.StrictStr]
    incarnation: pydantic.StrictStr
    loss: pydantic.StrictFloat
    accuracy: pydantic.StrictFloat
    step_seconds: pydantic.StrictFloat
    # `batch` and `gradient_weight` (MemberInfo) are not declared: hivemind's SchemaValidator refuses a record whose
    # parsed form differs from the one stored, so a defaulted field would refuse every older peer's heartbeat
    # (one without it). They pass as extra fields, and `MemberInfo.from_dict` checks them; so does `settings`.
    bytes_sent: pydantic.StrictInt
    classes: pydantic.StrictStr
    invitation: pydantic.StrictStr
    contributions: dict[pydantic.StrictStr, list[pydantic.StrictInt]]
    updated: pydantic.StrictFloat


class _EpochRecord(_Compatible):
    number: pydantic.StrictInt
    start_round: pydantic.StrictInt
    members: list[pydantic.StrictStr]
    incarnations: list[pydantic.StrictStr]
    donors: list[pydantic.StrictStr]
    rounds: pydantic.StrictInt
    per_epoch: pydantic.StrictInt
    fingerprint: pydantic.StrictStr
    settings_hash: pydantic.StrictStr
    proposer: pydantic.StrictStr
    created: pydantic.StrictFloat


class _RevocationRecord(pydantic.BaseModel):
    run_id: pydantic.StrictStr
    serial: pydantic.StrictStr
    signature: pydantic.StrictStr


class _RunSchema(pydantic.BaseModel):
    members: dict[BytesWithPublicKey, _MemberRecord]
    epochs: dict[BytesWithPublicKey, _EpochRecord]
    revoked: dict[pydantic.StrictStr, _RevocationRecord]


@dataclass
class MemberInfo:
    peer_id: str
    fingerprint: str
    settings_hash: str
    samples: int
    index: int = -1  # preferred position in the member order (-1: order by peer id)
    status: str = "joining"  # joining, training, leaving, done, left
    round: int = 0
    rounds: int = 0
    train_epoch: int = 0  # passes over the data done
    epoch: int = -1  # membership epoch this node is in (-1: none yet)
    epoch_hash: str = ""  # acknowledges the epoch record it follows
    silent: list[str] = field(default_factory=list)  # peers it has not heard from for several rounds
    incarnation: str = field(default_factory=lambda: uuid.uuid4().hex[:12])  # new at every process start
    loss: float = float("nan")
    accuracy: float = -1.0
    step_seconds: float = 0.0  # how long one gradient takes on this node, median of its last ones (0: not yet)
    batch: int = 0  # the mini-batch of its gradients now: below --batch-size while paced (0: not said, an older peer)
    gradient_weight: float = 1.0  # what P2P-FT counts its gradients with: below 1 while even a paced batch comes late
    settings: dict[str, str] = field(default_factory=dict)  # its run settings, shown: what a refused peer differs in
    bytes_sent: int = 0
    classes: str = ""
    invitation: str = ""  # closed runs: the owner's invitation for this peer id (JSON)
    # per in-neighbour: [rounds, bytes, accepted, refused] of its messages, as this node saw them
    contributions: dict[str, list[int]] = field(default_factory=dict)
    updated: float = field(default_factory=time.time)

    @property
    def sort_key(self) -> tuple[int, str]:
        return (self.index if self.index >= 0 else 2**31, self.peer_id)

    @classmethod
    def from_dict(cls, d: dict) -> MemberInfo:
        """A record as read from the DHT; fields this version does not know (a newer peer's) are left out,
        and so are a `batch` that is not an integer, a `gradient_weight` that is not a float in (0, 1] and `settings`
        that are not text to text (the schema cannot check them)."""
        known = {k: v for k, v in d.items() if k in _MEMBER_FIELDS}
        if type(known.get("batch", 0)) is not int:
            del known["batch"]
        weight = known.get("gradient_weight", 1.0)
        if type(weight) is not float or not 0 < weight <= 1:
            del known["gradient_weight"]
        shown = known.get("settings", {})
        if not isinstance(shown, dict) or not all(isinstance(v, str) for v in [*shown, *shown.values()]):
            del known["settings"]
        return cls(**known)


@dataclass(frozen=True)
class EpochRecord:
    """A membership epoch: who takes part from `start_round` on, in which order (positions in the
    topology), and the run's fixed length and schedule. `donors` serve parameters to joiners."""

    number: int
    start_round: int
    members: tuple[str, ...]
    incarnations: tuple[str, ...]  # each member's process: a restarted peer is a new member
    donors: tuple[str, ...]
    rounds: int
    per_epoch: int
    fingerprint: str
    settings_hash: str
    proposer: str
    created: float = 0.0

    def includes(self, peer_id: str, incarnation: str) -> bool:
        """Whether this peer, in this process (not an earlier one that crashed), is a member."""
        return any(p == peer_id and i == incarnation for p, i in zip(self.members, self.incarnations, strict=True))

    @property
    def hash(self) -> str:
        members = ",".join(f"{p}:{i}" for p, i in zip(self.members, self.incarnations, strict=True))
        body = f"{self.number}|{self.start_round}|{members}|{self.rounds}|{self.proposer}"
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    @property
    def rank(self) -> tuple[int, str]:
        """Higher wins: the highest number, then the lowest proposer id (inverted for max())."""
        return (self.number, "".join(chr(0x10FFFF - ord(c)) for c in self.proposer))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["members"], d["incarnations"], d["donors"] = list(self.members), list(self.incarnations), list(self.donors)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EpochRecord:
        """A record as read from the DHT; fields this version does not know (a newer peer's) are left out."""
        record = cls(
            **{
                **{k: v for k, v in d.items() if k in _EPOCH_FIELDS},
                "members": tuple(d["members"]),
                "incarnations": tuple(d["incarnations"]),
                "donors": tuple(d["donors"]),
            }
        )
        if len(record.members) != len(record.incarnations):
            raise ValueError("an epoch record needs one incarnation per member")
        return record


_MEMBER_FIELDS = frozenset(f.name for f in fields(MemberInfo))
_EPOCH_FIELDS = frozenset(f.name for f in fields(EpochRecord))


def run_key(run_id: str) -> str:
    return f"p2pnode_{run_id}_members"


def epochs_key(run_id: str) -> str:
    return f"p2pnode_{run_id}_epochs"


def revoked_key(run_id: str) -> str:
    return f"p2pnode_{run_id}_revoked"


def run_validators(run_id: str, private_key: RSAPrivateKey | None = None, owner: str | None = None) -> list:
    """The validator set every peer of the run must use (a closed run's peers all give its `owner`)."""
    validators = [RSASignatureValidator(private_key), SchemaValidator(_RunSchema, prefix=f"p2pnode_{run_id}")]
    if owner is not None:
        validators.append(AdmissionValidator(run_id, owner))
    return validators


# Every DHT call is bounded: a call still in flight when the DHT process stops would never return,
# and the thread waiting on it would keep the daemon's event loop (and the process) from exiting.
DHT_CALL_TIMEOUT = 20.0


class Membership:
    """Announce this node and read the run's members. Calls block briefly; run them in a thread."""

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        validator: RSASignatureValidator,
        ttl: float = 20.0,
        admission: Admission | None = None,
        done_ttl: float = DONE_TTL,
    ):
        self.dht, self.run_id, self.ttl, self.admission = dht, run_id, ttl, admission
        self.done_ttl = done_ttl
        self.store_seconds = 0.0  # how long the last announcement took
        self.subkey = validator.local_public_key
        self._refused: set[tuple[str, str]] = set()  # (peer, reason) already logged

    def _store(self, key: str, value: object, expiration: float, subkey: object) -> bool:
        future = self.dht.store(key, value, expiration, subkey=subkey, return_future=True)
        return future.result(timeout=DHT_CALL_TIMEOUT)

    def _get(self, key: str) -> ValueWithExpiration[DHTValue] | None:
        return self.dht.get(key, latest=True, return_future=True).result(timeout=DHT_CALL_TIMEOUT)

    def announce(self, info: MemberInfo) -> bool:
        """Publish `info` for `ttl` s (a heartbeat), or `done_ttl` s once the node is done: a finished
        run's members stay readable after their daemons exit, so a node that comes back later (its
        machine slept through the end) learns the run has finished instead of waiting to join it."""
        info.updated = time.time()
        record = asdict(info)
        record["loss"] = float(record["loss"]) if record["loss"] == record["loss"] else -1.0
        # a store can take seconds (a DHT peer that stopped answering): the record must outlive the
        # time to the next one, so it lives `ttl` plus twice what the last store took
        ttl = self.done_ttl if info.status == "done" else self.ttl + min(2 * self.store_seconds, 3 * self.ttl)
        started = time.monotonic()
        try:
            return bool(self._store(run_key(self.run_id), record, get_dht_time() + ttl, subkey=self.subkey))
        finally:
            self.store_seconds = time.monotonic() - started

    def propose(self, record: EpochRecord, ttl: float) -> bool:
        """Write (or refresh) this peer's epoch record."""
        return bool(self._store(epochs_key(self.run_id), record.to_dict(), get_dht_time() + ttl, subkey=self.subkey))

    def epochs(self) -> list[EpochRecord]:
        """Every epoch record the DHT holds for the run (one per proposer)."""
        found = self._get(epochs_key(self.run_id))
        if found is None or not isinstance(found.value, dict):
            return []
        records = []
        for item in found.value.values():
            try:
                record = EpochRecord.from_dict(item.value)
            except (TypeError, KeyError, ValueError):
                logger.warning("ignoring a malformed epoch record")
                continue
            if self.admission is None or self._admits_epoch(record):
                records.append(record)
        return records

    def _admits_epoch(self, record: EpochRecord) -> bool:
        """A closed run follows epochs proposed by an admitted member and naming only peers that were
        admitted (a member revoked since stays in the epoch it is in until the next one drops it)."""
        if not self.admission.admitted(record.proposer):
            self._log_refused(record.proposer, f"epoch {record.number} proposed by a peer not admitted")
            return False
        strangers = [p for p in record.members if p not in self.admission.serial_of]
        if strangers:
            self._log_refused(record.proposer, f"epoch {record.number} names uninvited {strangers[0][-8:]}")
            return False
        return True

    def _log_refused(self, peer: str, reason: str) -> None:
        if (peer, reason) not in self._refused:
            self._refused.add((peer, reason))
            logger.warning("refusing peer %s: %s", peer[-8:], reason)

    def revocations(self) -> list[Revocation]:
        """The owner's revocations the DHT holds for this run (each signature checked by the caller)."""
        found = self._get(revoked_key(self.run_id))
        if found is None or not isinstance(found.value, dict):
            return []
        out = []
        for item in found.value.values():
            with contextlib.suppress(TypeError, KeyError, AttributeError):
                out.append(Revocation(item.value["run_id"], item.value["serial"], item.value["signature"]))
        return out

    def publish_revocation(self, rev: Revocation, ttl: float) -> bool:
        """Store an owner-signed revocation (any peer may store it again: the owner's signature is in the value)."""
        value = {"run_id": rev.run_id, "serial": rev.serial, "signature": rev.signature}
        return bool(self._store(revoked_key(self.run_id), value, get_dht_time() + ttl, subkey=rev.serial))

    def members(self) -> list[MemberInfo]:
        """Live members, one per peer id (the newest record), in the run's order."""
        return [info for info, _ in self.read_members()]

    def read_members(self) -> list[tuple[MemberInfo, float]]:
        """`members()` with the DHT expiration time of each record. A read can miss records that are
        there (a DHT peer that stopped answering makes it slow and partial): a reader that keeps what
        it saw until it expires does not take a missed heartbeat for a member gone."""
        found = self._get(run_key(self.run_id))
        if found is None or not isinstance(found.value, dict):
            return []
        newest: dict[str, tuple[MemberInfo, float]] = {}
        for item in found.value.values():
            try:
                info = MemberInfo.from_dict(item.value)
            except (TypeError, AttributeError):
                logger.warning("ignoring a malformed member record")
                continue
            if info.peer_id not in newest or info.updated > newest[info.peer_id][0].updated:
                newest[info.peer_id] = (info, item.expiration_time)
        if self.admission is not None:
            for rev in self.revocations():
                if self.admission.revoke(rev):
                    logger.warning("the owner revoked invitation %s", rev.serial)
            newest = {p: m for p, m in newest.items() if self._admits(m[0])}
        return sorted(newest.values(), key=lambda m: m[0].sort_key)

    def _admits(self, info: MemberInfo) -> bool:
        reason = self.admission.refusal(info.peer_id, info.invitation)
        if reason is not None:
            self._log_refused(info.peer_id, reason)
        return reason is None
