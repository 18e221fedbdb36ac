"""A closed run over real daemons: an uninvited peer with the same model and settings pushes well-formed
(poisoned) frames at every member every round; none is accepted and the members end exactly where the
same run without it ends."""

from __future__ import annotations

import asyncio
import copy
import time

import hivemind
import pytest
import torch
from hivemind.p2p import PeerID

from p2pnode.node.daemon import Node
from p2pnode.node.run_status import attestation, read_run_status
from p2pnode.node.settings import NodeSettings
from p2pnode.node.testnet import invite_nodes, start_bootstrap, stop_processes
from p2pnode.protocol.admission import (
    Invitation,
    dht_signing_key,
    generate_key_file,
    load_private_key,
    peer_id_of,
)
from p2pnode.protocol.envelope import MAX_MESSAGE_BYTES, from_message, pack
from p2pnode.protocol.links import Links
from p2pnode.protocol.membership import MemberInfo, Membership, run_validators
from p2pnode.protocol.transfer import TransferError, fetch_state

RUN = "closed-daemons"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


class Uninvited:
    """A peer that knows the bootstrap address, the run id, the owner key and the model, but has no
    invitation: it shows a member's copied invitation and pushes poisoned copies of real messages."""

    def __init__(self, key_path, peers: list[str], owner: str, copied_invitation: str) -> None:
        self.key = load_private_key(key_path)
        self.peer_id = peer_id_of(self.key.public_key())
        validators = run_validators(RUN, dht_signing_key(self.key), owner)
        self.dht = hivemind.DHT(
            initial_peers=peers,
            host_maddrs=LOOPBACK,
            identity_path=str(key_path),  # its libp2p peer id is its key's, as for any real peer
            start=True,
            record_validators=validators,
        )
        assert str(self.dht.peer_id) == self.peer_id
        info = MemberInfo(peer_id=self.peer_id, fingerprint="f", settings_hash="s", samples=1)
        info.invitation = copied_invitation
        self.record_stored = Membership(self.dht, RUN, validators[0], ttl=60).announce(info)
        self.answers: list[bool] = []
        self.downloads: list[bool] = []  # per member: whether it served this peer its parameters

    async def attack(self, members: list[Node], armed: asyncio.Event, done: asyncio.Event) -> None:
        """Push a poisoned copy of every message member 0 sends, to every member, as member 0 sends it:
        at least one push per round however slow the event loop runs (a timed loop pushed too few in CI).
        `armed` is set once it pushes: the run must not start before (a run that did ended unattacked)."""
        p2p = await self.dht.replicate_p2p()
        links = await Links.create(p2p, RUN, self._never, max_bytes=MAX_MESSAGE_BYTES, timeout=10.0)
        source = members[0].transport
        original = source.send_all
        sends = []

        def push(messages) -> None:
            for m in messages:
                poisoned = copy.copy(m)
                poisoned.tensors = {k: -1000 * t if torch.is_tensor(t) else t for k, t in m.tensors.items()}
                frame = pack(from_message(poisoned, RUN, m.epoch, self.peer_id))
                for node in members:
                    target = PeerID.from_base58(node.peer_id)
                    sends.append(asyncio.create_task(links.send(target, frame, attempts=1)))

        async def recording(messages):
            push([copy.deepcopy(m) for m in messages])
            await original(messages)

        source.send_all = recording
        armed.set()
        try:
            await done.wait()
            self.downloads = [await self._download(p2p, node) for node in members]  # trained, still serving
            self.answers = list(await asyncio.gather(*sends))
        finally:
            source.send_all = original
            await links.shutdown()
            await p2p.shutdown()

    @staticmethod
    async def _download(p2p, member: Node) -> bool:
        """Whether the member hands its parameters to this peer, as it does to an invited joiner."""
        try:
            await fetch_state(p2p, RUN, [member.peer_id], member.model.num_trainable, chunk_timeout=15.0)
        except TransferError:
            return False
        return True

    @staticmethod
    async def _never(data: bytes, peer: PeerID) -> bool:
        return False

    def shutdown(self) -> None:
        self.dht.shutdown()


def closed_settings(tmp_path, workdir, addrs, owner, i: int) -> NodeSettings:
    state = workdir / f"node{i}"
    return NodeSettings(
        nodes=3,
        split="0-3,4-6,7-9",
        epochs=2,
        batch_size=48,
        run_id=RUN,
        peers=addrs,
        listen=LOOPBACK,
        round_timeout=30.0,
        index=i,
        state_dir=str(state),
        identity=str(state / "node.key"),
        owner=owner,
        invite=str(state / "invite.json"),
    ).validate()


def run_closed(tmp_path, name: str, with_uninvited: bool):
    workdir = tmp_path / name
    workdir.mkdir()
    states = [workdir / f"node{i}" for i in range(3)]
    owner = invite_nodes(workdir, states, RUN)
    boot, addrs = start_bootstrap(RUN, workdir / "boot.log", owner=owner)

    async def scenario():
        nodes = [await Node.create(closed_settings(tmp_path, workdir, addrs, owner, i)) for i in range(3)]
        stranger = None
        try:
            done, armed = asyncio.Event(), asyncio.Event()
            attack = None
            if with_uninvited:
                generate_key_file(workdir / "mallory.key")
                copied = Invitation.read(states[0] / "invite.json").to_json()
                stranger = await asyncio.get_running_loop().run_in_executor(
                    None, Uninvited, workdir / "mallory.key", addrs, owner, copied
                )
                attack = asyncio.create_task(stranger.attack(nodes, armed, done))
                await asyncio.wait_for(armed.wait(), 60)
            runs = [asyncio.create_task(n.run()) for n in nodes]
            results = await asyncio.wait_for(asyncio.gather(*runs), 240)
            done.set()
            if attack is not None:
                await attack
            params = [n.algorithm.params.clone() for n in nodes]
            for n, r in zip(nodes, results, strict=True):
                r["refused_after_the_attack"] = dict(n.links.refused)
            if with_uninvited:
                status = await asyncio.get_running_loop().run_in_executor(None, read_run_status, addrs, RUN, owner)
                results = [{**r, "status": status} for r in results]
            return results, params, stranger
        finally:
            for n in nodes:
                await n.shutdown()
            if stranger is not None:
                stranger.shutdown()

    try:
        return asyncio.run(scenario())
    finally:
        stop_processes([boot])


@pytest.mark.timeout(540)
def test_an_uninvited_peer_pushing_every_round_changes_nothing_in_a_closed_run(tmp_path):
    started = time.monotonic()
    results, params, stranger = run_closed(tmp_path, "attacked", with_uninvited=True)
    clean_results, clean_params, _ = run_closed(tmp_path, "clean", with_uninvited=False)
    assert stranger.record_stored is False, "the DHT stored a member record with a copied invitation"
    assert stranger.downloads == [False, False, False], "a member served its parameters to the uninvited peer"
    rounds = results[0]["rounds"]
    assert len(stranger.answers) >= rounds, f"only {len(stranger.answers)} frames pushed in {rounds} rounds"
    assert not any(stranger.answers), f"{sum(stranger.answers)} of {len(stranger.answers)} frames accepted"
    assert [r["rounds"] for r in results] == [r["rounds"] for r in clean_results]
    for got, want in zip(params, clean_params, strict=True):
        assert torch.equal(got, want), (got - want).abs().max()
    assert [r["accuracy"] for r in results] == [r["accuracy"] for r in clean_results]
    # every member closed the stranger's streams before reading a byte of them
    assert all(r["refused_after_the_attack"].get("not admitted", 0) >= 1 for r in results), results
    assert all(not r["refused_after_the_attack"] for r in clean_results)
    # contribution records: each node saw its one in-neighbour (directed ring) in every round, and
    # what it published in its member record is what `p2pnode status` shows for that neighbour
    peers = [r["peer_id"] for r in results]
    status = results[0]["status"]
    for i, r in enumerate(results):
        in_neighbour = peers[(i - 1) % 3]
        assert list(r["contributions"]) == [in_neighbour], r["contributions"]
        got_rounds, got_bytes, accepted, refused = r["contributions"][in_neighbour]
        # a round's exchange comes before its step: the last round may end the run without one
        assert rounds - 1 <= got_rounds <= rounds and accepted >= got_rounds and refused == 0 and got_bytes > 0
        assert attestation(status.infos, in_neighbour).startswith(f"{got_rounds} rounds")
    assert attestation(status.infos, stranger.peer_id) == "-"
    assert stranger.peer_id not in [m.peer_id for m in status.infos]
    assert time.monotonic() - started < 500
