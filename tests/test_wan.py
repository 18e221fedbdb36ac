"""`p2pnode testnet --hosts netns`: a run over an emulated internet (DESIGN §11).

Each peer on its own namespaced host with shaped links; a node behind a masquerading home router
(nobody can dial it) must still be a full member, and 2% packet loss on every link must not cost
accuracy. The daemons' P2P-FT is the simulator's computation when every message arrives, so the
simulator's run of the same settings is the clean run. Skipped where namespaces cannot be made;
the bad-flag tests run everywhere.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pnode.cli.app import main
from p2pnode.node.netlab import list_netns, netlab_available
from p2pnode.node.settings import TestnetSettings
from p2pnode.node.simulator import Simulation
from p2pnode.node.testnet import run_testnet

AVAILABLE, WHY = netlab_available(nft=True, tc=True)
needs_netns = pytest.mark.skipif(not AVAILABLE, reason=f"no network namespaces here: {WHY}")


def short_run(tmp_path: Path, **network) -> TestnetSettings:
    # the default codec (int8): these 230 rounds take about 10 s, so a node whose first dials are lost to the
    # 2% loss and that is dropped for it would miss most of the run (seen once in CI before senders retried
    # within 1-8 s and receivers reached late in-neighbours: 66% against 80%).
    # vit_digits_4px at its lr: the default vit_digits is still climbing steeply at 10 epochs (81%), where a
    # round or two late from the loss moves the end by points; the former default has flattened out by then.
    # A round deadline of 15 s (the default is 60): with 5 s a first link whose dials lost packets (TCP's SYN
    # is resent after 1, 3 and 7 s) came up after round 0's deadline in CI, node 0 mixed that round without
    # its in-neighbour, and the run, no longer the clean computation, ended 1.1 points off (79.2 against 80.3)
    return TestnetSettings(
        epochs=10,
        model="vit_digits_4px",
        lr=0.005,
        round_timeout=15.0,
        timeout=400.0,
        hosts="netns",
        rate="50mbit",
        workdir=str(tmp_path),
        **network,
    ).validate()


def clean_accuracy(settings: TestnetSettings) -> list[float]:
    return Simulation(settings).run(settings.algorithm).accuracy


def leftover_testnet_namespaces() -> list[str]:
    return [n for n in list_netns() if n.startswith("p2pnlab-testnet-")]


@needs_netns
@pytest.mark.timeout(400)
def test_a_node_behind_nat_completes_the_run_as_a_full_member(tmp_path):
    settings = short_run(tmp_path, nat=1)
    result = run_testnet(settings).results["p2pft"]

    node0 = json.loads((tmp_path / "node0" / "result.json").read_text())
    node3 = json.loads((tmp_path / "node3" / "result.json").read_text())
    # node 0 sits behind NAT; in the directed ring its only in-neighbour is node 3, which cannot dial it
    heard_rounds = node0["contributions"][node3["peer_id"]][0]
    assert heard_rounds == node0["rounds"], f"node 0 heard node 3 in {heard_rounds} of {node0['rounds']} rounds"
    clean = clean_accuracy(settings)
    for got, want in zip(result.accuracy, clean, strict=True):
        assert abs(got - want) <= 0.01, f"accuracies {result.accuracy} against the clean run's {clean}"
    assert not leftover_testnet_namespaces(), "the testnet left namespaces behind"


@needs_netns
@pytest.mark.timeout(400)
def test_two_percent_loss_on_every_link_ends_within_a_point_of_the_clean_run(tmp_path):
    settings = short_run(tmp_path, loss=2.0)
    result = run_testnet(settings).results["p2pft"]
    clean = clean_accuracy(settings)
    assert len(result.accuracy) == settings.nodes
    for got, want in zip(result.accuracy, clean, strict=True):
        assert abs(got - want) <= 0.01, f"accuracies {result.accuracy} against the clean run's {clean}"
    assert not leftover_testnet_namespaces(), "the testnet left namespaces behind"


def processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


@needs_netns
@pytest.mark.timeout(240)
def test_a_testnet_ended_by_sigterm_removes_its_namespaces_and_processes(tmp_path):
    argv = [sys.executable, "-m", "p2pnode.cli.app", "testnet", "--hosts", "netns", "--nat", "1", "--loss", "1"]
    proc = subprocess.Popen(
        [*argv, "--epochs", "40", "--workdir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    prefix = f"p2pnlab-testnet-{proc.pid}-"
    try:
        deadline = time.monotonic() + 150
        while not all((tmp_path / f"node{i}" / "events.jsonl").exists() for i in range(4)):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the nodes did not start"
            time.sleep(0.5)
        built = [n for n in list_netns() if n.startswith(prefix)]
        assert len(built) == 7, built  # switch, bootstrap, NAT router, 4 nodes
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not [n for n in list_netns() if n.startswith(prefix)], "namespaces left behind"
    assert not processes_mentioning(str(tmp_path)), "node processes left behind"


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--rate", "50mbit"], "add --hosts netns"),
        (["--nat", "1"], "add --hosts netns"),
        (["--hosts", "docker"], "unknown --hosts"),
        (["--hosts", "netns", "--rate", "fast"], "bad --rate"),
        (["--hosts", "netns", "--loss", "100"], "--loss is a percentage"),
        (["--hosts", "netns", "--nat", "5"], "--nat must be between 0 and --nodes 4"),
    ],
)
def test_bad_network_flags_are_one_line_errors_with_exit_code_2(flags, says, capsys):
    assert main(["testnet", "--epochs", "1", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


def test_netns_without_root_says_so_in_one_line_with_exit_code_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert main(["testnet", "--epochs", "1", "--hosts", "netns", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not root" in err and "--hosts loopback" in err and len(err.splitlines()) == 1, err
