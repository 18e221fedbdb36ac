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


OURS = (b"hivemind_cli/p2pd", b"p2pnode.cli.app")  # never others: torch's shm manager must outlive pytest


def session_processes(token: str) -> set[int]:
    """p2pd daemons and p2pnode processes started by this session (found by the inherited marker)."""
    needle = f"{MARKER}={token}".encode()
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle not in environ.read_bytes().split(b"\0"):
                continue
            cmdline = (environ.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if any(name in cmdline for name in OURS):
            found.add(int(environ.parent.name))
    return found - {os.getpid()}


def bound_unix_sockets() -> set[str]:
    """Paths of the unix sockets bound in any network namespace a live process is in: /proc/net/unix lists
    only this process's namespace, and the multi-host tests run daemons in namespaces of their own."""
    bound, namespaces = set(), set()
    for ns in Path("/proc").glob("[0-9]*/ns/net"):
        try:
            namespace = os.readlink(ns)
            if namespace in namespaces:
                continue
            bound |= set((ns.parent.parent / "net" / "unix").read_text().split())
            namespaces.add(namespace)
        except OSError:
            continue
    return bound


def remove_stale_sockets() -> None:
    """Remove hivemind's unix sockets that no process has bound any more, in any network namespace."""
    bound = bound_unix_sockets()
    for path in glob.glob("/tmp/hivemind-*.sock"):
        if path not in bound:
            Path(path).unlink(missing_ok=True)


@pytest.fixture
def own_processes():
    """A callable listing the live processes this test session started (daemons included)."""
    token = os.environ[MARKER]

    def live() -> set[int]:
        return {pid for pid in session_processes(token) if not _is_zombie(pid)}

    return live


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


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
