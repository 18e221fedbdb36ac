"""Who may join this node's run: open, or closed to peers the owner invited (DESIGN §9).

`run_access` checks a node's own credentials before it starts anything, so a wrong key file or an
invitation for another peer or run is one clear error at start, not a node that waits forever.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from hivemind.utils.crypto import RSAPrivateKey

from ..protocol.admission import (
    Admission,
    AdmissionError,
    Invitation,
    check_invitation,
    dht_signing_key,
    load_private_key,
    parse_public_key,
    peer_id_of,
)
from .errors import BadInput

logger = logging.getLogger(__name__)


@dataclass
class RunAccess:
    signing_key: RSAPrivateKey  # signs this node's DHT records
    admission: Admission | None = None  # None: an open run
    invitation: str = ""  # this node's invitation (JSON), shown in its member record

    @property
    def closed(self) -> bool:
        return self.admission is not None


def check_identity_file(identity: str | None) -> None:
    """An --identity file that exists is a key from `p2pnode keygen` (a missing one is written by the DHT's
    start, into a folder that must exist); else BadInput. p2pd itself would only say 'cannot parse invalid
    wire-format data', and hivemind blames the DHT for a missing folder."""
    if identity is not None and not Path(identity).exists() and not Path(identity).parent.is_dir():
        raise BadInput(f"--identity {identity}: its folder does not exist; create it (the key is written there)")
    if identity is not None and Path(identity).exists():
        try:
            load_private_key(identity)
        except AdmissionError as e:
            raise BadInput(f"--identity: {e}") from None


def run_access(run_id: str, owner: str | None, invite: str | None, identity: str | None) -> RunAccess:
    """This node's access to the run: for a closed run, its identity key and a valid invitation for
    the peer id of that key. Raises BadInput with what to do."""
    if owner is None:
        if invite is not None:
            raise BadInput("--invite is for a closed run: also give the run's --owner PUBLIC_KEY")
        check_identity_file(identity)
        logger.warning(
            "run %r is open: anyone who knows a bootstrap address and the run id can join it "
            "(close it with --owner and invitations: see `p2pnode invite --help`)",
            run_id,
        )
        return RunAccess(RSAPrivateKey())  # own key: several nodes may share a process
    try:
        owner_key = parse_public_key(owner)
        if invite is None:
            raise BadInput("this run is closed (--owner): give your invitation with --invite FILE")
        if identity is None or not Path(identity).is_file():
            raise BadInput("a closed run needs --identity FILE: the key file whose peer id your invitation names")
        key = load_private_key(identity)
        peer_id = peer_id_of(key.public_key())
        invitation = Invitation.read(invite)
    except AdmissionError as e:
        raise BadInput(str(e)) from None
    try:
        check_invitation(invitation, owner_key, run_id, peer_id)
    except AdmissionError as e:  # what this volunteer can do about it
        hint = (
            f"start with the --identity it was made for, or send the owner this key's peer id {peer_id}"
            if invitation.peer_id != peer_id
            else "ask the run's owner for a new invitation"
        )
        raise BadInput(f"{e}: {hint}") from None
    logger.info("closed run %r: invitation %s for this peer", run_id, invitation.serial)
    return RunAccess(dht_signing_key(key), Admission(run_id, owner), invitation.to_json())


def publish_revocation(peers: list[str], run_id: str, owner_key: str, serial: str, keep: float) -> str:
    """Sign a revocation of invitation `serial` with the owner's key and store it in the run's DHT
    (through a client-mode peer, shut down afterwards); returns the owner's public key token."""
    import hivemind

    from ..protocol.admission import make_revocation, public_key_token
    from ..protocol.membership import Membership, run_validators

    try:
        key = load_private_key(owner_key)
        revocation = make_revocation(key, run_id, serial)
    except AdmissionError as e:
        raise BadInput(str(e)) from None
    owner = public_key_token(key.public_key())
    validators = run_validators(run_id, owner=owner)
    try:
        dht = hivemind.DHT(initial_peers=peers, client_mode=True, start=True, record_validators=validators)
    except Exception as e:
        raise BadInput(f"could not reach --peers ({type(e).__name__}: {e})") from None
    try:
        stored = Membership(dht, run_id, validators[0]).publish_revocation(revocation, keep)
    finally:
        dht.shutdown()
    if not stored:
        raise BadInput("no peer of the run stored the revocation: check --peers and --run-id, then try again")
    return owner
