"""Session-wide cleanup: end any p2pd daemon or p2pnode process this test session started and left.

Every process the session spawns inherits P2PNODE_TEST_SESSION (children of children too, and
orphans keep it), so the cleanup ends exactly those and never touches another session's daemons.
Sockets under /tmp/hivemind-* are removed only when nothing listens on them any more.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

MARKER = "P2PNODE_TEST_SESSION"


def session_processes(token: str) -> set[int]:
    needle = f"{MARKER}={token}".encode()
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in environ.read_bytes().split(b"\0"):
                found.add(int(environ.parent.name))
        except OSError:
            continue
    return found - {os.getpid()}


def remove_stale_sockets() -> None:
    """Remove hivemind's unix sockets that no process has bound any more (per /proc/net/unix)."""
    bound = set(Path("/proc/net/unix").read_text().split())
    for path in glob.glob("/tmp/hivemind-*.sock"):
        if path not in bound:
            Path(path).unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def no_leftover_daemons():
    token = uuid.uuid4().hex
    os.environ[MARKER] = token
    yield
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = session_processes(token)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = session_processes(token)
        if not left:
            break
    remove_stale_sockets()
