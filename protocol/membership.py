"""Run membership through the hivemind DHT (DESIGN §6).

Every node stores its `MemberInfo` under the run's key with its own subkey. The subkey carries the
node's RSA public key, so `RSASignatureValidator` lets only that node write it; `SchemaValidator`
checks the value's shape. The DHT has no delete, so membership is a heartbeat: each record expires
unless refreshed. Every peer of a run must use the same validators (`run_validators`) or reads hang.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import hivemind
import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.utils import get_dht_time

logger = logging.getLogger(__name__)


class _MemberRecord(pydantic.BaseModel):
    peer_id: pydantic.StrictStr
    index: pydantic.StrictInt
    fingerprint: pydantic.StrictStr
    settings_hash: pydantic.StrictStr
    samples: pydantic.StrictInt
    status: pydantic.StrictStr
    round: pydantic.StrictInt
    rounds: pydantic.StrictInt
    epoch: pydantic.StrictInt
    loss: pydantic.StrictFloat
    accuracy: pydantic.StrictFloat
    bytes_sent: pydantic.StrictInt
    classes: pydantic.StrictStr
    updated: pydantic.StrictFloat


class _RunSchema(pydantic.BaseModel):
    members: dict[BytesWithPublicKey, _MemberRecord]


@dataclass
class MemberInfo:
    peer_id: str
    fingerprint: str
    settings_hash: str
    samples: int
    index: int = -1  # preferred position in the member order (-1: order by peer id)
    status: str = "joining"  # joining, training, done, left
    round: int = 0
    rounds: int = 0
    epoch: int = 0
    loss: float = float("nan")
    accuracy: float = -1.0
    bytes_sent: int = 0
    classes: str = ""
    updated: float = field(default_factory=time.time)

    @property
    def sort_key(self) -> tuple[int, str]:
        return (self.index if self.index >= 0 else 2**31, self.peer_id)


def run_key(run_id: str) -> str:
    return f"p2pnode_{run_id}_members"


def run_validators(run_id: str, private_key=None) -> list:
    """The validator set every peer of the run must use."""
    return [RSASignatureValidator(private_key), SchemaValidator(_RunSchema, prefix=f"p2pnode_{run_id}")]


class Membership:
    """Announce this node and read the run's members. Calls block briefly; run them in a thread."""

    def __init__(self, dht: hivemind.DHT, run_id: str, validator: RSASignatureValidator, ttl: float = 20.0):
        self.dht, self.run_id, self.ttl = dht, run_id, ttl
        self.subkey = validator.local_public_key

    def announce(self, info: MemberInfo) -> bool:
        info.updated = time.time()
        record = asdict(info)
        record["loss"] = float(record["loss"]) if record["loss"] == record["loss"] else -1.0
        return bool(self.dht.store(run_key(self.run_id), record, get_dht_time() + self.ttl, subkey=self.subkey))

    def members(self) -> list[MemberInfo]:
        """Live members, one per peer id (the newest record), in the run's order."""
        found = self.dht.get(run_key(self.run_id), latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        newest: dict[str, MemberInfo] = {}
        for item in found.value.values():
            try:
                info = MemberInfo(**item.value)
            except TypeError:
                logger.warning("ignoring a malformed member record")
                continue
            if info.peer_id not in newest or info.updated > newest[info.peer_id].updated:
                newest[info.peer_id] = info
        return sorted(newest.values(), key=lambda m: m.sort_key)
