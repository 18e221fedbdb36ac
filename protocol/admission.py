"""Closed runs (DESIGN §9): the owner's key, invitations bound to a peer id, revocations, and the DHT
validator that refuses member records without a valid invitation.

libp2p private networks are not available with hivemind's p2pd, so admission is an application rule:
the run owner signs Sig_owner(run_id, peer_id, expires, serial) for each member. A peer id is the hash
of the peer's public key and libp2p authenticates it on every stream, so an invitation copied to
another identity names the wrong peer. Keys are RSA in libp2p's protobuf encoding, the format
hivemind writes for `identity_path`: a key file from `p2pnode keygen` is also a node's `--identity`.
A member's DHT records are signed with that same key, so a record's claimed peer id is checked
against the key that signed it. Revocations are owner-signed serials under their own DHT key.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils import MSGPackSerializer
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

KEY_PREFIX = "rsa:"
INVITATION_FORMAT = 1
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION_DAYS = 3650  # ten years: longer is a typo, and past year 9999 no date can show it


class AdmissionError(ValueError):
    """A key, invitation or revocation this node will not accept; the message is one line saying why."""


# --- keys --------------------------------------------------------------------------------------------


def generate_key_file(path: str | Path) -> rsa.RSAPrivateKey:
    """Write a new RSA-2048 private key as libp2p's protobuf (readable by p2pd as `--identity`)."""
    path = Path(path)
    if path.exists():
        raise AdmissionError(f"{path} exists: keygen never overwrites a key (choose another file)")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return key


def load_private_key(path: str | Path) -> rsa.RSAPrivateKey:
    """Read a key file written by `p2pnode keygen` (or by hivemind for `identity_path`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise AdmissionError(f"cannot read key file {path}: {e.strerror}") from None
    try:
        message = crypto_pb2.PrivateKey.FromString(data)
        if message.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("not RSA")
        key = serialization.load_der_private_key(message.data, password=None)
    except Exception:
        raise AdmissionError(f"{path} is not an RSA key file from `p2pnode keygen`") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise AdmissionError(f"{path} is not an RSA key file from `p2pnode keygen`")
    return key


def peer_id_of(public_key: rsa.RSAPublicKey) -> str:
    """The libp2p peer id (base58) of an RSA public key."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def public_key_token(public_key: rsa.RSAPublicKey) -> str:
    """One printable token for `--owner`: 'rsa:' and the DER key in unpadded url-safe base64."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return KEY_PREFIX + base64.urlsafe_b64encode(der).decode().rstrip("=")


def parse_public_key(token: str) -> rsa.RSAPublicKey:
    token = token.strip()
    if not token.startswith(KEY_PREFIX):
        raise AdmissionError(f"--owner must be a public key printed by `p2pnode keygen` (rsa:...), got {token[:20]!r}")
    body = token[len(KEY_PREFIX) :]
    try:
        key = serialization.load_der_public_key(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except Exception:
        raise AdmissionError("--owner is not a valid public key: copy the whole public-key line of keygen") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise AdmissionError("--owner must be an RSA public key from `p2pnode keygen`")
    return key


def dht_signing_key(private_key: rsa.RSAPrivateKey) -> RSAPrivateKey:
    """The same key as hivemind's RSAPrivateKey, for signing this node's DHT records."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = private_key
    return key


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '3600s', '2w' -> seconds (more than zero, at most MAX_DURATION_DAYS)."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise AdmissionError(f"bad duration {text!r}: use a number and s, m, h, d or w, e.g. 30d")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds > MAX_DURATION_DAYS * 86400:
        raise AdmissionError(f"duration {text!r} is too long: at most {MAX_DURATION_DAYS}d")
    return seconds


def _sign(key: rsa.RSAPrivateKey, body: bytes) -> str:
    return base64.b64encode(key.sign(body, _PSS, hashes.SHA256())).decode()


def _verify(key: rsa.RSAPublicKey, body: bytes, signature: str) -> bool:
    try:
        key.verify(base64.b64decode(signature, validate=True), body, _PSS, hashes.SHA256())
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# --- invitations and revocations -----------------------------------------------------------------


@dataclass(frozen=True)
class Invitation:
    """The owner's permission for one peer id to take part in one run until `expires` (unix time)."""

    run_id: str
    peer_id: str
    expires: int
    serial: str
    signature: str = ""

    def body(self) -> bytes:
        return f"p2pnode-invitation|{self.run_id}|{self.peer_id}|{self.expires}|{self.serial}".encode()

    def to_json(self) -> str:
        return json.dumps({"p2pnode_invitation": INVITATION_FORMAT, **dataclasses.asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Invitation:
        try:
            data = json.loads(text)
            if data.pop("p2pnode_invitation") != INVITATION_FORMAT:
                raise ValueError("format")
            inv = cls(**data)
            if not all(isinstance(getattr(inv, f), str) for f in ("run_id", "peer_id", "serial", "signature")):
                raise ValueError("types")
            if not isinstance(inv.expires, int):
                raise ValueError("expires")
        except (ValueError, TypeError, KeyError, AttributeError):
            raise AdmissionError("not a p2pnode invitation (write one with `p2pnode invite`)") from None
        return inv

    @classmethod
    def read(cls, path: str | Path) -> Invitation:
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise AdmissionError(f"cannot read invitation {path}: {getattr(e, 'strerror', None) or e}") from None
        try:
            return cls.from_json(text)
        except AdmissionError as e:
            raise AdmissionError(f"{path}: {e}") from None


def make_invitation(owner: rsa.RSAPrivateKey, run_id: str, peer_id: str, expires: float) -> Invitation:
    try:
        digest = multihash.decode(PeerID.from_base58(peer_id).to_bytes())
    except Exception:
        raise AdmissionError(f"--peer {peer_id!r} is not a peer id (the peer-id line of `p2pnode keygen`)") from None
    if digest.name == "id":  # the key itself inlined (Ed25519, 12D3Koo...): a closed run's members hold RSA keys
        raise AdmissionError(
            f"--peer {peer_id} names a key that cannot join a closed run (not RSA): invite the peer-id line "
            "of the volunteer's `p2pnode keygen` (Qm...)"
        )
    unsigned = Invitation(run_id, peer_id, int(expires), secrets.token_hex(8))
    return dataclasses.replace(unsigned, signature=_sign(owner, unsigned.body()))


def check_invitation(
    inv: Invitation, owner: rsa.RSAPublicKey, run_id: str, peer_id: str, now: float | None = None
) -> None:
    """Raise AdmissionError unless `inv` lets `peer_id` into `run_id` now (revocations are separate)."""
    if not _verify(owner, inv.body(), inv.signature):
        raise AdmissionError(f"invitation {inv.serial} is not signed by this run's owner")
    if inv.run_id != run_id:
        raise AdmissionError(f"invitation {inv.serial} is for run {inv.run_id!r}, not {run_id!r}")
    if inv.peer_id != peer_id:
        raise AdmissionError(f"invitation {inv.serial} names peer {inv.peer_id[-8:]}, not {peer_id[-8:]}")
    if inv.expires <= (time.time() if now is None else now):
        raise AdmissionError(
            f"invitation {inv.serial} expired at {time.strftime('%Y-%m-%d %H:%M', time.gmtime(inv.expires))} UTC"
        )


@dataclass(frozen=True)
class Revocation:
    run_id: str
    serial: str
    signature: str = ""

    def body(self) -> bytes:
        return f"p2pnode-revocation|{self.run_id}|{self.serial}".encode()


def make_revocation(owner: rsa.RSAPrivateKey, run_id: str, serial: str) -> Revocation:
    if not re.fullmatch(r"[0-9a-f]{16}", serial):
        raise AdmissionError(f"bad serial {serial!r}: the 16 hex digits `p2pnode invite` printed")
    unsigned = Revocation(run_id, serial)
    return dataclasses.replace(unsigned, signature=_sign(owner, unsigned.body()))


def revocation_is_valid(rev: Revocation, owner: rsa.RSAPublicKey, run_id: str) -> bool:
    return rev.run_id == run_id and _verify(owner, rev.body(), rev.signature)


# --- the run's rule ------------------------------------------------------------------------------


class Admission:
    """Who may take part in a closed run: peers with a valid invitation whose serial is not revoked."""

    def __init__(self, run_id: str, owner_token: str) -> None:
        self.run_id, self.owner_token = run_id, owner_token
        self.owner = parse_public_key(owner_token)
        self.revoked: set[str] = set()
        self.serial_of: dict[str, str] = {}  # peer id -> serial of the invitation it was admitted with

    def refusal(self, peer_id: str, invitation: str) -> str | None:
        """Why `peer_id` presenting `invitation` (its JSON) is refused now, or None if admitted."""
        try:
            inv = Invitation.from_json(invitation)
            check_invitation(inv, self.owner, self.run_id, peer_id)
        except AdmissionError as e:
            return str(e)
        if inv.serial in self.revoked:
            return f"invitation {inv.serial} was revoked by the owner"
        self.serial_of[peer_id] = inv.serial
        return None

    def admitted(self, peer_id: str) -> bool:
        """Whether this peer showed a valid invitation that has not been revoked since."""
        serial = self.serial_of.get(peer_id)
        return serial is not None and serial not in self.revoked

    def revoke(self, rev: Revocation) -> bool:
        """Record a revocation if the owner signed it; True if it is new."""
        if rev.serial in self.revoked or not revocation_is_valid(rev, self.owner, self.run_id):
            return False
        self.revoked.add(rev.serial)
        return True


class AdmissionValidator(RecordValidatorBase):
    """DHT validator of a closed run: a member record must carry a valid invitation for the peer id of
    the key that signed it, an epoch record's proposer must be the key that signed it, and a revocation
    must be signed by the owner. Other keys pass. Runs after RSASignatureValidator (which checks the
    signature itself) on the stripped value."""

    def __init__(self, run_id: str, owner_token: str) -> None:
        self.run_id, self.owner_token = run_id, owner_token
        parse_public_key(owner_token)  # fail at once on a bad --owner
        self._keys = {
            DHTID.generate(source=f"p2pnode_{run_id}_{field}").to_bytes(): field
            for field in ("members", "epochs", "revoked")
        }
        self._owner: rsa.RSAPublicKey | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_owner": None}  # keys do not pickle; the DHT process parses it again

    @property
    def priority(self) -> int:
        return 5  # below RSASignatureValidator (10): validates the value it has stripped of the signature

    def validate(self, record: DHTRecord) -> bool:
        field = self._keys.get(record.key)
        if field is None:
            return True
        if self._owner is None:
            self._owner = parse_public_key(self.owner_token)
        try:
            value = MSGPackSerializer.loads(record.value)
            subkey = MSGPackSerializer.loads(record.subkey) if record.subkey else None
            if field == "revoked":
                rev = Revocation(value["run_id"], value["serial"], value["signature"])
                return subkey == rev.serial and revocation_is_valid(rev, self._owner, self.run_id)
            signer = _signer_peer_id(subkey)
            if field == "epochs":
                return signer is not None and value["proposer"] == signer
            if signer is None or value["peer_id"] != signer:
                return False
            check_invitation(Invitation.from_json(value["invitation"]), self._owner, self.run_id, signer)
        except (AdmissionError, KeyError, TypeError, ValueError):
            return False
        return True


def _signer_peer_id(subkey: object) -> str | None:
    """The peer id of the RSA key in a protected subkey ('[owner:ssh-rsa ...]'), if there is one."""
    if not isinstance(subkey, bytes):
        return None
    found = RSASignatureValidator._PUBLIC_KEY_RE.findall(subkey)
    if len(found) != 1:
        return None
    try:
        return peer_id_of(RSAPublicKey.from_bytes(found[0])._public_key)
    except Exception:
        return None
