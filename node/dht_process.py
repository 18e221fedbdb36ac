"""Start and stop hivemind's DHT process so that the parent can always exit (use these, not DHT(start=True)/shutdown).

Cause of the exit hang: Ctrl-C or SIGTERM to the process group also ends p2pd, and the DHT child's shutdown then waits
forever for p2pd to confirm removing its handlers, so hivemind falls back to SIGTERM after 3 s. But the child was forked
with the parent's Python SIGTERM handler (hivemind resets only SIGINT), which does nothing there: that SIGTERM and
multiprocessing's at-exit terminate() are lost, and its at-exit join() of the daemon child never returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import weakref
from concurrent.futures import TimeoutError as FutureTimeout
from multiprocessing import util as mp_util
from pathlib import Path

import hivemind

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0  # stop_dht: the child's own bounded shutdown fits in this (1 s + 2 s)
CHILD_NODE_SHUTDOWN_S = 1.0  # in the child: remove handlers and stop the DHT node, normally milliseconds
CHILD_P2PD_SHUTDOWN_S = 2.0  # in the child: then make sure its p2pd is terminated and reaped
KILLED_JOIN_S = 5.0  # a SIGKILLed child is reaped at once; this only bounds the join
P2PD_SOCKETS = Path("/tmp/hivemind-p2pd-*.sock")  # where hivemind puts each p2pd's control socket


def _drop_p2pd_stop_noise(record: logging.LogRecord) -> bool:
    """False for p2pd's "error accepting connection: ... use of closed network connection", which it logs as an
    error when a signal to the process group (Ctrl-C) stops it under the DHT: its listener closed, nothing failed."""
    return "use of closed network connection" not in record.getMessage()


def _parent_stops_me(signum: int, frame: object) -> None:
    """SIGTERM in a DHT child whose parent handles SIGTERM: the parent stops the child when it is done with it."""


class _ChildSafeDHT(hivemind.DHT):
    """A hivemind.DHT whose child process drops the parent's signal handlers and shuts down in bounded time."""

    def run(self) -> None:  # in the child, whose only thread is now its main thread
        signal.set_wakeup_fd(-1)  # the parent's event loop's wakeup fd: a signal here must not wake the parent
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as hivemind does a moment later, before p2pd starts
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            # The inherited handler would act on the child's copies of the parent's objects. The parent handles
            # SIGTERM and may still use the DHT afterwards (`start` announces that it left), so the child ignores
            # it, with a Python-level handler so that p2pd, exec'd from here, still starts with SIGTERM default.
            signal.signal(signal.SIGTERM, _parent_stops_me)
        logging.getLogger("hivemind.p2p.p2p_daemon").addFilter(_drop_p2pd_stop_noise)  # p2pd's lines come out here
        super().run()

    async def _shutdown(self) -> None:
        """Stop the DHT node; if p2pd is gone and does not answer, terminate p2pd instead of waiting forever."""
        try:
            await asyncio.wait_for(self._node.shutdown(), CHILD_NODE_SHUTDOWN_S)
        except Exception as e:  # asyncio.TimeoutError, or p2pd errors
            logger.debug("DHT node shutdown failed (%s: %s); stopping p2pd", type(e).__name__, e)
            if getattr(self._node, "_should_shutdown_p2p", True):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._node.p2p.shutdown(), CHILD_P2PD_SHUTDOWN_S)

    def start(self) -> None:
        super().start()
        # at exit, stop it before multiprocessing's exit function SIGTERMs (ignored, see above) and joins its children
        mp_util.Finalize(self, _stop_at_exit, args=(weakref.ref(self),), exitpriority=10)

    def shutdown(self) -> None:
        """hivemind's DHT.shutdown, made safe: see stop_dht."""
        stop_dht(self)


def start_dht(**dht_kwargs) -> hivemind.DHT:
    """Create and start a hivemind.DHT (any thread; same keyword arguments) whose process can always be stopped.

    Unlike hivemind.DHT(start=True), it raises instead of waiting forever if the child dies while starting, and
    it registers stop_dht to run at exit before multiprocessing joins its children. Stop it with stop_dht.
    """
    start = dht_kwargs.pop("start", True)
    await_ready = dht_kwargs.pop("await_ready", True)
    dht = _ChildSafeDHT(start=False, **dht_kwargs)
    if not start:
        return dht
    sockets_before = _p2pd_sockets()
    dht.start()
    if await_ready:
        try:
            _wait_until_ready(dht)
        except BaseException:
            stop_dht(dht)
            _remove_dead_sockets(_p2pd_sockets() - sockets_before)
            raise
    return dht


def _p2pd_sockets() -> set[Path]:
    return set(P2PD_SOCKETS.parent.glob(P2PD_SOCKETS.name))


def _remove_dead_sockets(paths: set[Path]) -> None:
    """Unlink those of `paths` no process listens on: a p2pd that fails to start (no bootstrap peer reached)
    exits without removing its control socket, and every failed `status` or `start` left one in /tmp."""
    for path in paths:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                path.unlink(missing_ok=True)
            except OSError:  # gone already, or not a socket
                pass


def _wait_until_ready(dht: hivemind.DHT) -> None:
    while True:
        try:
            dht.wait_until_ready(timeout=1.0)
            return
        except FutureTimeout:
            if dht._ready.done():  # the child's own startup error (it may be a TimeoutError)
                raise
            if not dht.is_alive():
                raise RuntimeError(f"the DHT process exited while starting (exit code {dht.exitcode})") from None


def _stop_at_exit(ref: weakref.ref) -> None:
    dht = ref()
    if dht is not None:
        stop_dht(dht)


def stop_dht(dht: hivemind.DHT, timeout: float = STOP_TIMEOUT_S) -> None:
    """Shut the DHT process down; if it is still alive after `timeout` s, SIGKILL it and its p2pd, and reap it.

    Always returns within about `timeout` + 5 s. Idempotent; works on a plain hivemind.DHT too. Call it from the
    process that created the DHT, from any thread.
    """
    if dht.pid is None or dht.pid == os.getpid():  # never started, or called inside the child
        return
    if dht.is_alive():
        with contextlib.suppress(OSError, ValueError):  # ValueError: the pipe is already closed
            dht._outer_pipe.send(("_shutdown", [], {}))
        dht.join(timeout)
    if dht.is_alive():
        logger.warning("DHT process %d did not stop within %.0f s; killing it and its p2pd", dht.pid, timeout)
        for pid in [*_descendants(dht.pid), dht.pid]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        dht.join(KILLED_JOIN_S)
    with contextlib.suppress(OSError):
        dht._outer_pipe.close()


def _descendants(pid: int) -> list[int]:
    """Live descendants of `pid` (its p2pd), from /proc; empty where there is no /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
