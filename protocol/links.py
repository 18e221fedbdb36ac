"""Directed links over hivemind's P2P layer, with per-peer limits on what a sender may cost (DESIGN §9).

Each link is one long-lived binary stream carrying frames: an 8-byte big-endian length, the packed
envelope, and a one-byte answer from the receiver (1 = accepted, 0 = rejected). Streams avoid the
4 MiB cap of unary calls, whose oversized responses hang the caller (DESIGN §6); keeping the stream
open saves the per-message stream negotiation (measured on loopback: 0.6 ms instead of 4.1 ms for a
140 kB frame). Sends to one destination are serialised, so each link delivers in order; every call has
a timeout; a broken stream is reopened. The handler name carries the run id, so runs do not mix.

hivemind's p2pd gives every peer unlimited streams and bytes, so the receiving side enforces its own
limits (`PeerLimits`): a banned or non-admitted peer's stream is closed before a byte is read; a peer
keeps a few in-streams at most; a length header over `max_bytes` is refused unread; a frame must
arrive within a deadline that grows with its size, and an idle in-stream is closed; frames being read
or handled share a byte budget (in all and per peer). Breaking a limit is a strike; `strikes` strikes
within `strike_window_s` ban the peer for the run. `counters()` reports all of it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hivemind.p2p import P2P, PeerID

if TYPE_CHECKING:
    from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

logger = logging.getLogger(__name__)

ACCEPTED, REJECTED = b"\x01", b"\x00"
HEADER_LEN = 8
ADMIT_WAIT_S = 10.0  # the longest an admission check may take (a new member's record may be a poll away)
MAX_NOTED = 1024  # non-admitted peers logged (once each) up to this many
MAX_CHECKING = 256  # new in-streams waiting for their admission check, all peers together

# (payload, sender's authenticated peer id) -> accepted?
FrameHandler = Callable[[bytes, PeerID], Awaitable[bool]]
# sender's authenticated peer id -> may it open a stream? Checked before anything is read; an async check may take
# a moment (e.g. to read the DHT), at most ADMIT_WAIT_S, and nothing is read meanwhile.
Admit = Callable[[PeerID], Awaitable[bool] | bool]


async def ask_admit(admit: Admit, peer: PeerID) -> bool:
    """`admit(peer)`, awaited when it returns an awaitable (a coroutine is truthy: never test one unawaited)."""
    verdict = admit(peer)
    return bool(await verdict if inspect.isawaitable(verdict) else verdict)


def handler_name(run_id: str) -> str:
    return f"p2pnode.{run_id}.link"


def hello_name(run_id: str) -> str:
    """The handler a node opens to reach a peer that must send to it (`Links.reach`)."""
    return f"p2pnode.{run_id}.hello"


def short(peer: PeerID) -> str:
    return str(peer)[-8:]


@dataclass(frozen=True)
class PeerLimits:
    """What one peer may cost this node. None takes a default from the link's max_bytes and timeout."""

    streams_per_peer: int = 4  # open in-streams per peer: an honest sender keeps one, a retry briefly two
    frame_floor_s: float = 10.0  # a frame may take this long to arrive ...
    min_rate: float = 256 * 1024  # ... plus its size at this many bytes a second (2 Mbit/s)
    idle_s: float | None = None  # an in-stream silent this long is closed (default 10 x the link timeout)
    buffer_bytes: int | None = None  # frames being read or handled at once, all peers (default 4 x max_bytes)
    peer_bytes: int | None = None  # the same for one peer (default max_bytes: one frame at a time)
    budget_wait_s: float = 10.0  # a frame waits this long for room in the budget, then is refused
    strikes: int = 5  # broken limits within strike_window_s that ban a peer for the run
    strike_window_s: float = 600.0


class ByteBudget:
    """Bytes of frames being read or handled, in all and per peer; a frame waits until it fits."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.total, self.per_peer = total, per_peer
        self.used = self.peak = 0
        self.by_peer: dict[PeerID, int] = {}
        self._freed = asyncio.Event()

    def _fits(self, peer: PeerID, n: int) -> bool:
        return self.used + n <= self.total and self.by_peer.get(peer, 0) + n <= self.per_peer

    async def acquire(self, peer: PeerID, n: int, timeout: float) -> bool:
        """Reserve n bytes for `peer`; False if they do not fit within `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._fits(peer, n):
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._freed.wait(), left)
            except asyncio.TimeoutError:
                return False
        self.used += n
        self.by_peer[peer] = self.by_peer.get(peer, 0) + n
        self.peak = max(self.peak, self.used)
        return True

    def release(self, peer: PeerID, n: int) -> None:
        self.used -= n
        left = self.by_peer.pop(peer) - n
        if left:
            self.by_peer[peer] = left
        self._freed.set()  # wake every waiter; those that still do not fit wait on the fresh event
        self._freed = asyncio.Event()


class Links:
    def __init__(
        self,
        p2p: P2P,
        run_id: str,
        on_frame: FrameHandler,
        max_bytes: int,
        timeout: float,
        admit: Admit | None = None,
        limits: PeerLimits | None = None,
    ) -> None:
        self.p2p, self.run_id, self.on_frame = p2p, run_id, on_frame
        self.max_bytes, self.timeout, self.admit = max_bytes, timeout, admit
        self.limits = limits = limits or PeerLimits()
        self.idle_s = limits.idle_s if limits.idle_s is not None else 10 * timeout
        per_peer = max(limits.peer_bytes or max_bytes, max_bytes)
        self.budget = ByteBudget(max(limits.buffer_bytes or 4 * max_bytes, per_peer), per_peer)
        self._locks: dict[PeerID, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._streams: dict[PeerID, tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self._in: dict[PeerID, set[asyncio.StreamWriter]] = {}  # open in-streams of admitted peers
        self._strikes: dict[PeerID, deque[float]] = {}
        self._noted: set[PeerID] = set()
        self._checking: Counter[PeerID] = Counter()  # in-streams waiting for their admission check, per peer
        self.banned: dict[PeerID, str] = {}  # peer -> the reason of its last strike
        self.refused: Counter[str] = Counter()  # streams and frames refused by the link layer, by limit
        self.peak_streams = 0  # most in-streams one peer had open at once
        self.bytes_sent = 0
        self.frames_sent = 0
        self.rejected = 0  # frames answered "rejected", for whatever reason

    @classmethod
    async def create(
        cls,
        p2p: P2P,
        run_id: str,
        on_frame: FrameHandler,
        *,
        max_bytes: int,
        timeout: float = 30.0,
        admit: Admit | None = None,
        limits: PeerLimits | None = None,
    ) -> Links:
        """Serve this run's link handler. `max_bytes` bounds a frame (`envelope.max_frame_bytes`);
        `admit(peer_id)` runs before a byte of a new in-stream is read: False closes it (None admits all)."""
        self = cls(p2p, run_id, on_frame, max_bytes, timeout, admit, limits)
        await p2p.add_binary_stream_handler(handler_name(run_id), self._handle)
        await p2p.add_binary_stream_handler(hello_name(run_id), _close_at_once)
        return self

    # --- reaching in-neighbours ------------------------------------------------------------------

    def hears_from(self, peer: PeerID) -> bool:
        """Whether `peer` has an in-link open to this node now."""
        return bool(self._in.get(peer))

    async def reach(self, peer: PeerID, timeout: float = 10.0) -> bool:
        """Open a connection to `peer` (a short stream to its hello handler), so that it can open its
        link to this node over it: behind a NAT nobody can dial this node, but libp2p carries streams
        in both directions over a connection either side opened (DESIGN §11). No-op while `peer` has a
        link open here. False if `peer` could not be reached."""
        if self.hears_from(peer):
            return True
        try:
            _, _, writer = await asyncio.wait_for(
                self.p2p.call_binary_stream_handler(peer, hello_name(self.run_id)), timeout
            )
            writer.close()
            return True
        except Exception as e:  # unreachable now: the next silent round tries again
            logger.info("could not reach in-neighbour %s: %s", short(peer), type(e).__name__)
            return False

    # --- sending ---------------------------------------------------------------------------------

    async def send(self, peer: PeerID, data: bytes, attempts: int = 3) -> bool:
        """Deliver one frame; False if the peer is unreachable, too slow, or rejected it.

        A stream can break in transit (p2pd resets it now and then; the receiver closes idle ones); the
        frame is then sent again, up to `attempts` times. A frame that did arrive twice is harmless: the
        receiver acknowledges a repeat without using it."""
        error = ""
        async with self._locks[peer]:
            for attempt in range(attempts):
                try:
                    return await asyncio.wait_for(self._send(peer, data), self.timeout)
                except asyncio.CancelledError:
                    self._close(peer)  # a frame may be half written: the stream cannot carry another
                    raise
                except (asyncio.TimeoutError, OSError, ConnectionError, asyncio.IncompleteReadError) as e:
                    error = type(e).__name__
                except Exception as e:  # p2pd control errors surface as assorted types
                    error = f"{type(e).__name__}: {e}"
                self._close(peer)
                if attempt + 1 < attempts:
                    logger.info("send to %s failed (%s), retrying", short(peer), error)
                    await asyncio.sleep(0.1 * 2**attempt)
        logger.warning("send to %s failed %d times: %s", short(peer), attempts, error)
        return False

    async def _send(self, peer: PeerID, data: bytes) -> bool:
        stream = self._streams.get(peer)
        if stream is not None and stream[0].at_eof():
            self._close(peer)  # the receiver closed it (idle, or its limits): open another
        if peer not in self._streams:
            _, reader, writer = await self.p2p.call_binary_stream_handler(peer, handler_name(self.run_id))
            self._streams[peer] = (reader, writer)
        reader, writer = self._streams[peer]
        writer.write(len(data).to_bytes(HEADER_LEN, "big"))
        view = memoryview(data)
        for offset in range(0, len(view), 1 << 16):
            writer.write(view[offset : offset + (1 << 16)])
            await writer.drain()
        answer = await reader.readexactly(1)
        self.bytes_sent += len(data) + HEADER_LEN
        self.frames_sent += 1
        if answer != ACCEPTED:
            logger.warning("peer %s rejected a message (see its log for the reason)", short(peer))
        return answer == ACCEPTED

    def _close(self, peer: PeerID) -> None:
        stream = self._streams.pop(peer, None)
        if stream is not None:
            stream[1].close()

    # --- limits ----------------------------------------------------------------------------------

    def strike(self, peer: PeerID, reason: str) -> None:
        """Count one broken limit; the `strikes`-th within the window bans `peer` for the run."""
        if peer in self.banned:
            return
        times = self._strikes.setdefault(peer, deque(maxlen=self.limits.strikes))
        times.append(time.monotonic())
        logger.warning("peer %s broke a limit (strike %d): %s", short(peer), len(times), reason)
        if len(times) == times.maxlen and times[-1] - times[0] <= self.limits.strike_window_s:
            self._ban(peer, reason)

    def _ban(self, peer: PeerID, reason: str) -> None:
        self.banned[peer] = reason
        self._strikes.pop(peer, None)
        logger.warning("banned peer %s for the run: %s", short(peer), reason)
        for writer in self._in.pop(peer, set()):
            writer.close()

    def counters(self) -> dict[str, int]:
        """For the daemon's report: streams and frames refused by each limit, banned peers, peaks."""
        return {
            **{f"refused_{key.replace(' ', '_')}": n for key, n in sorted(self.refused.items())},
            "refused_total": sum(self.refused.values()),
            "rejected_frames": self.rejected,
            "banned_peers": len(self.banned),
            "peak_streams_per_peer": self.peak_streams,
            "peak_buffered_bytes": self.budget.peak,
        }

    async def _admitted(self, peer: PeerID) -> bool:
        """`admit(peer)`, counted and logged; a flood of new streams must not become a flood of checks."""
        if self.admit is None:
            return True
        if self._checking[peer] >= self.limits.streams_per_peer or self._checking.total() >= MAX_CHECKING:
            self.refused["admission busy"] += 1
            return False
        self._checking[peer] += 1
        try:
            ok = await asyncio.wait_for(ask_admit(self.admit, peer), ADMIT_WAIT_S)
        except asyncio.TimeoutError:
            ok = False
        except Exception:
            logger.exception("the admission check failed for %s", short(peer))
            ok = False
        finally:
            self._checking[peer] -= 1
            if not self._checking[peer]:
                del self._checking[peer]
        if not ok:
            self.refused["not admitted"] += 1
            if peer not in self._noted and len(self._noted) < MAX_NOTED:
                self._noted.add(peer)
                logger.warning("closed a stream from %s before reading it: not admitted to this run", short(peer))
        return ok

    async def _open(self, peer: PeerID, writer: asyncio.StreamWriter) -> bool:
        """Whether a new in-stream may be read at all; registers it if so.

        Refusing admission is not a strike: the daemon learns of new members from the DHT a little late,
        and an honest joiner that retries would be banned for the run; a stream closed unread costs nothing.
        A peer with a stream open now was admitted already: its extra streams go straight to the limit."""
        if peer in self.banned:
            self.refused["banned"] += 1
            return False
        if peer not in self._in and not await self._admitted(peer):
            return False
        if peer in self.banned:  # banned while its admission was being checked
            self.refused["banned"] += 1
            return False
        streams = self._in.setdefault(peer, set())
        if len(streams) >= self.limits.streams_per_peer:
            self.refused["streams"] += 1
            self.strike(peer, f"more than {self.limits.streams_per_peer} streams open at once")
            return False
        streams.add(writer)
        self.peak_streams = max(self.peak_streams, len(streams))
        return True

    def _closed(self, peer: PeerID, writer: asyncio.StreamWriter) -> None:
        streams = self._in.get(peer)
        if streams is not None:
            streams.discard(writer)
            if not streams:
                del self._in[peer]
        writer.close()

    def _cut(self, peer: PeerID, limit: str, reason: str) -> bool:
        """A frame broke `limit`: count it, strike the peer, end the stream."""
        self.refused[limit] += 1
        self.strike(peer, reason)
        return False

    # --- receiving -------------------------------------------------------------------------------

    async def _handle(self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one in-link: frames in order until the sender closes it or a limit ends it."""
        peer = info.peer_id
        if not await self._open(peer, writer):
            writer.close()
            return
        try:
            while await self._serve_frame(peer, reader, writer):
                pass
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            logger.info("link from %s broke: %s", short(peer), type(e).__name__)
        finally:
            self._closed(peer, writer)

    async def _serve_frame(self, peer: PeerID, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read, hand over and answer one frame; False when the stream is to end."""
        try:
            first = await asyncio.wait_for(reader.readexactly(1), self.idle_s)
        except asyncio.IncompleteReadError:
            return False  # the sender closed the link
        except asyncio.TimeoutError:
            self.refused["idle"] += 1
            logger.info("closed the link from %s: idle for %.0f s", short(peer), self.idle_s)
            return False
        floor = self.limits.frame_floor_s
        try:
            rest = await asyncio.wait_for(reader.readexactly(HEADER_LEN - 1), floor)
        except asyncio.TimeoutError:
            return self._cut(peer, "deadline", f"a frame header took over {floor:.0f} s")
        size = int.from_bytes(first + rest, "big")
        if size > self.max_bytes:
            await self._answer(writer, False)
            return self._cut(peer, "size", f"a {size}-byte frame is over the {self.max_bytes}-byte limit")
        if not await self.budget.acquire(peer, size, self.limits.budget_wait_s):
            self.refused["buffer"] += 1  # this node is busy: not the sender's fault
            logger.warning("closed the link from %s: no room for a %d-byte frame", short(peer), size)
            await self._answer(writer, False)
            return False
        try:
            data = await self._read_payload(reader, size)
            if data is None:
                return self._cut(peer, "deadline", f"a {size}-byte frame took over {self._deadline(size):.0f} s")
            ok = await self._deliver(data, peer)
        finally:
            self.budget.release(peer, size)
        await self._answer(writer, ok)
        return True

    def _deadline(self, size: int) -> float:
        return self.limits.frame_floor_s + size / self.limits.min_rate

    async def _read_payload(self, reader: asyncio.StreamReader, size: int) -> bytes | None:
        """The frame's payload, or None if it did not arrive within its deadline (a trickling sender)."""
        try:
            return await asyncio.wait_for(reader.readexactly(size), self._deadline(size))
        except asyncio.TimeoutError:
            return None

    async def _deliver(self, data: bytes, peer: PeerID) -> bool:
        try:
            ok = await self.on_frame(data, peer)
        except Exception:  # a message must never take the daemon down
            logger.exception("error while handling a message from %s", short(peer))
            ok = False
        return ok

    async def _answer(self, writer: asyncio.StreamWriter, ok: bool) -> None:
        self.rejected += not ok
        writer.write(ACCEPTED if ok else REJECTED)
        await writer.drain()

    async def shutdown(self) -> None:
        for peer in list(self._streams):
            self._close(peer)
        for writers in list(self._in.values()):
            for writer in list(writers):
                writer.close()
        try:
            await self.p2p.remove_binary_stream_handler(handler_name(self.run_id))
            await self.p2p.remove_binary_stream_handler(hello_name(self.run_id))
        except Exception as e:
            logger.debug("removing the link handler failed: %s", e)


async def _close_at_once(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()  # the stream's only use was to open the connection it rode on
