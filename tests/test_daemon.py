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
import socket
import subprocess
import time
from urllib.request import urlopen

import msgpack
import pytest
from safetensors.torch import load_file

from p2pnode.cli.app import main as cli_main
from p2pnode.node.daemon import Node
from p2pnode.node.errors import BadInput
from p2pnode.node.rounds import ABSENT_GRACE_S
from p2pnode.node.settings import NodeSettings, SimulateSettings, TestnetSettings
from p2pnode.node.simulator import Simulation
from p2pnode.node.testnet import node_command, run_testnet, start_bootstrap, stop_processes
from p2pnode.protocol.envelope import Envelope, pack

# digits has 1,437 training images: with batch B and n nodes an epoch is ceil(1437 / (n * B)) rounds
FAST = {"epochs": 1, "batch_size": 72}  # 4 nodes: 5 rounds per epoch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def assert_daemons_hold_the_simulators_parameters(workdir, sim: Simulation) -> None:
    """Each daemon's checkpointed parameters equal the simulator's node's after its last run, to 1e-5."""
    for i, node in enumerate(sim.nodes):
        state = load_file(str(workdir / f"node{i}" / "state.safetensors"))
        assert (state["params"] - node.params).abs().max() <= 1e-5


@pytest.mark.timeout(300)
def test_four_daemons_match_the_simulator_after_five_rounds_and_leave_nothing_behind(tmp_path, own_processes):
    assert not own_processes()
    sockets_before = set(glob.glob("/tmp/hivemind-*"))
    # uncompressed: with int8 (the default) float noise between the processes (thread counts) can move a
    # value across a rounding boundary, a whole quantisation step
    exact = {"codec": "none", **FAST}
    settings = TestnetSettings(nodes=4, workdir=str(tmp_path), run_id="equiv", timeout=240, **exact).validate()
    earlier = tmp_path / "node0"  # a reused --workdir: the last testnet's result is kept, out of the way
    earlier.mkdir()
    (earlier / "result.json").write_text('{"earlier": true}')
    (earlier / "events.jsonl").write_text('{"event": "earlier"}\n')
    result = run_testnet(settings)
    (kept,) = earlier.glob("set-aside-*")
    assert (kept / "result.json").read_text() == '{"earlier": true}'
    assert (kept / "events.jsonl").read_text() == '{"event": "earlier"}\n'
    assert "earlier" not in (earlier / "result.json").read_text() + (earlier / "events.jsonl").read_text()
    daemons = result.results["p2pft"]
    assert daemons.iterations == 5

    sim = Simulation(SimulateSettings(nodes=4, **exact))
    reference = sim.run("p2pft")
    assert_daemons_hold_the_simulators_parameters(tmp_path, sim)
    for got, want in zip(daemons.accuracy, reference.accuracy, strict=True):
        assert abs(got - want) <= 0.005
    # every daemon times and counts its gradients in lockstep too (its DHT record says how long they take)
    for i in range(4):
        assert json.loads((tmp_path / f"node{i}" / "result.json").read_text())["gradients"] == 6  # tau^0 + 5 rounds
    assert daemons.steps == [6] * 4
    # two phases per round, one message per out-neighbour each: 10 messages of 34,250 floats and a header
    assert all(n == 10 for n in daemons.messages_sent)
    assert all(10 * 34250 * 4 < b < 10 * 34250 * 4 * 1.01 for b in daemons.bytes_sent)
    assert not own_processes(), "a daemon or node process outlived the testnet"
    assert not set(glob.glob("/tmp/hivemind-*")) - sockets_before, "p2pd sockets outlived the testnet"


@pytest.mark.timeout(300)
def test_daemons_on_the_one_peer_exponential_graph_match_the_simulator_and_wait_only_for_each_round_s_sender(
    tmp_path,
):
    """Its links change every round: a daemon that waited for every in-neighbour of the union graph would
    wait out the 2 s grace (ABSENT_GRACE_S) for the one not sending in each of the run's 10 phases
    (20 s and more, its first miss a whole --round-timeout), where all its waits take about a second."""
    exact = {"codec": "none", "topology": "one-peer-exponential", **FAST}
    settings = TestnetSettings(nodes=4, workdir=str(tmp_path), run_id="one-peer", timeout=240, **exact).validate()
    daemons = run_testnet(settings).results["p2pft"]
    assert daemons.iterations == 5
    sim = Simulation(SimulateSettings(nodes=4, **exact))
    sim.run("p2pft")
    assert_daemons_hold_the_simulators_parameters(tmp_path, sim)
    assert all(n == 10 for n in daemons.messages_sent)  # one out-link a phase: the directed ring's count
    waits = [json.loads((tmp_path / f"node{i}" / "result.json").read_text())["wait_seconds"] for i in range(4)]
    assert max(waits) < 5 * ABSENT_GRACE_S, waits  # half of what the 10 graces alone would take


def three_nodes(run_id: str) -> TestnetSettings:
    return TestnetSettings(
        nodes=3, split="0-2,3-5,6-9", epochs=20, batch_size=72, round_timeout=3.0, run_id=run_id
    ).validate()  # 7 rounds per epoch, 140 in all


def start_three_nodes(tmp_path, run_id: str) -> tuple[list[subprocess.Popen], list[str]]:
    """A bootstrap peer and 3 daemons (each in its own process group, state in tmp_path/nI, log
    tmp_path/nI.log) of a 140-round run, once node 2 has finished an epoch: [bootstrap, nodes 0-2]."""
    settings = three_nodes(run_id)
    boot, addrs = start_bootstrap(run_id, tmp_path / "boot.log")
    procs = [boot]
    try:
        for i in range(3):
            (tmp_path / f"n{i}").mkdir()
            procs.append(
                subprocess.Popen(
                    node_command(settings, i, addrs, tmp_path / f"n{i}"),
                    stdout=(tmp_path / f"n{i}.log").open("w"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        wait_for(lambda: (tmp_path / "n2" / "progress.json").exists(), 150, "node 2 to finish an epoch")
    except BaseException:
        stop_processes(procs)
        raise
    return procs, addrs


@pytest.mark.timeout(300)
def test_a_killed_node_is_dropped_by_a_new_epoch_and_status_lists_the_run(tmp_path, capsys):
    procs, addrs = start_three_nodes(tmp_path, "kill")
    try:
        assert cli_main(["status", "--peers", addrs[0], "--run-id", "kill"]) == 0
        listed = capsys.readouterr().out
        assert "3 member(s)" in listed and "training" in listed, listed
        assert "coordinator" in listed and "joined" in listed
        assert cli_main(["status", "--peers", addrs[0], "--run-id", "kil"]) == 1  # a typo: no empty tables, exit 1
        out, err = capsys.readouterr()
        assert out == "" and "no records of run 'kil' in the DHT" in err, (out, err)

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

        # the killed node's machine comes back after the run's end: its own `start`, with its state
        # dir, ends at once with its checkpoint's result (before: "has finished", exit 2; and before done
        # members' records lasted an hour, a 600 s wait to join)
        checkpoint = json.loads((tmp_path / "n2" / "state.json").read_text())["round"]
        back = subprocess.run(
            node_command(three_nodes("kill"), 2, addrs, tmp_path / "n2"), capture_output=True, text=True, timeout=120
        )
        assert back.returncode == 0, back.stderr[-3000:]
        result = json.loads((tmp_path / "n2" / "result.json").read_text())
        assert result["outcome"] == "finished without this node" and result["rounds"] == checkpoint < 140
        assert 0.0 <= result["accuracy"] <= 1.0 and "finished while this node was away" in back.stderr
    finally:
        stop_processes(procs)


@pytest.mark.timeout(300)
def test_a_node_that_slept_through_the_end_of_the_run_writes_its_result_and_exits(tmp_path):
    """A laptop that sleeps (its whole process group stopped) is dropped; the others finish the run
    without it. When it wakes it must not wait --join-timeout (600 s) to join a finished run: it ends
    with result.json for its own parameters and exit code 0."""
    procs, _ = start_three_nodes(tmp_path, "sleep")
    try:
        os.killpg(procs[3].pid, signal.SIGSTOP)
        try:
            for i in (0, 1):
                wait_for(lambda i=i: (tmp_path / f"n{i}" / "result.json").exists(), 150, f"node {i} to finish")
                assert procs[1 + i].wait(60) == 0
        finally:
            os.killpg(procs[3].pid, signal.SIGCONT)
        woke = time.monotonic()
        assert procs[3].wait(120) == 0, (tmp_path / "n2.log").read_text()[-3000:]
        assert time.monotonic() - woke < 120
        others = [json.loads((tmp_path / f"n{i}" / "result.json").read_text()) for i in (0, 1)]
        assert [r["outcome"] for r in others] == ["done", "done"] and all(r["rounds"] == 140 for r in others)
        # the sleeper's frozen DHT peer made the others' DHT reads slow and partial: neither of them may
        # take the other for gone (before, one read without a heartbeat left a coordinator alone)
        for r in others:
            assert all(len(e["members"]) >= 2 for e in r["epochs"]), r["epochs"]
        assert others[0]["accuracy"] == pytest.approx(others[1]["accuracy"], abs=0.01)
        result = json.loads((tmp_path / "n2" / "result.json").read_text())
        log = (tmp_path / "n2.log").read_text()
        assert result["outcome"] == "finished without this node", result["outcome"]
        assert result["rounds"] < 140 and 0.0 <= result["accuracy"] <= 1.0
        # it learns the end from the others' done records, or (when their DHT processes exited with them)
        # finds no record of them at all after its wake grace: it ends either way, never trains on alone
        learned = "has finished" in log or "no record of the other 2 member(s)" in log
        assert learned and "finished without this node (left out)" in log, log[-3000:]
    finally:
        stop_processes(procs)


def outside_of(processes: set[int], root: int) -> set[int]:
    """The processes in `processes` that are not `root` or one of its descendants."""

    def parent(pid: int) -> int:
        try:
            return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return 0

    def under(pid: int) -> bool:
        for _ in range(64):
            if pid in (root, 0, 1):
                return pid == root
            pid = parent(pid)
        return False

    return {p for p in processes if not under(p)}


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


def node_commands(settings: TestnetSettings, addrs: list[str], tmp_path) -> list[list[str]]:
    """One `start` command per node of `settings`, each with its own state dir tmp_path/nI (made here)."""
    for i in range(settings.nodes):
        (tmp_path / f"n{i}").mkdir()
    return [node_command(settings, i, addrs, tmp_path / f"n{i}") for i in range(settings.nodes)]


@pytest.mark.timeout(300)
def test_a_whole_run_stopped_by_sigterm_resumes_from_its_checkpoints_without_running_sums(tmp_path, own_processes):
    settings = TestnetSettings(nodes=2, split="0-4,5-9", epochs=12, batch_size=72, run_id="resume").validate()
    boot, addrs = start_bootstrap("resume", tmp_path / "boot.log")
    procs = [boot]
    try:
        commands = node_commands(settings, addrs, tmp_path)
        nodes = launch_and_wait(commands, tmp_path, "a", "progress.json", "both nodes to finish epoch 1 (round 10)")
        procs += nodes
        start = time.monotonic()
        for node in nodes:  # everyone leaves: nobody stays to form an epoch, so nobody waits for one
            node.send_signal(signal.SIGTERM)
        assert [node.wait(60) for node in nodes] == [0, 0]
        assert time.monotonic() - start < 20
        stopped = [json.loads((tmp_path / f"n{i}" / "state.json").read_text())["round"] for i in range(2)]
        assert all(10 <= r < 120 for r in stopped), stopped
        assert not any((tmp_path / f"n{i}" / "result.json").exists() for i in range(2))
        assert not outside_of(own_processes(), boot.pid), "a stopped node left a process behind"

        procs += launch_and_wait(commands, tmp_path, "b", "result.json", "the restarted nodes to finish")
        for i in range(2):
            log = (tmp_path / f"b{i}.log").read_text()
            assert f"resumed from {tmp_path / f'n{i}'} at round {stopped[i]}" in log
            result = json.loads((tmp_path / f"n{i}" / "result.json").read_text())
            assert result["rounds"] == 120
            assert result["history"]["epoch"] == list(range(1, 13))
            # a restart is a join: a new epoch that starts at the furthest checkpoint, links afresh
            assert result["epochs"][-1]["epoch"] >= 1 and result["epochs"][-1]["round"] == max(stopped)
            assert "going on without" not in log
    finally:
        stop_processes(procs)


@pytest.mark.timeout(300)
def test_sigterm_makes_a_node_leave_after_the_epoch_that_drops_it_and_exit_by_itself(tmp_path, own_processes):
    settings = TestnetSettings(nodes=3, split="0-2,3-5,6-9", epochs=40, batch_size=72, run_id="leave").validate()
    boot, addrs = start_bootstrap("leave", tmp_path / "boot.log")
    procs = [boot]
    try:
        commands = node_commands(settings, addrs, tmp_path)
        nodes = launch_and_wait(commands, tmp_path, "a", "progress.json", "all nodes to finish epoch 1")
        procs += nodes
        start = time.monotonic()
        nodes[1].send_signal(signal.SIGTERM)
        assert nodes[1].wait(60) == 0
        print(f"the leaver exited {time.monotonic() - start:.1f} s after SIGTERM")
        leaver = json.loads((tmp_path / "n1" / "state.json").read_text())
        for i in (0, 2):
            wait_for(lambda i=i: (tmp_path / f"n{i}" / "result.json").exists(), 200, f"node {i} to finish")
        results = [json.loads((tmp_path / f"n{i}" / "result.json").read_text()) for i in (0, 2)]
        peer = results[0]["epochs"][0]["members"][1]
        for r in results:
            last = r["epochs"][-1]
            assert peer in last["left"] and len(last["members"]) == 2
            # the leaver went no later than the epoch that dropped it: at its start round, or a few rounds
            # short of it once the others had entered it (they stop waiting for a member the record leaves
            # out, so it may trail them; node/driver.py `others_entered`; CI once saw 177 against 183)
            assert leaver["round"] <= last["round"]
        assert abs(results[0]["accuracy"] - results[1]["accuracy"]) <= 0.01
        events = [json.loads(line)["kind"] for line in (tmp_path / "n1" / "events.jsonl").read_text().splitlines()]
        assert "leave" in events and "done" not in events
        for p in nodes:
            p.wait(60)  # the survivors exit by themselves after the run
        assert not outside_of(own_processes(), boot.pid), "a finished or leaving node left a process behind"
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
        epochs=2,
        batch_size=72,
        run_id="fuzz",
        peers=fuzz_bootstrap,
        listen=["/ip4/127.0.0.1/tcp/0"],
        round_timeout=20.0,
    )

    async def scenario():
        a = await Node.create(NodeSettings(index=0, state_dir=str(tmp_path / "a"), **common).validate())
        b = await Node.create(
            NodeSettings(index=1, state_dir=str(tmp_path / "b"), metrics_port=free_port(), **common).validate()
        )
        stranger = await Node.create(
            NodeSettings(
                classes="0-4", state_dir=str(tmp_path / "c"), model_seed=7, join_timeout=8.0, **common
            ).validate()
        )
        try:
            runs = [asyncio.create_task(n.run()) for n in (a, b)]
            refused_stranger = asyncio.create_task(stranger.run())
            for _ in range(600):  # until both train in an epoch (a's links to b are known from then on)
                if b.record is not None and 1 in a.transport.peer_of:
                    break
                await asyncio.sleep(0.1)
            valid = pack(
                Envelope(run="fuzz", epoch=0, round=0, phase="pull", seq=1, sender=a.peer_id, kind="value", tensors={})
            )
            frames = junk_frames(2000, valid, random.Random(0))
            answers = await asyncio.gather(*(a.links.send(a.transport.peer_of[1], f) for f in frames))
            url = f"http://127.0.0.1:{b.settings.metrics_port}/metrics"
            metrics = await asyncio.get_running_loop().run_in_executor(None, lambda: urlopen(url, timeout=5).read())
            during_run = b.round < b.rounds
            with pytest.raises(BadInput, match="only 1 of 2 members"):
                await refused_stranger
            results = await asyncio.wait_for(asyncio.gather(*runs), 120)
            return answers, results, metrics.decode(), during_run
        finally:
            for n in (a, b, stranger):
                await n.shutdown()

    answers, results, metrics, during_run = asyncio.run(scenario())
    assert len(answers) == 2000 and not any(answers), "a hostile frame was accepted"
    assert during_run, "the rounds ended before the hostile frames and the metrics read were done"
    assert all(r is not None and r["rounds"] == 20 for r in results)
    assert results[0]["accuracy"] == results[1]["accuracy"]  # still in consensus
    assert "dropped a message" in caplog.text
    assert "refusing peer" in caplog.text
    refused = [line for line in metrics.splitlines() if line.startswith("p2pnode_refused_messages_total{")]
    assert refused and float(refused[0].split()[-1]) >= 1000, refused  # served while the run went on
    assert 'p2pnode_epoch{run="fuzz"} 0.0' in metrics
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "b" / "events.jsonl").read_text().splitlines()]
    assert {"start", "epoch_change", "eval", "refused", "done"} <= set(kinds)


@pytest.mark.timeout(300)
def test_dimat_merge_rounds_run_over_the_daemon_testnet_and_match_the_simulator(tmp_path):
    # 3 nodes, iid, ring (every node has 2 neighbours); batch 96: 5 rounds an epoch, a merge each epoch
    common = dict(nodes=3, split="iid", topology="ring", algorithm="dimat", epochs=2, batch_size=96, lr=0.05)
    common["model"] = "vit_digits_4px"  # 2 epochs are too few for the default vit_digits to leave chance
    result = run_testnet(TestnetSettings(workdir=str(tmp_path), run_id="dimat", timeout=240, **common).validate())
    daemons = result.results["dimat"]
    assert daemons.iterations == 10
    assert all(n == 2 * 2 for n in daemons.messages_sent)  # 2 merges x 2 neighbours, nothing in between
    reference = Simulation(SimulateSettings(**common)).run("dimat")
    for got, want in zip(daemons.accuracy, reference.accuracy, strict=True):
        assert abs(got - want) <= 0.005
    assert all(a > 0.5 for a in daemons.accuracy)


@pytest.mark.timeout(400)
def test_a_member_that_crashes_and_restarts_at_once_costs_its_neighbours_no_round_timeout(tmp_path):
    """A machine that reboots: node 2 is killed and started again half a second later, most often before
    anyone has dropped it, so the epoch that drops its old process lets its new one in. Its neighbours'
    rounds of the old epoch stop waiting for the old process as soon as they read that epoch. Before,
    they waited out --round-timeout (60 s), then the short grace in every phase up to that epoch's start
    (hundreds of rounds ahead) and jumped there; the same testnet took 4 minutes instead of 50 s and
    dropped node 2 once more."""
    settings = TestnetSettings(
        nodes=4, run_id="reboot", workdir=str(tmp_path), timeout=300, churn="crash:2@3s,rejoin:2@3.5s"
    ).validate()
    daemons = run_testnet(settings).results["p2pft"]
    records = daemons.history["membership"]
    assert sorted(records[-1]["members"]) == [0, 1, 2, 3], records
    assert all(not r["crashed"] or r["crashed"] == [2] for r in records), records
    assert max(daemons.accuracy) - min(daemons.accuracy) <= 0.01 and min(daemons.accuracy) > 0.8, daemons.accuracy
    logs = "".join((tmp_path / f"node{i}.log").read_text() for i in range(4))
    assert "going on without" not in logs and "jumping to it" not in logs


@pytest.mark.timeout(600)
def test_chaos_testnet_with_a_crash_a_late_join_and_a_return_ends_in_consensus(tmp_path):
    from p2pnode.node.report import membership_notes

    settings = TestnetSettings(
        nodes=4,
        epochs=100,  # 2300 rounds: long enough for the joiners' processes to start on a busy machine
        batch_size=16,
        round_timeout=3.0,
        run_id="chaos",
        workdir=str(tmp_path),
        timeout=540,
        churn="crash:3@3s,join:4@5s,rejoin:3@25s",  # the return comes well after the crash is detected
    ).validate()
    result = run_testnet(settings)
    daemons = result.results["p2pft"]
    records = daemons.history["membership"]
    crashes = [r["crashed"] for r in records if r["crashed"]]
    # under CI load the returned node 3 was once reported silent, dropped and re-admitted twice more:
    # recovery at work, counted as crashes of node 3 because its process once crashed; no other node may be
    assert crashes and all(c == [3] for c in crashes), records
    assert [4] in [r["joined"] for r in records] and [3] in [r["rejoined"] for r in records]
    assert sorted(records[-1]["members"]) == [0, 1, 2, 3, 4]
    notes = membership_notes(daemons)
    assert notes[3].startswith("crashed @") and "back @" in notes[3] and notes[4].startswith("joined @")
    assert max(daemons.accuracy) - min(daemons.accuracy) <= 0.01, daemons.accuracy  # one run, in consensus
    assert min(daemons.accuracy) > 0.5
