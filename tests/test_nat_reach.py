"""A node nobody can dial still receives its links once it reaches its in-neighbour (`Links.reach`).

On 127.0.0.1: the "NAT" node's p2pd has no listen address at all (`no_listen`), so it can only dial
out, as behind a home router. Its in-neighbour cannot open a link to it until the NAT node opens a
connection to the in-neighbour; then the in-neighbour's frames travel over that connection.
Every daemon is shut down in a `finally`; tests/conftest.py ends any left over.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.utils.multiaddr import Multiaddr

from p2pnode.protocol.codecs import get_codec
from p2pnode.protocol.envelope import Envelope, max_frame_bytes, pack
from p2pnode.protocol.links import Links

RUN = "reach"
NUMEL = 256
MAX = max_frame_bytes({"x": (NUMEL,)}, "none")


def frame(sender: object) -> bytes:
    x = get_codec("none").encode(torch.zeros(NUMEL))
    return pack(Envelope(RUN, 0, 0, "mix", 0, str(sender), "value", {"x": x}))


@pytest.mark.timeout(120)
def test_an_undialable_node_gets_its_in_neighbours_frames_after_it_reaches_them():
    async def scenario() -> None:
        started: list[P2P] = []
        links: list[Links] = []
        try:
            public = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
            started.append(public)
            behind_nat = await P2P.create(no_listen=True)
            started.append(behind_nat)
            got: list[str] = []

            async def on_frame(data: bytes, peer) -> bool:
                got.append(str(peer))
                return True

            sender = await Links.create(public, RUN, on_frame, max_bytes=MAX, timeout=5.0)
            receiver = await Links.create(behind_nat, RUN, on_frame, max_bytes=MAX, timeout=5.0)
            links += [sender, receiver]
            # The public peer has no address for the undialable one and no connection to it: it cannot send.
            # (A connection that goes away is not a stable "before": p2pd dials a known peer again within
            # a quarter of a second, so the test starts from no connection at all.)
            assert not await sender.send(behind_nat.peer_id, frame(public.peer_id), attempts=1)
            assert got == []

            # the node behind NAT learns its in-neighbour's address (in a run: from the DHT) and reaches it
            addrs = [Multiaddr(str(m).split("/p2p/")[0]) for m in await public.get_visible_maddrs()]
            await behind_nat._client.connect(public.peer_id, addrs)
            assert await receiver.reach(public.peer_id)
            assert await sender.send(behind_nat.peer_id, frame(public.peer_id), attempts=1)
            assert got == [str(public.peer_id)]
            assert receiver.hears_from(public.peer_id)
            assert await receiver.reach(public.peer_id)  # a no-op while the link is open
        finally:
            for link in links:
                with contextlib.suppress(Exception):
                    await link.shutdown()
            for p in started:
                with contextlib.suppress(Exception):
                    await p.shutdown()

    asyncio.run(scenario())
