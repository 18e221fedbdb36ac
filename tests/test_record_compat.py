"""DHT records across p2pnode versions: a record with a field this version does not know (written by a
newer peer) is stored and read, and the type checks on known fields stay as strict as before."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.serializer import MSGPackSerializer

from p2pnode.protocol.membership import EpochRecord, MemberInfo, Membership, run_validators

RUN = "compat"


@pytest.fixture(scope="module")
def validators() -> list:
    return run_validators(RUN, RSAPrivateKey())


def stored(validators: list, field: str, value: dict) -> bool:
    """Whether a DHT peer with this version's validators accepts `value` under the run's `field` key."""
    signer = next(v for v in validators if isinstance(v, RSASignatureValidator))
    chain = CompositeValidator(validators)
    record = DHTRecord(
        key=DHTID.generate(source=f"p2pnode_{RUN}_{field}").to_bytes(),
        subkey=MSGPackSerializer.dumps(signer.local_public_key),
        value=MSGPackSerializer.dumps(value),
        expiration_time=get_dht_time() + 60,
    )
    return chain.validate(dataclasses.replace(record, value=chain.sign_value(record)))


def member() -> dict:
    value = dataclasses.asdict(MemberInfo(peer_id="peer", fingerprint="f", settings_hash="s", samples=3))
    value["loss"] = -1.0  # as announce() writes it (NaN is not a value the schema compares equal)
    return value


def epoch() -> dict:
    return EpochRecord(2, 40, ("a", "b"), ("ia", "ib"), ("a",), 100, 10, "f", "s", "a", 1.0).to_dict()


def test_records_with_a_field_from_a_newer_version_are_stored(validators):
    assert stored(validators, "members", member()) and stored(validators, "epochs", epoch())
    assert stored(validators, "members", {**member(), "gpu": "H200"})  # refused before: reads then hung
    assert stored(validators, "epochs", {**epoch(), "deadline": 1.5e9})


def test_an_older_peers_heartbeat_without_a_batch_is_stored_and_a_batch_of_the_wrong_type_is_read_as_unsaid(validators):
    """`batch` came later than the schema's other fields: declared there with a default, it made every
    heartbeat of an older peer (without it) fail hivemind's check that parsing changed nothing."""
    older = {k: v for k, v in member().items() if k != "batch"}
    assert stored(validators, "members", older) and stored(validators, "members", {**member(), "batch": 3})
    assert MemberInfo.from_dict(older).batch == 0 and MemberInfo.from_dict({**member(), "batch": 3}).batch == 3
    for wrong in (3.0, "3", True, None, [3]):  # stored (the schema cannot check it), read as not said
        assert MemberInfo.from_dict({**member(), "batch": wrong}).batch == 0


def test_a_heartbeat_publishes_its_gradient_weight_and_one_without_it_or_with_a_wrong_one_reads_as_full(validators):
    """`gradient_weight` (what P2P-FT counts a late node's gradients with) came after `batch`: the same rules."""
    older = {k: v for k, v in member().items() if k != "gradient_weight"}
    assert stored(validators, "members", older) and stored(validators, "members", {**member(), "gradient_weight": 0.4})
    assert MemberInfo.from_dict(older).gradient_weight == 1.0
    assert MemberInfo.from_dict({**member(), "gradient_weight": 0.4}).gradient_weight == 0.4
    for wrong in (0.0, -0.5, 1.5, float("nan"), float("inf"), 1, "0.4", True, None):  # read as not said: full weight
        assert MemberInfo.from_dict({**member(), "gradient_weight": wrong}).gradient_weight == 1.0


def test_a_heartbeat_shows_its_settings_and_one_without_them_or_with_wrong_ones_is_still_read(validators):
    shown = {**member(), "settings": {"epochs": "40", "lr": "0.01"}}
    assert stored(validators, "members", shown)
    assert MemberInfo.from_dict(shown).settings == {"epochs": "40", "lr": "0.01"}
    older = {k: v for k, v in member().items() if k != "settings"}
    assert stored(validators, "members", older) and MemberInfo.from_dict(older).settings == {}
    for wrong in ("epochs=40", {"epochs": 40}, {3: "x"}, [["epochs", "40"]]):  # read as not shown
        assert MemberInfo.from_dict({**member(), "settings": wrong}).settings == {}


def test_known_fields_keep_their_strict_types(validators):
    assert not stored(validators, "members", {**member(), "round": "3"})
    assert not stored(validators, "members", {**member(), "samples": 3.0})
    assert not stored(validators, "epochs", {**epoch(), "rounds": 100.0})
    assert not stored(validators, "epochs", {**epoch(), "members": "a,b"})


def test_a_newer_peers_records_are_read_without_their_unknown_fields():
    info = MemberInfo.from_dict({**member(), "gpu": "H200"})
    assert info.peer_id == "peer" and info.samples == 3 and not hasattr(info, "gpu")
    record = EpochRecord.from_dict({**epoch(), "deadline": 1.5e9})
    assert record == EpochRecord.from_dict(epoch()) and record.members == ("a", "b")


def test_read_members_keeps_a_newer_peers_heartbeat_and_skips_a_malformed_one():
    membership = Membership.__new__(Membership)
    membership.admission, membership.run_id = None, RUN
    items = {
        b"new": SimpleNamespace(value={**member(), "gpu": "H200"}, expiration_time=50.0),
        b"bad": SimpleNamespace(value={"gpu": "H200"}, expiration_time=50.0),  # no peer id: not a member record
    }
    membership._get = lambda key: SimpleNamespace(value=items)
    assert [(m.peer_id, expires) for m, expires in membership.read_members()] == [("peer", 50.0)]
