"""Parameter download for joiners: a donor serves its trainable parameters over one binary stream.

Wire format (every frame is an 8-byte big-endian length and that many bytes):
  joiner -> donor: msgpack {"v": 1, "run": RUN_ID}
  donor -> joiner: msgpack {"v": 1, "round": R, "numel": N, "dtype": "float32", "chunks": C}, then C frames of
                   raw little-endian float32 values (at most CHUNK_BYTES each), N values in all.
The joiner checks every length against what its own model expects before reading, with a deadline
per chunk and one for the whole transfer, and falls back to the next donor on any failure (DESIGN §8:
hivemind's load_state_from_peers hangs on a stalled donor, so it is not used).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgpack
import numpy as np
import torch
from hivemind.p2p import P2P, PeerID

from .links import Admit, ask_admit

if TYPE_CHECKING:
    from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
HEADER_LEN = 8
MAX_CONTROL_BYTES = 4096

# () -> (round, flat float tensor): the donor's current parameters
Snapshot = Callable[[], Awaitable[tuple[int, torch.Tensor]]]


class TransferError(Exception):
    """A download that failed (one line)."""


@dataclass
class Download:
    round: int
    params: torch.Tensor
    donor: str


def handler_name(run_id: str) -> str:
    return f"p2pnode.{run_id}.state"


async def _write_frame(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(len(data).to_bytes(HEADER_LEN, "big") + data)
    await writer.drain()


async def _read_frame(reader: asyncio.StreamReader, limit: int, timeout: float) -> bytes:
    size = int.from_bytes(await asyncio.wait_for(reader.readexactly(HEADER_LEN), timeout), "big")
    if size > limit:
        raise TransferError(f"a {size}-byte frame is over the {limit}-byte limit")
    return await asyncio.wait_for(reader.readexactly(size), timeout)


async def serve_state(
    p2p: P2P,
    run_id: str,
    snapshot: Snapshot,
    timeout: float = 30.0,
    admit: Admit | None = None,
) -> None:
    """Register the donor side: every request gets the parameters as they are at that moment.
    `admit(peer)` (or what it returns, awaited) False: the stream is closed before anything is read from it."""

    async def handle(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(info.peer_id)[-8:]
        try:
            if admit is not None and not await ask_admit(admit, info.peer_id):
                logger.warning("refused a parameter request from %s: not a member of run %s", peer, run_id)
                return
            request = msgpack.unpackb(await _read_frame(reader, MAX_CONTROL_BYTES, timeout))
            if not isinstance(request, dict) or request.get("run") != run_id:
                logger.warning("refused a parameter request from %s: not for run %s", peer, run_id)
                return
            round_, params = await snapshot()
            data = params.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes()
            chunks = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
            header = {"v": 1, "round": round_, "numel": params.numel(), "dtype": "float32", "chunks": len(chunks)}
            await _write_frame(writer, msgpack.packb(header))
            for chunk in chunks:
                await asyncio.wait_for(_write_frame(writer, chunk), timeout)
            logger.info("sent parameters of round %d to joiner %s", round_, peer)
        except (TransferError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            logger.warning("parameter transfer to %s failed: %s", peer, type(e).__name__)
        except Exception as e:  # a joiner's bad request must never take the donor down
            logger.warning("parameter transfer to %s failed: %s: %s", peer, type(e).__name__, e)
        finally:
            writer.close()

    await p2p.add_binary_stream_handler(handler_name(run_id), handle)


async def _fetch_one(p2p: P2P, run_id: str, donor: PeerID, numel: int, chunk_timeout: float) -> Download:
    _, reader, writer = await asyncio.wait_for(
        p2p.call_binary_stream_handler(donor, handler_name(run_id)), chunk_timeout
    )
    try:
        await _write_frame(writer, msgpack.packb({"v": 1, "run": run_id}))
        header = msgpack.unpackb(await _read_frame(reader, MAX_CONTROL_BYTES, chunk_timeout))
        if not isinstance(header, dict) or header.get("numel") != numel or header.get("dtype") != "float32":
            raise TransferError(
                f"the donor offers {header.get('numel') if isinstance(header, dict) else '?'} values, "
                f"this model has {numel}"
            )
        chunks = int(header.get("chunks", 0))
        if not 1 <= chunks <= numel * 4 // CHUNK_BYTES + 1:
            raise TransferError(f"bad chunk count {chunks}")
        data = bytearray()
        for _ in range(chunks):
            data += await _read_frame(reader, CHUNK_BYTES, chunk_timeout)
        if len(data) != numel * 4:
            raise TransferError(f"received {len(data)} bytes, expected {numel * 4}")
        params = torch.from_numpy(np.frombuffer(bytes(data), dtype="<f4").copy())
        if not torch.isfinite(params).all():
            raise TransferError("the donor's parameters are not all finite")
        return Download(int(header["round"]), params, str(donor))
    finally:
        writer.close()


async def fetch_state(
    p2p: P2P,
    run_id: str,
    donors: Sequence[str],
    numel: int,
    chunk_timeout: float = 20.0,
    total_timeout: float = 120.0,
) -> Download:
    """Download the parameters from the first donor that delivers them; TransferError if none does."""
    errors = []
    for donor in donors:
        try:
            return await asyncio.wait_for(
                _fetch_one(p2p, run_id, PeerID.from_base58(donor), numel, chunk_timeout), total_timeout
            )
        except asyncio.TimeoutError:
            errors.append(f"{donor[-8:]}: timed out")
        except TransferError as e:
            errors.append(f"{donor[-8:]}: {e}")
        except Exception as e:  # p2pd errors come in assorted types
            errors.append(f"{donor[-8:]}: {type(e).__name__}: {e}")
        logger.warning("download from donor %s failed, trying the next one", errors[-1])
    raise TransferError("no donor delivered the parameters (" + "; ".join(errors or ["no donors"]) + ")")
