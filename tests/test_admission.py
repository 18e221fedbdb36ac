"""Closed runs: keys, invitations bound to a peer id, revocations, and the DHT validator."""

from __future__ import annotations

import dataclasses
import pickle
import time

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time

from p2pnode.cli.app import main
from p2pnode.protocol.admission import (
    Admission,
    AdmissionError,
    AdmissionValidator,
    Invitation,
    check_invitation,
    dht_signing_key,
    generate_key_file,
    load_private_key,
    make_invitation,
    make_revocation,
    parse_duration,
    parse_public_key,
    peer_id_of,
    public_key_token,
)
from p2pnode.protocol.membership import MemberInfo, Membership, run_validators

RUN = "closed"
IN_A_DAY = time.time() + 86400


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {name: generate_key_file(folder / f"{name}.key") for name in ("owner", "other_owner", "alice", "mallory")}


def pid(key) -> str:
    return peer_id_of(key.public_key())


def owner_token(keys, who: str = "owner") -> str:
    return public_key_token(keys[who].public_key())


def test_a_key_file_is_a_libp2p_identity_with_the_printed_peer_id_and_public_key(tmp_path, capsys):
    assert main(["keygen", str(tmp_path / "k")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == ["peer-id", "public-key"]
    assert lines[0].split(": ")[1] == PeerID.from_identity((tmp_path / "k").read_bytes()).to_base58()
    token = lines[1].split(": ")[1]
    assert " " not in token and token.isprintable()
    assert pid(generate_key_file(tmp_path / "k2")) != lines[0].split(": ")[1]
    assert parse_public_key(token).public_numbers().n > 2**2000


def test_keygen_never_overwrites_a_key(tmp_path, capsys):
    (tmp_path / "k").write_bytes(b"precious")
    assert main(["keygen", str(tmp_path / "k")]) == 2
    assert (tmp_path / "k").read_bytes() == b"precious"
    assert "never overwrites" in capsys.readouterr().err


def test_a_valid_invitation_admits_its_peer(keys):
    inv = make_invitation(keys["owner"], RUN, pid(keys["alice"]), IN_A_DAY)
    check_invitation(Invitation.from_json(inv.to_json()), keys["owner"].public_key(), RUN, pid(keys["alice"]))
    assert Admission(RUN, owner_token(keys)).refusal(pid(keys["alice"]), inv.to_json()) is None


@pytest.mark.parametrize(
    "case, reason",
    [
        ("wrong signer", "not signed by this run's owner"),
        ("expired", "expired"),
        ("another run", "is for run 'elsewhere'"),
        ("another peer", "names peer"),
        ("revoked", "revoked"),
        ("tampered expiry", "not signed by this run's owner"),
        ("garbage", "not a p2pnode invitation"),
    ],
)
def test_an_invitation_is_refused_when(case, reason, keys):
    alice = pid(keys["alice"])
    admission = Admission(RUN, owner_token(keys))
    inv = make_invitation(keys["owner"], RUN, alice, IN_A_DAY)
    text = inv.to_json()
    if case == "wrong signer":
        text = make_invitation(keys["other_owner"], RUN, alice, IN_A_DAY).to_json()
    elif case == "expired":
        text = make_invitation(keys["owner"], RUN, alice, time.time() - 1).to_json()
    elif case == "another run":
        text = make_invitation(keys["owner"], "elsewhere", alice, IN_A_DAY).to_json()
    elif case == "another peer":
        text = make_invitation(keys["owner"], RUN, pid(keys["mallory"]), IN_A_DAY).to_json()
    elif case == "revoked":
        assert admission.revoke(make_revocation(keys["owner"], RUN, inv.serial))
    elif case == "tampered expiry":
        text = dataclasses.replace(inv, expires=inv.expires + 10**6).to_json()
    elif case == "garbage":
        text = '{"p2pnode_invitation": 1, "run_id": 3}'
    refusal = admission.refusal(alice, text)
    assert refusal is not None and reason in refusal


def test_a_revocation_counts_only_when_the_owner_signed_it_for_this_run(keys):
    admission = Admission(RUN, owner_token(keys))
    inv = make_invitation(keys["owner"], RUN, pid(keys["alice"]), IN_A_DAY)
    assert admission.refusal(pid(keys["alice"]), inv.to_json()) is None and admission.admitted(pid(keys["alice"]))
    assert not admission.revoke(make_revocation(keys["mallory"], RUN, inv.serial))
    assert not admission.revoke(make_revocation(keys["owner"], "elsewhere", inv.serial))
    assert admission.admitted(pid(keys["alice"]))
    assert admission.revoke(make_revocation(keys["owner"], RUN, inv.serial))
    assert not admission.admitted(pid(keys["alice"]))


def test_an_invitation_for_a_peer_id_no_keygen_key_can_have_is_refused(keys):
    ed25519 = "12D3KooWQRGq2Z3Lc4NRhQMEazmfZL1gNd4odq4vCEtSCfc8StdX"  # a p2pd default identity
    with pytest.raises(AdmissionError, match=r"cannot join a closed run \(not RSA\): invite the peer-id line"):
        make_invitation(keys["owner"], RUN, ed25519, time.time() + 60)  # was signed, then useless
    assert make_invitation(keys["owner"], RUN, pid(keys["alice"]), time.time() + 60).peer_id.startswith("Qm")


def test_durations_and_bad_owner_keys_give_one_line_reasons():
    assert parse_duration("30d") == 30 * 86400 and parse_duration("90m") == 5400
    for bad in ("30", "-1d", "3x", "d"):
        with pytest.raises(AdmissionError, match="bad duration"):
            parse_duration(bad)
    assert parse_duration("3650d") == 3650 * 86400
    for too_long in ("3651d", "99999999999999999w"):  # the second overflowed time.gmtime in `invite`
        with pytest.raises(AdmissionError, match="too long: at most 3650d"):
            parse_duration(too_long)
    for bad in ("", "ssh-rsa AAAA", "rsa:notbase64!!", "rsa:AAAA"):
        with pytest.raises(AdmissionError, match="--owner"):
            parse_public_key(bad)


# --- the DHT validator, on records as the DHT hands them over -----------------------------------


def signed_record(key, field: str, value: dict, subkey: bytes | None = None) -> DHTRecord:
    """A record of this run's `field` key signed by `key`, stripped as AdmissionValidator sees it."""
    signer = RSASignatureValidator(dht_signing_key(key))
    return DHTRecord(
        key=DHTID.generate(source=f"p2pnode_{RUN}_{field}").to_bytes(),
        subkey=MSGPackSerializer.dumps(signer.local_public_key if subkey is None else subkey),
        value=MSGPackSerializer.dumps(value),
        expiration_time=get_dht_time() + 60,
    )


def member_value(peer: str, invitation: str) -> dict:
    return dataclasses.asdict(
        MemberInfo(peer_id=peer, fingerprint="f", settings_hash="s", samples=1, invitation=invitation)
    )


def test_the_validator_accepts_a_member_record_signed_by_the_invited_peer(keys):
    validator = AdmissionValidator(RUN, owner_token(keys))
    inv = make_invitation(keys["owner"], RUN, pid(keys["alice"]), IN_A_DAY).to_json()
    assert validator.validate(signed_record(keys["alice"], "members", member_value(pid(keys["alice"]), inv)))


def test_the_validator_refuses_uninvited_and_copied_invitations(keys):
    validator = AdmissionValidator(RUN, owner_token(keys))
    alice, mallory = pid(keys["alice"]), pid(keys["mallory"])
    alices = make_invitation(keys["owner"], RUN, alice, IN_A_DAY).to_json()
    # no invitation at all
    assert not validator.validate(signed_record(keys["mallory"], "members", member_value(mallory, "")))
    # Alice's invitation copied by Mallory: under her own peer id it names another peer ...
    assert not validator.validate(signed_record(keys["mallory"], "members", member_value(mallory, alices)))
    # ... and claiming Alice's peer id, the record is signed by a key that is not Alice's
    assert not validator.validate(signed_record(keys["mallory"], "members", member_value(alice, alices)))
    # a record without a signer's key in its subkey
    assert not validator.validate(signed_record(keys["alice"], "members", member_value(alice, alices), b"plain"))


def test_the_validator_binds_epoch_proposers_and_checks_revocation_signatures(keys):
    validator = AdmissionValidator(RUN, owner_token(keys))
    alice = pid(keys["alice"])
    assert validator.validate(signed_record(keys["alice"], "epochs", {"proposer": alice}))
    assert not validator.validate(signed_record(keys["mallory"], "epochs", {"proposer": alice}))
    good = make_revocation(keys["owner"], RUN, "0123456789abcdef")
    forged = make_revocation(keys["mallory"], RUN, "0123456789abcdef")
    as_value = lambda r: {"run_id": r.run_id, "serial": r.serial, "signature": r.signature}  # noqa: E731
    assert validator.validate(signed_record(keys["alice"], "revoked", as_value(good), good.serial))
    assert not validator.validate(signed_record(keys["alice"], "revoked", as_value(forged), forged.serial))
    assert not validator.validate(signed_record(keys["alice"], "revoked", as_value(good), "fedcba9876543210"))


def test_the_validator_survives_pickling_into_the_dht_process(keys):
    validator = pickle.loads(pickle.dumps(AdmissionValidator(RUN, owner_token(keys))))
    inv = make_invitation(keys["owner"], RUN, pid(keys["alice"]), IN_A_DAY).to_json()
    assert validator.validate(signed_record(keys["alice"], "members", member_value(pid(keys["alice"]), inv)))


# --- over a real DHT ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_over_a_real_dht_only_invited_records_are_stored_and_a_revocation_drops_a_member(keys):
    owner = owner_token(keys)
    alice, mallory = pid(keys["alice"]), pid(keys["mallory"])
    alice_inv = make_invitation(keys["owner"], RUN, alice, IN_A_DAY)
    loopback = ["/ip4/127.0.0.1/tcp/0"]
    boot = hivemind.DHT(host_maddrs=loopback, start=True, record_validators=run_validators(RUN, owner=owner))
    peers = [str(a) for a in boot.get_visible_maddrs()]
    dhts = []
    try:
        views = {}
        for name, inv in (("alice", alice_inv.to_json()), ("mallory", alice_inv.to_json())):
            validators = run_validators(RUN, dht_signing_key(keys[name]), owner)
            dht = hivemind.DHT(initial_peers=peers, host_maddrs=loopback, start=True, record_validators=validators)
            dhts.append(dht)
            views[name] = Membership(dht, RUN, validators[0], ttl=60, admission=Admission(RUN, owner))
            stored = views[name].announce(
                MemberInfo(peer_id=pid(keys[name]), fingerprint="f", settings_hash="s", samples=1, invitation=inv)
            )
            assert stored == (name == "alice"), f"{name}'s record: stored={stored}"
        reader = Membership(boot, RUN, run_validators(RUN, owner=owner)[0], admission=Admission(RUN, owner))
        assert [m.peer_id for m in reader.members()] == [alice]
        assert mallory not in [m.peer_id for m in views["mallory"].members()]
        assert views["alice"].publish_revocation(make_revocation(keys["owner"], RUN, alice_inv.serial), 600)
        assert not views["mallory"].publish_revocation(make_revocation(keys["mallory"], RUN, "0123456789abcdef"), 600)
        assert reader.members() == [] and not reader.admission.admitted(alice)
    finally:
        for dht in [*dhts, boot]:
            dht.shutdown()


# --- the command line ----------------------------------------------------------------------------


def test_start_refuses_bad_closed_run_credentials_with_one_line(tmp_path, keys, capsys):
    inv_path = tmp_path / "inv.json"
    inv_path.write_text(make_invitation(keys["owner"], RUN, pid(keys["mallory"]), IN_A_DAY).to_json())
    identity = tmp_path / "alice.key"
    generate_key_file(identity)
    not_a_key = tmp_path / "notes.txt"
    not_a_key.write_text("not a key\n")
    expired = tmp_path / "expired.json"
    alice = peer_id_of(load_private_key(identity).public_key())
    expired.write_text(make_invitation(keys["owner"], RUN, alice, time.time() - 1).to_json())
    owner = owner_token(keys)
    cases = [
        (["--invite", str(inv_path)], "also give the run's --owner"),
        (["--identity", str(not_a_key)], "--identity: " + f"{not_a_key} is not an RSA key file"),
        (["--owner", owner, "--invite", str(inv_path), "--identity", str(not_a_key)], "is not an RSA key file"),
        (["--owner", "rsa:AAAA", "--invite", str(inv_path)], "--owner is not a valid public key"),
        (["--owner", owner], "give your invitation with --invite"),
        (["--owner", owner, "--invite", str(inv_path)], "needs --identity"),
        (
            ["--owner", owner, "--invite", str(inv_path), "--identity", str(identity)],
            "start with the --identity it was made for, or send the owner this key's peer id Qm",
        ),
        (["--owner", owner, "--invite", str(expired), "--identity", str(identity)], "ask the run's owner for a new"),
        (["--owner", owner, "--invite", str(tmp_path / "none"), "--identity", str(identity)], "cannot read invitation"),
    ]
    for flags, reason in cases:
        code = main(["start", "--run-id", RUN, "--index", "0", "--state-dir", str(tmp_path / "s"), *flags])
        err = capsys.readouterr().err
        assert code == 2 and reason in err and "Traceback" not in err, (flags, err)


def test_bootstrap_refuses_an_identity_that_is_not_a_key_before_starting_p2pd(tmp_path, capsys):
    not_a_key = tmp_path / "notes.txt"
    not_a_key.write_text("not a key\n")
    assert main(["bootstrap", "--identity", str(not_a_key)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --identity: {not_a_key} is not an RSA key file from `p2pnode keygen`\n"


def test_an_identity_in_a_folder_that_does_not_exist_is_refused_naming_the_flag(tmp_path):
    """hivemind would write a new key there, and failing, said the DHT could not start."""
    from p2pnode.node.access import check_identity_file
    from p2pnode.node.errors import BadInput

    with pytest.raises(BadInput, match=r"--identity .*/missing/k\.key: its folder does not exist"):
        check_identity_file(str(tmp_path / "missing" / "k.key"))
    check_identity_file(str(tmp_path / "k.key"))  # a new key in an existing folder: written at start
