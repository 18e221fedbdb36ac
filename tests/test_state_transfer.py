"""The joiner's parameter download (protocol/transfer.py) over two real P2P daemons on 127.0.0.1: the donor
serves only the peers its admission check admits, whether that check is a plain or an async function (the
daemon's is async: a coroutine is truthy, so one left unawaited would admit everyone)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
from hivemind.p2p import P2P

from p2pnode.protocol.transfer import TransferError, fetch_state, serve_state

RUN = "transfer"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
PARAMS = torch.linspace(-1.0, 1.0, 3000)


async def _download(admit) -> tuple[torch.Tensor | None, list[str], int]:
    """Serve PARAMS from a donor with `admit`; return what a joiner downloads (None if refused), the peers
    `admit` was asked about, and how many snapshots the donor took."""
    asked: list[str] = []
    snapshots = 0

    async def snapshot() -> tuple[int, torch.Tensor]:
        nonlocal snapshots
        snapshots += 1
        return 7, PARAMS

    def recording(peer):
        asked.append(str(peer))
        return admit(peer)

    donor = joiner = None
    try:
        donor = await P2P.create(host_maddrs=LOOPBACK)
        joiner = await P2P.create(host_maddrs=LOOPBACK, initial_peers=await donor.get_visible_maddrs())
        await serve_state(donor, RUN, snapshot, timeout=5.0, admit=recording)
        try:
            got = await fetch_state(joiner, RUN, [str(donor.peer_id)], PARAMS.numel(), chunk_timeout=5.0)
        except TransferError:
            return None, asked, snapshots
        assert got.round == 7 and got.donor == str(donor.peer_id)
        return got.params, asked, snapshots
    finally:
        for p in (joiner, donor):
            if p is not None:
                with contextlib.suppress(Exception):
                    await p.shutdown()


@pytest.mark.timeout(90)
def test_an_async_admission_check_that_says_no_refuses_the_download():
    async def refuse(peer) -> bool:
        await asyncio.sleep(0)
        return False

    params, asked, snapshots = asyncio.run(_download(refuse))
    assert asked, "the donor never asked its admission check"
    assert params is None and snapshots == 0  # refused before the parameters were even read


@pytest.mark.timeout(90)
def test_a_plain_admission_check_that_says_no_refuses_the_download():
    params, asked, snapshots = asyncio.run(_download(lambda peer: False))
    assert asked and params is None and snapshots == 0


@pytest.mark.timeout(90)
def test_an_admitted_joiner_downloads_the_donors_parameters_exactly():
    async def welcome(peer) -> bool:
        return True

    params, asked, snapshots = asyncio.run(_download(welcome))
    assert asked
    assert snapshots == 1 and params is not None
    assert torch.equal(params, PARAMS)


@pytest.mark.timeout(90)
def test_an_admission_check_that_raises_refuses_without_taking_the_donor_down():
    async def broken(peer) -> bool:
        raise RuntimeError("membership unavailable")

    params, asked, snapshots = asyncio.run(_download(broken))
    assert asked and params is None and snapshots == 0
