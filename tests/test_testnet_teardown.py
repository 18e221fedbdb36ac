"""`stop_processes` ends what a testnet started, children included, even when a process ignores SIGTERM."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pnode.node.testnet import stop_processes

# a stand-in for a node: ignores SIGTERM (a node stuck under load) and has a child (its p2pd), whose pid it prints
STUBBORN_PARENT = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _start(session: bool) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUBBORN_PARENT], stdout=subprocess.PIPE, text=True, start_new_session=session
    )
    child = int(proc.stdout.readline())
    return proc, child


@pytest.mark.timeout(60)
def test_a_process_that_ignores_sigterm_is_killed_with_its_children_after_the_grace():
    proc, child = _start(session=True)
    try:
        started = time.monotonic()
        stop_processes([proc], grace=1.0)
        assert time.monotonic() - started < 10
        assert proc.returncode is not None
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the child (a node's p2pd) outlived its killed parent"
    finally:
        for pid in (proc.pid, child):
            subprocess.run(["kill", "-9", str(pid)], stderr=subprocess.DEVNULL, check=False)


@pytest.mark.timeout(60)
def test_a_process_in_the_callers_group_is_killed_without_signalling_the_caller():
    proc, child = _start(session=False)  # its pid is no group id: killpg must find nothing, not our group
    try:
        stop_processes([proc], grace=1.0)
        assert proc.returncode is not None
    finally:
        for pid in (proc.pid, child):
            subprocess.run(["kill", "-9", str(pid)], stderr=subprocess.DEVNULL, check=False)


# a stand-in for a node that exits at once on SIGTERM while its child (its p2pd) takes a moment to clean up
POLITE_CHILD = """
import os, signal, sys, time
def clean_up(*_):
    time.sleep(1.0)
    os.remove(sys.argv[1])
    sys.exit(0)
signal.signal(signal.SIGTERM, clean_up)
print("ready", flush=True)
time.sleep(120)
"""
POLITE_PARENT = """
import os, signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
signal.signal(signal.SIGTERM, lambda *_: (child.terminate(), os._exit(0)))
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(60)
def test_the_children_of_a_process_that_exits_in_time_finish_their_own_shutdown(tmp_path):
    marker = tmp_path / "socket"  # what p2pd removes as it exits
    marker.touch()
    proc = subprocess.Popen(
        [sys.executable, "-c", POLITE_PARENT, POLITE_CHILD, str(marker)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    child = int(proc.stdout.readline())
    try:
        stop_processes([proc], grace=10.0)
        assert proc.returncode == 0
        deadline = time.monotonic() + 10
        while marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not marker.exists(), "the child was killed before it finished its shutdown"
    finally:
        subprocess.run(["kill", "-9", str(child)], stderr=subprocess.DEVNULL, check=False)


@pytest.mark.timeout(60)
def test_processes_that_exit_on_sigterm_are_not_waited_for_the_whole_grace():
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(3)]
    started = time.monotonic()
    stop_processes(procs, grace=30.0)
    assert time.monotonic() - started < 15
    assert all(p.returncode == -15 for p in procs)


@pytest.mark.timeout(240)
def test_a_testnet_past_its_deadline_says_where_each_node_stood_and_leaves_no_process(tmp_path, own_processes):
    from p2pnode.node.settings import TestnetSettings
    from p2pnode.node.testnet import run_testnet

    settings = TestnetSettings(nodes=4, epochs=200, batch_size=16, run_id="late", workdir=str(tmp_path), timeout=45)
    with pytest.raises(RuntimeError, match="did not finish within 45 s") as raised:
        run_testnet(settings.validate())
    message = str(raised.value)
    for i in range(4):
        assert f"node {i} in, " in message, message
    assert "round " in message and "/4600" in message, message  # at least one node finished a pass by then
    assert not own_processes(), "a daemon outlived the testnet's teardown"


@pytest.mark.timeout(240)
def test_a_testnet_without_a_workdir_ends_with_its_run_despite_churn_timed_later_and_leaves_no_folder(
    tmp_path, monkeypatch, caplog, own_processes
):
    """An event timed after the run's end waited out --timeout (30 min by default) and then failed; the
    temporary folder of every run without --workdir stayed in /tmp (keys, checkpoints, logs)."""
    import logging
    import tempfile

    from p2pnode.node.settings import TestnetSettings
    from p2pnode.node.testnet import run_testnet

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the run's temporary folder goes here
    settings = TestnetSettings(nodes=2, split="0-4,5-9", epochs=1, run_id="tidy", churn="crash:1@9999s", timeout=150)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="p2pnode.node.testnet"):
        result = run_testnet(settings.validate())
    assert time.monotonic() - started < 120
    assert len(result.results["p2pft"].accuracy) == 2
    assert "the run finished before --churn crash:1@9999s" in caplog.text
    assert result.settings["workdir"] is None and list(tmp_path.iterdir()) == []
    assert not own_processes(), "a daemon outlived the testnet"


@pytest.mark.timeout(60)
def test_a_bootstrap_peer_interrupted_while_it_starts_is_stopped(tmp_path, monkeypatch, own_processes):
    """It runs in its own session, so Ctrl-C does not reach it: stopped before it printed its address,
    it ran on after the testnet had exited."""
    from p2pnode.node import testnet

    def interrupted(proc, timeout):
        time.sleep(1.0)
        raise KeyboardInterrupt

    monkeypatch.setattr(testnet, "read_bootstrap_address", interrupted)
    with pytest.raises(KeyboardInterrupt):
        testnet.start_bootstrap("boot", tmp_path / "bootstrap.log")
    assert not own_processes(), "the bootstrap peer outlived the interrupted start"


def test_a_workdir_that_is_a_file_or_holds_one_where_a_node_folder_goes_is_refused_naming_it(tmp_path):
    from p2pnode.node.errors import BadInput
    from p2pnode.node.testnet import make_workdir

    (tmp_path / "file").write_text("")
    with pytest.raises(BadInput, match=r"cannot use --workdir .*/file/w: .*\(.*/file is a file\)"):
        make_workdir(str(tmp_path / "file" / "w"), 2)
    (tmp_path / "w" / "node1").parent.mkdir()
    (tmp_path / "w" / "node1").write_text("")
    with pytest.raises(BadInput, match=r"\(.*/w/node1 is a file\)"):
        make_workdir(str(tmp_path / "w"), 2)
    assert sorted(p.name for p in make_workdir(str(tmp_path / "fresh"), 2).iterdir()) == ["node0", "node1"]
