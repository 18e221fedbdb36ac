"""`p2pnode simulate --churn`: nodes join, leave, crash and come back during a simulated run (DESIGN §8).

Most tests run 2 epochs of 5 rounds (batch 72 on digits, 4 nodes): rounds 0..9, accuracy measured
after rounds 4 and 9.
"""

from __future__ import annotations

import json

import pytest
import torch

from p2pnode.cli.app import main
from p2pnode.node.algorithms import ALGORITHMS, StepRule
from p2pnode.node.engine import InMemoryNetwork
from p2pnode.node.report import membership_notes, results_table
from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import (
    CRASH_DETECTION_ROUNDS,
    AlgorithmResult,
    Simulation,
    SimulationResult,
    iterations_per_epoch,
    objective_seed,
    step_schedule,
)
from p2pnode.node.training import VisionObjective, accuracy
from p2pnode.protocol.codecs import get_codec

# the former default model at its lr: these runs are too short for vit_digits to leave chance (about 20%
# after 2 epochs), and the accuracies below were measured on it
SMALL = {"epochs": 2, "batch_size": 72, "device": "cpu", "model": "vit_digits_4px", "lr": 0.005}
ROUNDS = 10  # 1437 training images / (4 nodes x 72) -> 5 rounds per epoch

# P2P-FT's accuracies with these settings and no churn, as the simulator gave them before churn existed
P2PFT_BEFORE_CHURN = [0.20833333333333334, 0.23055555555555557, 0.20833333333333334, 0.19166666666666668]

_sims: dict[tuple, Simulation] = {}


def simulation(churn: str | None = None, **overrides) -> Simulation:
    """One Simulation per (churn, settings), shared by the tests of this module."""
    key = (churn, tuple(sorted(overrides.items())))
    if key not in _sims:
        _sims[key] = Simulation(SimulateSettings(**{**SMALL, **overrides}, churn=churn))
    return _sims[key]


def run_watching(sim: Simulation, name: str = "p2pft"):
    """Run `name`, recording before each round the members, crashed nodes and node objects."""
    seen: dict[int, dict] = {}

    def on_round(k: int, net: InMemoryNetwork) -> None:
        seen[k] = {
            "members": list(net.members),
            "down": set(net.down),
            "nodes": list(net.nodes),
            "params": [None if n is None else n.params.clone() for n in net.nodes],
            "iteration": [None if n is None else (n.iteration, n.epoch) for n in net.nodes],
            "momentum": [None if n is None or n.step._buffer is None else n.step._buffer.clone() for n in net.nodes],
        }

    return sim.run(name, on_round=on_round), seen


@pytest.mark.timeout(120)
def test_membership_history_records_each_change_at_its_round():
    sim = simulation("leave:3@3,join:3@6")
    result, seen = run_watching(sim)
    records = result.history["membership"]
    assert [(r["round"], r["epoch"], r["members"]) for r in records] == [
        (0, 0, [0, 1, 2, 3]),
        (3, 1, [0, 1, 2]),
        (6, 2, [0, 1, 2, 3]),
    ]
    assert (records[1]["left"], records[1]["joined"], records[2]["joined"]) == ([3], [], [3])
    assert result.history["presence"] == {0: [[0, None]], 1: [[0, None]], 2: [[0, None]], 3: [[0, 3], [6, None]]}
    assert all(seen[k]["members"] == ([0, 1, 2] if 3 <= k < 6 else [0, 1, 2, 3]) for k in range(ROUNDS))
    # node 3 sent nothing in rounds 3..5: P2P-FT on a directed ring sends 2 messages a round
    assert result.messages_sent == [2 * ROUNDS] * 3 + [2 * (ROUNDS - 3)]


@pytest.mark.timeout(120)
def test_crash_silences_the_node_at_once_and_drops_it_crash_detection_rounds_later():
    sim = simulation("crash:1@2")
    result, seen = run_watching(sim)
    removal = 2 + CRASH_DETECTION_ROUNDS
    for k in range(ROUNDS):
        assert (1 in seen[k]["members"]) == (k < removal), k
        assert (1 in seen[k]["members"] and 1 in seen[k]["down"]) == (2 <= k < removal), k  # a silent member
    record = result.history["membership"][-1]
    assert (record["round"], record["crashed"], record["members"]) == (removal, [1], [0, 2, 3])
    assert result.history["presence"][1] == [[0, 2]]
    assert result.messages_sent[1] == 2 * 2  # rounds 0 and 1 only
    # out at the end: its accuracy is the one it had when it crashed
    assert result.accuracy[1] == accuracy(sim.model, seen[2]["params"][1], sim.test_bank)


@pytest.mark.timeout(120)
def test_joiner_starts_from_the_donors_parameters_at_its_join_round():
    sim = simulation("leave:3@3,join:3@6")
    _, seen = run_watching(sim)
    joiner = seen[6]["nodes"][3]
    assert joiner is not seen[5]["nodes"][3]  # a fresh object, not the node that left
    assert seen[6]["iteration"][3] == (6, 2)  # the run's round and the new epoch
    # donor: the member at position 0 of the epoch before the join (node 0), as it was after round 5
    assert torch.equal(seen[6]["params"][3], seen[6]["params"][0])
    assert not torch.equal(seen[6]["params"][3], seen[3]["params"][3])  # not what node 3 had when it left
    assert not torch.equal(seen[6]["params"][3], sim.initial)


@pytest.mark.timeout(120)
def test_rejoiner_restores_its_own_checkpoint_not_the_donors_parameters():
    sim = simulation("crash:1@2,rejoin:1@8")
    result, seen = run_watching(sim)
    at_crash, back = seen[2]["nodes"][1], seen[8]["nodes"][1]
    assert back is not at_crash and seen[8]["iteration"][1] == (8, 2)
    assert torch.equal(seen[8]["params"][1], seen[2]["params"][1])
    assert not torch.equal(seen[8]["params"][1], seen[8]["params"][0])
    # the optimizer state (heavy-ball momentum) comes back with it
    assert torch.equal(seen[8]["momentum"][1], seen[2]["momentum"][1])
    record = result.history["membership"][-1]
    assert (record["round"], record["joined"], record["rejoined"], record["members"]) == (8, [1], [1], [0, 2, 3, 1])
    assert result.history["presence"][1] == [[0, 2], [8, None]]
    assert membership_notes(result) == {1: "crashed @2, back @8"}


@pytest.mark.timeout(120)
def test_rejoin_before_the_crash_is_noticed_replaces_the_crashed_node_in_one_epoch():
    result, _ = run_watching(simulation("crash:1@2,rejoin:1@4"))
    records = result.history["membership"]
    assert [r["round"] for r in records] == [0, 4]  # no second epoch change at 2 + CRASH_DETECTION_ROUNDS
    assert (records[1]["crashed"], records[1]["joined"], records[1]["members"]) == ([1], [1], [0, 2, 3, 1])


@pytest.mark.timeout(120)
def test_nodes_outside_the_run_have_none_in_the_accuracy_and_loss_history():
    sim = simulation("leave:3@3,join:2@6")  # node 2's first event is join: it starts outside
    result, seen = run_watching(sim)
    assert result.history["membership"][0]["members"] == [0, 1, 3]
    # accuracy is measured after rounds 4 and 9 for the nodes running then
    assert [[a is not None for a in row] for row in result.history["accuracy"]] == [
        [True, True, False, False],
        [True, True, True, False],
    ]
    # the mean loss of an epoch covers the rounds a node ran in it (node 3 ran rounds 0..2 of the first)
    assert [[x is not None for x in row] for row in result.history["loss"]] == [
        [True, True, False, True],
        [True, True, True, False],
    ]
    assert result.history["presence"][2] == [[6, None]]
    # node 3 was out at the end: the final list holds its accuracy from when it left
    assert result.accuracy[3] == accuracy(sim.model, seen[3]["params"][3], sim.test_bank)
    assert result.accuracy[:3] == result.history["accuracy"][-1][:3]
    # the table: a membership row with what happened when, and a * on the accuracy from when it left
    assert membership_notes(result) == {2: "joined @6", 3: "left @3"}
    table = results_table(SimulationResult(sim.settings.to_dict(), {"p2pft": result}, "x"))
    cells = [[str(c) for c in column.cells] for column in table.columns]
    assert cells[4] == [f"{100 * result.accuracy[3]:.1f}*", "left @3"] and cells[3][1] == "joined @6"
    assert "* accuracy when the node left" in str(table.caption)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["p2pft", "dsgd", "sgp", "local", "dimat"])
def test_every_algorithm_trains_only_while_a_member_and_central_ignores_churn(name):
    sim = simulation("crash:1@2,leave:3@3,join:3@6,rejoin:1@8", topology="ring")
    result = sim.run(name)
    members = [[0, 1, 2, 3], [0, 1, 2], [0, 1, 2, 3], [0, 2, 3], [0, 2, 3, 1]]
    assert [r["members"] for r in result.history["membership"]] == members
    assert all(0.0 <= a <= 1.0 for a in result.accuracy)
    # a node's objective draws a mini-batch for each round it runs, plus one at the start for P2P-FT
    start = 1 if name == "p2pft" else 0
    ran = {0: ROUNDS, 1: ROUNDS - 8, 2: ROUNDS, 3: ROUNDS - 6}  # the objects alive at the end
    for i, rounds in ran.items():
        assert sim.nodes[i].objective.samples_seen == 72 * (rounds + start), (i, sim.nodes[i].objective.samples_seen)
        assert sim.nodes[i].iteration == ROUNDS
    central = sim.run("central")
    assert central.history["presence"] == {0: [[0, None]]}
    assert len(central.history["membership"]) == 1


def reference_run(sim: Simulation, name: str) -> list:
    """The simulator's loop as it was before churn: every node built up front, one fixed topology."""
    s = sim.settings
    per_epoch = iterations_per_epoch(sum(len(p) for p in sim.parts), len(sim.parts), s.batch_size)
    lr = step_schedule(s, per_epoch * s.epochs)
    nodes = []
    for i, shard in enumerate(sim.parts):
        objective = VisionObjective(sim.model, sim.train_bank, shard, s.batch_size, seed=objective_seed(s, i))
        codec = None if s.codec == "none" else get_codec(s.codec)
        step = StepRule(lr, s.momentum)
        node = ALGORITHMS[name](sim.topology.neighbourhood(i), objective, sim.initial, step, codec)
        node.configure(iterations_per_epoch=per_epoch, settings=s)
        nodes.append(node)
    net = InMemoryNetwork(nodes)
    for k in range(per_epoch * s.epochs):
        net.iteration(k)
    return nodes


@pytest.mark.timeout(120)
@pytest.mark.parametrize("codec", ["none", "int8"])
@pytest.mark.parametrize("name", ["p2pft", "dsgd"])
def test_run_without_churn_is_bit_identical_to_the_loop_before_churn(name, codec):
    sim = simulation(None, codec=codec)
    result = sim.run(name)
    reference = reference_run(sim, name)
    for node, ref in zip(sim.nodes, reference, strict=True):
        assert torch.equal(node.params, ref.params)
    assert result.accuracy == [accuracy(sim.model, n.params, sim.test_bank) for n in reference]
    if name == "p2pft" and codec == "none":  # measured before churn existed (and before int8 was the default)
        assert result.accuracy == P2PFT_BEFORE_CHURN
    assert [r["members"] for r in result.history["membership"]] == [[0, 1, 2, 3]]
    # no churn: the table has no membership row and no caption (the output is as before churn)
    table = results_table(SimulationResult(sim.settings.to_dict(), {name: result}, "x"))
    assert table.row_count == 1 and table.caption is None


@pytest.mark.timeout(180)
def test_cli_churn_writes_membership_history_to_json_and_notes_in_the_table(tmp_path, capsys):
    json_path, plot_path = tmp_path / "churn.json", tmp_path / "churn.png"
    argv = ["simulate", "--epochs", "2", "--batch-size", "72", "--device", "cpu", "--compare", "central"]
    code = main([*argv, "--churn", "leave:3@3,join:3@6", "--json", str(json_path), "--plot", str(plot_path)])
    out, _ = capsys.readouterr()
    assert code == 0
    doc = json.loads(json_path.read_text())
    assert doc["settings"]["churn"] == "leave:3@3,join:3@6"
    history = doc["results"]["p2pft"]["history"]
    assert [(r["round"], r["members"]) for r in history["membership"]] == [
        (0, [0, 1, 2, 3]),
        (3, [0, 1, 2]),
        (6, [0, 1, 2, 3]),
    ]
    assert history["presence"]["3"] == [[0, 3], [6, None]]
    assert [row[3] is None for row in history["accuracy"]] == [True, False]
    assert "left @3, joined @6" in out
    assert plot_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--churn", "join:3@10"], "outside the run: its rounds are 0..9"),
        (["--churn", "leave:3@0"], "outside the run"),
        (["--topology", "{edges}", "--churn", "leave:3@5"], "--churn needs a built-in topology"),
        (["--topology", "random:2", "--churn", "leave:3@5,leave:2@6"], "leaves 2 nodes in the run"),
    ],
)
def test_cli_rejects_churn_the_simulator_cannot_carry_out(args, message, tmp_path, capsys):
    edges = tmp_path / "ring.txt"
    edges.write_text("0 -> 1\n1 -> 2\n2 -> 3\n3 -> 0\n")
    args = [a.format(edges=edges) for a in args]
    code = main(["simulate", "--epochs", "2", "--batch-size", "72", "--device", "cpu", *args])
    _, err = capsys.readouterr()
    assert code == 2
    assert message in err and "Traceback" not in err, err


@pytest.mark.timeout(300)
def test_p2pft_members_agree_at_the_end_after_a_leave_and_a_join():
    # 6 epochs of 12 rounds: node 3 (classes 7-9) is out for rounds 18..35, then joins from a donor
    sim = simulation("leave:3@18,join:3@36", epochs=6, batch_size=32)
    result = sim.run("p2pft")
    assert result.history["presence"][3] == [[0, 18], [36, None]]
    acc = [100 * a for a in result.accuracy]
    assert max(acc) - min(acc) <= 2.0, acc  # measured: all four at 58.1 %
    # and they agree on something learnt over all ten classes: Local-FT cannot pass 40 % here
    assert min(acc) > 45.0, acc


def test_a_testnet_node_that_never_took_part_leaves_the_other_columns_their_own_names():
    # `testnet --churn join:2@10s` where the run finished before node 2 came: the columns are nodes 0, 1
    # and 3 by the ids every flag uses (the third column was once headed "node 2", later "node 4" 1-based)
    settings = {"nodes": 3, "node_ids": [0, 1, 3], "data": "digits", "split": "iid", "topology": "ring"}
    history = {"presence": {"0": [[0, None]], "1": [[0, None]], "3": [[0, 40]]}, "membership": []}
    daemons = AlgorithmResult(accuracy=[0.9, 0.8, 0.7], bytes_sent=[1] * 3, messages_sent=[1] * 3, iterations=100,
                              seconds=3.0, history=history)  # fmt: skip
    table = results_table(SimulationResult(settings, {"p2pft": daemons}, "x"))
    assert [c.header for c in table.columns][1:4] == ["node 0", "node 1", "node 3"]
    cells = {c.header: [str(x) for x in c.cells] for c in table.columns}
    assert cells["node 3"] == ["70.0*", "crashed @40"]  # its note and star in its own column


def test_table_headers_name_nodes_by_the_ids_the_flags_use():
    # `--attack 2:signflip --churn leave:3@...`: the columns of nodes 2 and 3 are headed "node 2 (B)" and
    # "node 3", as the flags, logs and nodeI folders call them (they were "node 3 (B)" and "node 4")
    settings = {"nodes": 4, "data": "digits", "split": "iid", "topology": "ring"}
    result = AlgorithmResult(accuracy=[0.9, 0.9, 0.1, 0.8], bytes_sent=[1] * 4, messages_sent=[1] * 4, iterations=10,
                             seconds=1.0, attackers=[2])  # fmt: skip
    table = results_table(SimulationResult(settings, {"p2pft": result}, "x"))
    assert [c.header for c in table.columns][1:5] == ["node 0", "node 1", "node 2 (B)", "node 3"]
