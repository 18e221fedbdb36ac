"""The peer daemon over real hivemind P2P on 127.0.0.1: testnets, failures, restarts, hostile input.

Every test here starts daemons, so each carries a timeout; tests/conftest.py ends whatever they leave.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import random
import signal
import subprocess
import time

import msgpack
import pytest
from safetensors.torch import load_file

from p2pnode.cli.app import main as cli_main
from p2pnode.node.daemon import Node
from p2pnode.node.errors import BadInput
from p2pnode.node.settings import NodeSettings, SimulateSettings, TestnetSettings
from p2pnode.node.simulator import Simulation
from p2pnode.node.testnet import node_command, run_testnet, start_bootstrap, stop_processes
from p2pnode.protocol.envelope import Envelope, pack

# digits has 1,437 training images: with batch B and n nodes an epoch is ceil(1437 / (n * B)) rounds
FAST = {"epochs": 1, "batch_size": 72}  # 4 nodes: 5 rounds per epoch


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.mark.timeout(300)
def test_four_daemons_match_the_simulator_after_five_rounds_and_leave_nothing_behind(tmp_path, own_processes):
    assert not own_processes()
    sockets_before = set(glob.glob("/tmp/hivemind-*"))
    settings = TestnetSettings(nodes=4, workdir=str(tmp_path), run_id="equiv", timeout=240, **FAST).validate()
    result = run_testnet(settings)
    daemons = result.results["p2pft"]
    assert daemons.iterations == 5

    sim = Simulation(SimulateSettings(nodes=4, **FAST))
    reference = sim.run("p2pft")
    for i in range(4):
        state = load_file(str(tmp_path / f"node{i}" / "state.safetensors"))
        assert (state["params"] - sim.nodes[i].params).abs().max() <= 1e-5
        assert (state["tau"] - sim.nodes[i].tau).abs().max() <= 1e-5
    for got, want in zip(daemons.accuracy, reference.accuracy, strict=True):
        assert abs(got - want) <= 0.005
    # two phases per round, one message per out-neighbour each: 10 messages of 34,250 floats and a header
    assert all(n == 10 for n in daemons.messages_sent)
    assert all(10 * 34250 * 4 < b < 10 * 34250 * 4 * 1.01 for b in daemons.bytes_sent)
    assert not own_processes(), "a daemon or node process outlived the testnet"
    assert not set(glob.glob("/tmp/hivemind-*")) - sockets_before, "p2pd sockets outlived the testnet"


@pytest.mark.timeout(300)
def test_a_killed_node_is_dropped_by_a_new_epoch_and_status_lists_the_run(tmp_path, capsys):
    settings = TestnetSettings(
        nodes=3, split="0-2,3-5,6-9", epochs=20, batch_size=72, round_timeout=3.0, run_id="kill"
    ).validate()  # 7 rounds per epoch, 140 in all
    boot, addrs = start_bootstrap("kill", tmp_path / "boot.log")
    procs = [boot]
    try:
        for i in range(3):
            (tmp_path / f"n{i}").mkdir()
            log = (tmp_path / f"n{i}.log").open("w")
            procs.append(
                subprocess.Popen(
                    node_command(settings, i, addrs, tmp_path / f"n{i}"),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        wait_for(lambda: (tmp_path / "n2" / "progress.json").exists(), 150, "node 2 to finish an epoch")

        assert cli_main(["status", "--peers", addrs[0], "--run-id", "kill"]) == 0
        listed = capsys.readouterr().out
        assert "3 member(s)" in listed and "training" in listed, listed
        assert "coordinator" in listed and "joined" in listed

        os.killpg(procs[3].pid, signal.SIGKILL)  # the whole process group: the machine is gone
        killed = json.loads((tmp_path / "n2" / "state.json").read_text())["members"][2]
        results = []
        for i in (0, 1):
            wait_for(lambda i=i: (tmp_path / f"n{i}" / "result.json").exists(), 200, f"node {i} to finish")
            results.append(json.loads((tmp_path / f"n{i}" / "result.json").read_text()))
        for result in results:
            assert result["rounds"] == 140
            assert 0.0 <= result["accuracy"] <= 1.0
            # the crash was detected and the run re-formed without the node: nobody waits for it again
            last = result["epochs"][-1]
            assert last["epoch"] >= 1 and killed not in last["members"] and len(last["members"]) == 2
            assert killed in last["left"]
        assert results[0]["accuracy"] == pytest.approx(results[1]["accuracy"], abs=0.01)
        assert "going on without node(s) [2]" in (tmp_path / "n0.log").read_text()
    finally:
        stop_processes(procs)


def launch_and_wait(commands: list[list[str]], tmp_path, log: str, marker: str, what: str) -> list:
    """Start one node per command (logs tmp_path/LOG{i}.log) and wait until each state dir has MARKER."""
    nodes = [
        subprocess.Popen(c, stdout=(tmp_path / f"{log}{i}.log").open("w"), stderr=subprocess.STDOUT)
        for i, c in enumerate(commands)
    ]
    try:
        wait_for(lambda: all((tmp_path / f"n{i}" / marker).exists() for i in range(len(commands))), 150, what)
    except AssertionError:
        stop_processes(nodes)
        raise
    return nodes


@pytest.mark.timeout(300)
def test_sigterm_checkpoints_and_a_restarted_node_resumes_where_it_stopped(tmp_path):
    settings = TestnetSettings(nodes=2, split="0-4,5-9", epochs=2, batch_size=72, run_id="resume").validate()
    boot, addrs = start_bootstrap("resume", tmp_path / "boot.log")
    procs = [boot]
    try:
        commands = [node_command(settings, i, addrs, tmp_path / f"n{i}") for i in range(2)]
        for i in range(2):
            (tmp_path / f"n{i}").mkdir()
        nodes = launch_and_wait(commands, tmp_path, "a", "progress.json", "both nodes to finish epoch 1 (round 10)")
        procs += nodes
        nodes[0].send_signal(signal.SIGTERM)
        assert nodes[0].wait(60) == 0
        # node 1's only in-neighbour is gone: it must still stop promptly, not sit out the 60 s round timeout
        start = time.monotonic()
        nodes[1].send_signal(signal.SIGTERM)
        assert nodes[1].wait(60) == 0
        assert time.monotonic() - start < 20
        stopped = [json.loads((tmp_path / f"n{i}" / "state.json").read_text())["round"] for i in range(2)]
        assert all(10 <= r < 20 for r in stopped), stopped
        assert not any((tmp_path / f"n{i}" / "result.json").exists() for i in range(2))

        procs += launch_and_wait(commands, tmp_path, "b", "result.json", "the restarted nodes to finish")
        for i in range(2):
            assert f"resumed from {tmp_path / f'n{i}'} at round {stopped[i]}" in (tmp_path / f"b{i}.log").read_text()
            result = json.loads((tmp_path / f"n{i}" / "result.json").read_text())
            assert result["rounds"] == 20
            assert result["history"]["epoch"] == [1, 2]
            # nodes that stopped a round apart rejoin at the same round instead of waiting out a timeout
            assert "going on without" not in (tmp_path / f"b{i}.log").read_text()
    finally:
        stop_processes(procs)


def junk_frames(count: int, valid: bytes, rng: random.Random) -> list[bytes]:
    frames = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            frames.append(rng.randbytes(rng.randrange(0, 300)))
        elif kind == 1:
            frames.append(valid[: rng.randrange(0, len(valid))])
        elif kind == 2:  # well-formed msgpack of the wrong shape
            frames.append(msgpack.packb({"v": rng.choice([1, 2, "x", None]), "t": [rng.random()]}))
        else:  # a valid envelope for another run
            frames.append(valid.replace(b"fuzz", b"fuzZ"))
    return frames


@pytest.fixture
def fuzz_bootstrap(tmp_path):
    proc, addrs = start_bootstrap("fuzz", tmp_path / "boot.log")
    yield addrs
    stop_processes([proc])


@pytest.mark.timeout(300)
def test_a_daemon_survives_thousands_of_hostile_messages_and_refuses_a_foreign_trunk(tmp_path, caplog, fuzz_bootstrap):
    caplog.set_level("WARNING", logger="p2pnode")
    common = dict(
        nodes=2,
        split="0-4,5-9",
        epochs=1,
        batch_size=72,
        run_id="fuzz",
        peers=fuzz_bootstrap,
        listen=["/ip4/127.0.0.1/tcp/0"],
        round_timeout=20.0,
    )

    async def scenario():
        a = await Node.create(NodeSettings(index=0, state_dir=str(tmp_path / "a"), **common).validate())
        b = await Node.create(NodeSettings(index=1, state_dir=str(tmp_path / "b"), **common).validate())
        stranger = await Node.create(
            NodeSettings(
                classes="0-4", state_dir=str(tmp_path / "c"), model_seed=7, join_timeout=8.0, **common
            ).validate()
        )
        try:
            runs = [asyncio.create_task(n.run()) for n in (a, b)]
            with pytest.raises(BadInput, match="only 1 of 2 members"):
                await stranger.run()
            await asyncio.wait_for(b._ready.wait(), 60)
            valid = pack(
                Envelope(run="fuzz", epoch=0, round=0, phase="pull", seq=1, sender=a.peer_id, kind="value", tensors={})
            )
            frames = junk_frames(2000, valid, random.Random(0))
            answers = await asyncio.gather(*(a.links.send(a._peer_of[1], f) for f in frames))
            results = await asyncio.wait_for(asyncio.gather(*runs), 120)
            return answers, results
        finally:
            for n in (a, b, stranger):
                await n.shutdown()

    answers, results = asyncio.run(scenario())
    assert len(answers) == 2000 and not any(answers), "a hostile frame was accepted"
    assert all(r is not None and r["rounds"] == 10 for r in results)
    assert results[0]["accuracy"] == results[1]["accuracy"]  # still in consensus
    assert "dropped a message" in caplog.text
    assert "refusing peer" in caplog.text


@pytest.mark.timeout(300)
def test_dimat_merge_rounds_run_over_the_daemon_testnet_and_match_the_simulator(tmp_path):
    # 3 nodes, iid, ring (every node has 2 neighbours); batch 96: 5 rounds an epoch, a merge each epoch
    common = dict(nodes=3, split="iid", topology="ring", algorithm="dimat", epochs=2, batch_size=96, lr=0.05)
    result = run_testnet(TestnetSettings(workdir=str(tmp_path), run_id="dimat", timeout=240, **common).validate())
    daemons = result.results["dimat"]
    assert daemons.iterations == 10
    assert all(n == 2 * 2 for n in daemons.messages_sent)  # 2 merges x 2 neighbours, nothing in between
    reference = Simulation(SimulateSettings(**common)).run("dimat")
    for got, want in zip(daemons.accuracy, reference.accuracy, strict=True):
        assert abs(got - want) <= 0.005
    assert all(a > 0.5 for a in daemons.accuracy)
