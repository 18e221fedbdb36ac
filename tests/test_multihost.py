"""Runs across namespaced hosts (DESIGN §11): a node killed for good, and a partition that heals.

A bootstrap peer and four daemons each on their own network-namespace host, 50 Mbit links. The
coordinator (the member with the lowest peer id) is killed with SIGKILL (its whole process group:
the machine is gone), so the next lowest has to take over. The survivors must detect it,
re-form the run in a new epoch without it, finish, agree within 1 point, and after the change spend
at most twice the time per round they spent before the crash. Everything the test creates is removed
however it ends; it skips where namespaces cannot be made.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pnode.node.events import read_events
from p2pnode.node.netlab import Host, NetLab, netlab_available, run_cmd
from p2pnode.node.settings import TestnetSettings
from p2pnode.node.testnet import node_command, read_bootstrap_address

AVAILABLE, WHY = netlab_available(tc=True)
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"no network namespaces here: {WHY}")


def evals(state: Path) -> list[dict]:
    path = state / "events.jsonl"
    return [e for e in read_events(path) if e["kind"] == "eval"] if path.is_file() else []


def seconds_per_round(points: list[dict]) -> float:
    """Median seconds per round between consecutive evaluations."""
    spans = [(b["t"] - a["t"]) / (b["round"] - a["round"]) for a, b in itertools.pairwise(points)]
    return statistics.median(spans)


def start_run(lab: NetLab, settings: TestnetSettings, tmp_path: Path) -> tuple[Host, list[Host], list]:
    """A bootstrap host and one host per node of `settings`, each running its process (one torch thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    boot_host = lab.add_host("boot")
    hosts = [lab.add_host(f"n{i}") for i in range(settings.nodes)]
    boot = boot_host.popen(
        [sys.executable, "-m", "p2pnode.cli.app", "bootstrap", "--listen", f"/ip4/{boot_host.address}/tcp/0",
         "--run-id", settings.run_id],
        stdout=subprocess.PIPE, stderr=(tmp_path / "boot.log").open("w"), text=True, env=env,
    )  # fmt: skip
    addr = read_bootstrap_address(boot, 120)
    assert addr is not None, "the bootstrap peer printed no address"
    procs = []
    for i, host in enumerate(hosts):
        state = tmp_path / f"n{i}"
        state.mkdir()
        command = node_command(settings, i, [addr], state, listen=f"/ip4/{host.address}/tcp/0")
        log = (tmp_path / f"n{i}.log").open("w")
        procs.append(host.popen(command, stdout=log, stderr=subprocess.STDOUT, env=env))
    return boot_host, hosts, procs


@pytest.mark.timeout(600)
def test_survivors_on_shaped_hosts_re_form_without_their_killed_coordinator_and_keep_their_pace(tmp_path):
    settings = TestnetSettings(nodes=4, epochs=60, batch_size=16, round_timeout=3.0, run_id="hosts").validate()
    with NetLab(prefix="mh", rate="50mbit") as lab:
        _, _, procs = start_run(lab, settings, tmp_path)

        deadline = time.monotonic() + 300
        while len(evals(tmp_path / "n3")) < 4:  # node 3 has trained 4 passes over the data
            assert time.monotonic() < deadline, "the run did not start on the namespaced hosts"
            assert all(p.poll() is None for p in procs), "a node exited early"
            time.sleep(0.5)
        # kill the coordinator (the lowest peer id): the next lowest must take over and re-form the run
        members = json.loads((tmp_path / "n0" / "state.json").read_text())["members"]
        victim = members.index(min(members))
        lab.kill(procs[victim])
        killed_at = time.time()
        survivors = [i for i in range(4) if i != victim]
        results = []
        for i in survivors:
            path = tmp_path / f"n{i}" / "result.json"
            while not path.exists():
                assert time.monotonic() < deadline + 240, f"node {i} did not finish"
                time.sleep(0.5)
            results.append(json.loads(path.read_text()))

    killed = members[victim]
    accuracies = [r["accuracy"] for r in results]
    assert max(accuracies) - min(accuracies) <= 0.01, accuracies
    for r in results:
        assert r["rounds"] == results[0]["rounds"]
        last = r["epochs"][-1]
        assert killed in last["left"] and len(last["members"]) == 3
    watched = tmp_path / f"n{survivors[0]}"
    before = [e for e in evals(watched) if e["t"] < killed_at]
    change_round = results[0]["epochs"][-1]["round"]
    after = [e for e in evals(watched) if e["round"] > change_round]
    clean, changed = seconds_per_round(before), seconds_per_round(after)
    print(f"seconds per round: before the crash {clean:.4f}, after the new epoch {changed:.4f}")
    assert changed <= 2 * clean, (clean, changed)


def cut_off(host, others) -> None:
    """Drop every packet that `host` receives from `others` (a partition), until `heal`."""
    addrs = ", ".join(o.address for o in others)
    rules = (
        "table inet partition {\n  chain in {\n    type filter hook input priority -10; policy accept;\n"
        f"    ip saddr {{ {addrs} }} drop\n  }}\n}}\n"
    )
    run_cmd([*host.exec_prefix, "nft", "-f", "-"], input=rules)


def heal(host) -> None:
    run_cmd([*host.exec_prefix, "nft", "delete", "table", "inet", "partition"], check=False)


@pytest.mark.timeout(900)  # its own deadlines allow 720 s; on a slow day the 60 epochs take ~260 s
def test_a_partition_that_heals_ends_as_one_run(tmp_path):
    # Every gradient 10x as long (--slowdown 10, ~15 ms): after the heal libp2p's dial backoff, grown while
    # the sides could not reach each other, keeps some links shut for tens of seconds, and the run must last
    # longer than that. At full speed two-node sides ran ~4 ms a round, so the 3,450 rounds ended seconds
    # after the heal, with a member dropped for its shut link (seen in CI). At 10x the four members were one
    # epoch again 20-30 s after the heal, from round ~300 of the 1,380 (120-190 ms a round), so the rest of
    # the run leaves over 100 s for a link still shut. Uncompressed, as its deadlines were tuned.
    settings = TestnetSettings(
        nodes=4,
        epochs=60,
        batch_size=16,
        round_timeout=3.0,
        run_id="split",
        codec="none",
        slow=[f"{i}:10" for i in range(4)],
    ).validate()
    with NetLab(prefix="pt") as lab:
        boot_host, hosts, _ = start_run(lab, settings, tmp_path)
        deadline = time.monotonic() + 300
        while len(evals(tmp_path / "n3")) < 2:
            assert time.monotonic() < deadline, "the run did not start on the namespaced hosts"
            time.sleep(0.5)
        side_a, side_b = [boot_host, hosts[0], hosts[1]], [hosts[2], hosts[3]]
        for h in side_a:
            cut_off(h, side_b)
        for h in side_b:
            cut_off(h, side_a)

        def epochs_seen(i: int) -> list[dict]:
            return [e for e in read_events(tmp_path / f"n{i}" / "events.jsonl") if e["kind"] == "epoch_change"]

        # each side goes on alone: a new epoch without the other side
        while not all(len(epochs_seen(i)[-1]["members"]) == 2 for i in range(4)):
            assert time.monotonic() < deadline + 120, "the sides did not re-form on their own"
            time.sleep(0.5)
        split_epochs = {epochs_seen(i)[-1]["epoch"] for i in range(4)}
        for h in side_a + side_b:
            heal(h)
        results = []
        for i in range(4):
            path = tmp_path / f"n{i}" / "result.json"
            while not path.exists():
                assert time.monotonic() < deadline + 420, f"node {i} did not finish"
                time.sleep(0.5)
            results.append(json.loads(path.read_text()))
    last = [r["epochs"][-1] for r in results]
    print("epochs during the partition:", split_epochs, "after healing:", {e["epoch"] for e in last})
    assert all(len(e["members"]) == 4 for e in last), last  # one run again, all four members
    assert len({tuple(e["members"]) for e in last}) == 1
    accuracies = [r["accuracy"] for r in results]
    assert max(accuracies) - min(accuracies) <= 0.01, accuracies
