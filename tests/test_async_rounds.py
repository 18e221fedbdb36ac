"""`--sync async` and `--slow` (issue 12): flags, the simulator's slow node, and a daemon testnet with a
node whose steps take 5x as long that still ends in consensus."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from p2pnode.cli.app import main
from p2pnode.node.pace import TimedGradients
from p2pnode.node.report import results_table
from p2pnode.node.run_status import RunStatus, status_tables
from p2pnode.node.settings import SimulateSettings, TestnetSettings
from p2pnode.node.simulator import AlgorithmResult, Simulation, SimulationResult
from p2pnode.node.testnet import _gradients, node_command, run_testnet
from p2pnode.protocol.membership import MemberInfo


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["simulate", "--slow", "3"], "give NODE:FACTOR"),
        (["simulate", "--slow", "7:2"], "NODE must be 0..3"),
        (["simulate", "--slow", "3:0.5"], "FACTOR must be a number from 1 to 1000"),
        (["simulate", "--slow", "3:1e9"], "FACTOR must be a number from 1 to 1000"),  # was taken: never a gradient
        (["simulate", "--slow", "3:nan"], "FACTOR must be a number from 1 to 1000"),
        (["simulate", "--slow", "3:2", "--slow", "3:4"], "names node 3 twice"),
        (["simulate", "--sync", "sometimes"], "unknown --sync 'sometimes'"),
        (["simulate", "--max-staleness", "0"], "--max-staleness must be at least 1"),
        (["simulate", "--pace-batch"], "--pace-batch needs --sync async"),
        (["simulate", "--late-mass", "0.5"], "--late-mass needs --sync async"),
        (["simulate", "--sync", "async", "--late-mass", "1.5"], "--late-mass must be a probability in [0, 1]"),
        (["testnet", "--pace-batch", "--sync", "wait", "--slow", "3:5"], "--pace-batch needs --sync async"),
        (["testnet", "--slow", "x:2"], "give NODE:FACTOR"),
        (["start", "--slowdown", "0.5"], "--slowdown must be a factor from 1 to 1000"),
        (["start", "--slowdown", "1001"], "--slowdown must be a factor from 1 to 1000"),
    ],
)
def test_bad_pace_flags_exit_2_with_one_line(argv, says, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    ("argv", "paced"),
    [
        (["--sync", "async"], True),
        (["--sync", "async", "--no-pace-batch"], False),
        (["--sync", "wait"], False),
        ([], False),
    ],
)
def test_a_slow_node_paces_its_batch_by_default_with_sync_async_and_only_there(argv, paced, tmp_path):
    from p2pnode.node.settings import build_settings

    flags = {"sync": argv[1] if argv else None, "pace_batch": False if "--no-pace-batch" in argv else None}
    assert build_settings(SimulateSettings, flags).pace_batch is paced
    # a testnet hands the resolved choice to every daemon, which would otherwise resolve it by its own --sync
    testnet = build_settings(TestnetSettings, flags)
    command = node_command(testnet, 0, ["/ip4/127.0.0.1/tcp/1/p2p/x"], tmp_path / "0")
    assert ("--pace-batch" in command) is paced and ("--no-pace-batch" in command) is not paced


def test_a_pace_batch_switch_that_is_not_true_or_false_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    from p2pnode.node.settings import BadInput, build_settings

    config = tmp_path / "run.toml"
    config.write_text('sync = "async"\npace-batch = "yes"\n')
    with pytest.raises(BadInput, match="pace_batch must be true or false"):
        build_settings(SimulateSettings, {}, config)
    monkeypatch.setenv("P2PNODE_PACE_BATCH", "maybe")
    assert main(["simulate", "--sync", "async"]) == 2
    err = capsys.readouterr().err.strip()
    assert "P2PNODE_PACE_BATCH" in err and len(err.splitlines()) == 1, err


def test_the_testnet_makes_only_the_named_node_slower(tmp_path):
    settings = TestnetSettings(slow=["2:3.5"]).validate()
    commands = [node_command(settings, i, ["/ip4/127.0.0.1/tcp/1/p2p/x"], tmp_path / str(i)) for i in range(4)]
    assert [c[c.index("--slowdown") + 1] if "--slowdown" in c else None for c in commands] == [None, None, "3.5", None]


@pytest.mark.timeout(300)
def test_an_asynchronous_simulation_gives_the_slow_node_one_gradient_per_factor_rounds_and_keeps_consensus():
    settings = SimulateSettings(epochs=2, sync="async", slow=["3:5"], pace_batch=False).validate()
    result = Simulation(settings).run("p2pft")
    rounds = result.iterations
    assert result.steps[:3] == [rounds] * 3
    assert result.steps[3] == pytest.approx(rounds / 5, abs=2)
    assert result.duration_steps == rounds  # the others never waited for it
    assert max(result.accuracy) - min(result.accuracy) <= 0.02
    lockstep = Simulation(SimulateSettings(epochs=2, slow=["3:5"]).validate()).run("p2pft")
    assert lockstep.steps == [rounds] * 4 and lockstep.duration_steps == 5 * rounds


@pytest.mark.timeout(300)
def test_a_paced_slow_node_takes_a_fresh_gradient_every_round_on_a_batch_that_fits_the_round():
    settings = SimulateSettings(epochs=2, sync="async", slow=["3:5"], batch_size=16).validate()  # paced by default
    result = Simulation(settings).run("p2pft")
    rounds = result.iterations
    assert result.steps == [rounds] * 4 and result.duration_steps == rounds
    draws = rounds + 1  # and tau^0 = g^0
    assert result.samples[:3] == [16 * draws] * 3 and result.samples[3] == 3 * draws  # 16 // 5 samples a round
    assert max(result.accuracy) - min(result.accuracy) <= 0.02


@pytest.mark.timeout(300)
@pytest.mark.parametrize("late", [0.0, 1.0])
def test_late_mass_holds_each_pushed_message_back_one_round_and_never_a_pulled_value(late):
    settings = SimulateSettings(epochs=1, sync="async", late_mass=late).validate()
    in_flight: dict[int, list[tuple[str, int]]] = {}

    def before_round(k, net):
        if k in (1, 2):
            in_flight[k] = sorted((m.phase, m.round) for m in net.in_flight())

    result = Simulation(settings).run("p2pft", on_round=before_round)
    links = 4  # directed ring: one out-link each
    late_pushes = [("push", 0)] * links, [("push", 1)] * links
    assert (in_flight[1], in_flight[2]) == (late_pushes if late else ([], []))
    assert max(result.accuracy) - min(result.accuracy) <= 0.02


def test_only_what_a_batch_of_one_cannot_absorb_is_left_to_late_gradients():
    from p2pnode.node.pace import StaleGradients, paced_batch, slow_objective

    assert [paced_batch(16, 16, f, 1.0) for f in (1.0, 2.0, 5.0, 10.0, 40.0)] == [16, 8, 3, 1, 1]
    assert paced_batch(4, 16, 0.1, 1.0) == 16  # a node that got faster grows back, never past --batch-size
    assert paced_batch(8, 16, 1.1, 1.0) == 8  # close enough to the others: no jitter
    assert paced_batch(1, 16, 0.7, 1.0) == 2  # fixed overheads: it still grows when under the others' time
    assert paced_batch(8, 16, 0.0, 1.0) == 8  # nothing measured yet: unchanged

    class Objective:
        batch_size = 16

    paced = slow_objective(Objective(), 5.0, pace_batch=True)
    assert not isinstance(paced, StaleGradients) and paced.batch_size == 3
    late = slow_objective(Objective(), 40.0, pace_batch=True)  # one sample takes 40/16 rounds
    assert isinstance(late, StaleGradients) and late.factor == 2.5 and late.batch_size == 1
    unpaced = slow_objective(Objective(), 5.0, pace_batch=False)
    assert isinstance(unpaced, StaleGradients) and unpaced.factor == 5.0 and unpaced.batch_size == 16


def test_a_daemons_gradient_thread_shrinks_the_batch_only_when_it_is_slower_than_the_others():
    from p2pnode.node.pace import PACE_WINDOW, SLOW_WINDOWS, WARMUP_GRADIENTS, BackgroundGradients

    class Objective:
        batch_size = 64

    def timed(gradients, *took: float) -> int:
        """The batch after gradients that took `took` seconds (a window of them each: PACE_WINDOW
        gradients, or fewer where each took several budgets)."""
        for t in took:
            for _ in range(PACE_WINDOW):
                gradients._pace_batch(t)
                if not gradients.window:  # decided
                    break
        return gradients.objective.batch_size

    def warmed_up() -> BackgroundGradients:
        gradients = BackgroundGradients(Objective(), lambda: False, lambda: 0.25, slow_ratio=1.5)
        for _ in range(WARMUP_GRADIENTS):
            gradients._pace_batch(0.25)  # warm-up costs never count
        assert gradients.objective.batch_size == 64 and not gradients.window
        return gradients

    slow = warmed_up()
    assert timed(slow, 1.0) == 64  # 4x the others' in one window: it could be a passing load
    assert timed(slow, 1.0) == 16  # and in the next: a slow machine
    assert timed(slow, 0.27) == 16  # close to their time: kept
    assert timed(slow, 0.15) == 26  # then faster than them: grows back towards --batch-size
    for _ in range(PACE_WINDOW - 1):
        slow._pace_batch(0.25)
    slow._pace_batch(50.0)  # one pause in a window does not move it
    assert slow.objective.batch_size == 26

    fast = warmed_up()
    assert timed(fast, 0.25, 0.30, 0.36) == 64  # up to 1.44x the others': noise between machines
    assert timed(fast, 0.25, 0.6, 0.25, 0.6, 0.25) == 64  # 2.4x in single windows: passing loads

    back = warmed_up()
    assert timed(back, 1.0, 1.0) == 16 and timed(back, 0.05) == 64  # paced, then fast again: the full batch
    assert timed(back, 1.0) == 64  # one slow window after coming back is a passing load again

    stuck = warmed_up()
    assert timed(stuck, 10.0, 10.0) == 1 and not stuck.gave_up  # 40x slower: one sample
    # each of its gradients spans rounds: it paces after one warm-up gradient and SLOW_WINDOWS more, not 13
    heavy = BackgroundGradients(Objective(), lambda: False, lambda: 0.25, slow_ratio=1.5)
    heavy._pace_batch(10.0)  # 40 budgets: a whole warm-up's worth, never counted
    assert heavy.objective.batch_size == 64 and not heavy.window
    for _ in range(SLOW_WINDOWS - 1):
        heavy._pace_batch(10.0)
        assert heavy.objective.batch_size == 64
    heavy._pace_batch(10.0)
    assert heavy.objective.batch_size == 1
    once = BackgroundGradients(Objective(), lambda: False, lambda: 0.25, slow_ratio=1.5)
    once._pace_batch(9.0)  # a first gradient's one-off costs: the warm-up, however long
    assert timed(once, 0.25, 0.25) == 64
    # a gradient of the fast machine's 2.4x counts as 2.4 of them: its window closes after three
    loaded = warmed_up()
    for _ in range(2):
        loaded._pace_batch(0.6)
    assert len(loaded.window) == 2
    loaded._pace_batch(0.6)
    assert not loaded.window and loaded.slow_windows == 1 and loaded.objective.batch_size == 64
    # one sample still takes 4x the others' but a tenth of the full batch's time: late by 4 budgets, not 40
    assert timed(stuck, 1.0, 1.0) == 1 and not stuck.gave_up
    in_vain = warmed_up()
    assert timed(in_vain, 1.0, 1.0) == 16  # 4x the others': a quarter of the batch
    assert timed(in_vain, 0.95) == 16 and not in_vain.gave_up  # as long as the full batch once: a loaded window
    assert timed(in_vain, 0.95) == 64 and in_vain.gave_up  # and again: fixed costs, not samples, are slow
    assert timed(in_vain, 1.0, 1.0) == 64  # and it stays so

    fixed_costs = warmed_up()
    assert timed(fixed_costs, 1.0, 1.0) == 16  # 4x the others': what a quarter of the time buys in proportion
    # a quarter of the batch takes half the full batch's time (fixed costs): twice the budget, yet it keeps
    # the batch its per-sample speed affords; shrinking on to 1-2 samples and giving up cost the daemons
    assert timed(fixed_costs, 0.5, 0.5, 0.5) == 16 and not fixed_costs.gave_up

    # the floor is what the others' time buys (0.2 s of a full batch's 1.0: 12 of 64), not the budget (0.3)
    floored = BackgroundGradients(Objective(), lambda: False, lambda: 0.3, slow_ratio=1.5, pace=lambda: 0.2)
    for _ in range(WARMUP_GRADIENTS):
        floored._pace_batch(0.3)
    assert timed(floored, 1.0, 1.0) == 19  # towards the budget first: 0.3 of 1.0
    assert timed(floored, 0.6) == 12  # twice the budget: shrinks, but not below 12
    assert timed(floored, 0.6, 0.6) == 12 and not floored.gave_up

    unpaced = BackgroundGradients(Objective(), lambda: False, None)
    assert timed(unpaced, 1.0, 1.0) == 64
    for g in (fast, slow, back, stuck, heavy, once, loaded, in_vain, fixed_costs, floored, unpaced):
        g.shutdown()


def test_a_paced_node_computes_its_gradient_at_the_value_it_sends_while_its_round_waits_for_the_others():
    """`--pace-batch`: a paced node starts its gradient when it sends its pull value (P2P-FT calls `start`),
    so the gradient runs while the round waits for the in-neighbours' values; the round takes that gradient,
    and only what is left of it holds the round. A node at the full batch computes at the mixed parameters."""
    from p2pnode.node.algorithms import ALGORITHMS, StepRule
    from p2pnode.node.algorithms.base import Message
    from p2pnode.node.pace import BackgroundGradients
    from p2pnode.node.topology import make_topology

    class Recording:
        batch_size, dim = 16, 2

        def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
            return 2 * params, 0.0

    gradients = BackgroundGradients(Recording(), lambda: False, lambda: 0.01)
    node = ALGORITHMS["p2pft"](
        make_topology("ring", 2).neighbourhood(0), gradients, torch.ones(2), StepRule(lambda k: 0.1)
    )
    node.send("pull", 0)  # at the full batch: nothing starts early
    assert gradients.running is None
    gradients.base.batch_size = 4  # paced
    (sent,) = node.send("pull", 1)
    assert gradients.running is not None
    time.sleep(0.05)  # the round waits for its in-neighbours' values meanwhile
    node.receive("pull", 1, [Message(1, 0, 1, "pull", "value", {"v": torch.full((2,), 5.0)})])
    assert torch.equal(node.grad, 2 * sent.tensors["v"]) and not torch.equal(node.grad, 2 * node.params)
    assert gradients.fresh and gradients.running is None
    (overlap,) = gradients.overlaps
    assert overlap >= 0.05
    assert gradients.round_wait_seconds == max(0.0, gradients.seconds - overlap)
    gradients.base.batch_size = 16
    assert gradients.round_wait_seconds == gradients.seconds  # at the full batch nothing ran early
    gradients.shutdown()


def test_a_paced_gradient_that_ran_before_its_round_asked_may_grow_by_that_time():
    """The time a paced gradient ran while its round waited for the in-neighbours' values cost the round
    nothing: its batch aims at the budget plus that time (the median of the recent ones)."""
    from p2pnode.node.pace import PACE_WINDOW, WARMUP_GRADIENTS, BackgroundGradients

    class Objective:
        batch_size = 64

    def paced_at_16() -> BackgroundGradients:
        gradients = BackgroundGradients(Objective(), lambda: False, lambda: 0.25, slow_ratio=1.5, pace=lambda: 0.1)
        for _ in range(WARMUP_GRADIENTS):
            gradients._pace_batch(0.25)
        for _ in range(2 * PACE_WINDOW):  # 4x the budget: it paces to a quarter once its windows say so
            gradients._pace_batch(1.0)
            if gradients.objective.batch_size < 64:
                break
        assert gradients.objective.batch_size == 16
        return gradients

    def after_a_window(gradients: BackgroundGradients, took: float) -> int:
        for _ in range(PACE_WINDOW):
            gradients._pace_batch(took)
        return gradients.objective.batch_size

    alone, overlapped = paced_at_16(), paced_at_16()
    overlapped.overlaps.extend([0.25] * PACE_WINDOW)  # each ran a budget before its round asked for it
    assert after_a_window(alone, 0.3) == 16  # 1.2x the budget: kept
    assert after_a_window(overlapped, 0.3) == 26  # 0.3 of a 0.5 room: grows
    assert after_a_window(overlapped, 0.5) == 26  # as long as the room: kept
    assert after_a_window(alone, 0.5) == 8  # without that time, twice the budget: halved
    # only the head start makes room for --batch-size: it stays one below, paced and started early (at the full
    # batch it would compute after mixing, be slow, and pace again)
    assert after_a_window(overlapped, 0.3) == 43 and after_a_window(overlapped, 0.3) == 63
    assert after_a_window(overlapped, 0.45) == 63
    assert after_a_window(overlapped, 0.1) == 64  # fast on its own: back to the full batch
    alone.shutdown()
    overlapped.shutdown()


def rendered_rows(table) -> dict[str, list[str]]:
    """{first cell: the node columns} for every row of a results table."""
    columns = [[str(c) for c in column.cells] for column in table.columns]
    nodes = columns[1:-2]  # method | node 1..n | mean | sent / node
    return {label: [column[i] for column in nodes] for i, label in enumerate(columns[0])}


def daemon_result(**fields) -> AlgorithmResult:
    return AlgorithmResult(accuracy=[0.9, 0.9, 0.9], bytes_sent=[1, 1, 1], messages_sent=[1, 1, 1], iterations=100,
                           seconds=3.0, **fields)  # fmt: skip


@pytest.mark.parametrize(("sync", "slow", "shown"), [("async", [], True), ("wait", ["2:5"], True), ("wait", [], False)])
def test_the_run_table_shows_each_daemons_pace_when_pace_is_the_point(sync, slow, shown):
    settings = {"nodes": 3, "data": "digits", "split": "iid", "topology": "ring", "sync": sync, "slow": slow}
    daemons = daemon_result(steps=[101, 99, 21], seconds_per_round=[0.0212, 0.0209, None])
    rows = rendered_rows(results_table(SimulationResult(settings, {"p2pft": daemons}, "x")))
    if not shown:
        assert not any(label.startswith(("ms / round", "new gradients")) for label in rows), rows
        return
    assert rows["ms / round (P2P-FT)"] == ["21.2", "20.9", ""]  # a node that did not finish has no pace
    assert rows["new gradients (P2P-FT)"] == ["101", "99", ""]


def test_a_run_whose_daemons_did_not_all_count_their_gradients_shows_its_pace_but_no_counts():
    # a result.json without the count (an older release) would read 0: the row is left out
    results = {0: {"gradients": 24, "rounds": 23}, 1: {"rounds": 23}, 2: {"rounds": 23}}
    assert _gradients(results, [0, 1, 2]) == []
    assert _gradients({0: {"gradients": 24}, 2: {"gradients": 9}}, [0, 1, 2]) == [24, 0, 9]
    settings = {"nodes": 3, "data": "digits", "split": "iid", "topology": "ring", "sync": "wait", "slow": ["0:5"]}
    daemons = daemon_result(steps=[], seconds_per_round=[0.05, 0.05, 0.05])
    rows = rendered_rows(results_table(SimulationResult(settings, {"p2pft": daemons}, "x")))
    assert rows["ms / round (P2P-FT)"] == ["50.0", "50.0", "50.0"]
    assert "new gradients (P2P-FT)" not in rows


@pytest.mark.timeout(400)
def test_an_asynchronous_testnet_with_a_5x_slower_node_ends_in_consensus(tmp_path):
    settings = TestnetSettings(
        workdir=str(tmp_path), run_id="async", epochs=3, sync="async", slow=["3:5"], timeout=300
    ).validate()
    run_result = run_testnet(settings)
    result = run_result.results["p2pft"]
    assert max(result.accuracy) - min(result.accuracy) <= 0.03, result.accuracy
    assert min(result.accuracy) > 0.3, result.accuracy  # it learned (chance is 0.1)
    node_results = [json.loads(Path(p).read_text()) for p in sorted(tmp_path.glob("node*/result.json"))]
    assert [r["rounds"] for r in node_results] == [result.iterations] * 4
    assert node_results[3]["settings"]["slowdown"] == 5.0
    # the weight each node's gradients counted with last: 1 for the fast nodes (a new gradient every round)
    assert [r["gradient_weight"] for r in node_results[:3]] == [1.0] * 3 and 0 < node_results[3]["gradient_weight"] <= 1
    # each node says how many of its rounds had a new gradient (at most one a round, plus its first)
    assert all(0 < r["gradients"] <= r["rounds"] + 1 for r in node_results), [r["gradients"] for r in node_results]
    # the run's table shows each daemon's pace and new gradients, from the same results
    assert result.steps == [r["gradients"] for r in node_results]
    assert result.seconds_per_round == [r["round_seconds"] / r["rounds"] for r in node_results]
    rows = rendered_rows(results_table(run_result))
    assert rows["ms / round (P2P-FT)"] == [f"{1000 * x:.1f}" for x in result.seconds_per_round]
    assert rows["new gradients (P2P-FT)"] == [str(r["gradients"]) for r in node_results]


def test_a_slow_local_learner_steps_only_on_a_new_gradient():
    """D-SGD, DIMAT and Local-FT step on their own gradient: a round without a new one must not step
    again on the old one (that would count the slow node's batch FACTOR times)."""
    import torch

    from p2pnode.node.algorithms import ALGORITHMS, StepRule
    from p2pnode.node.pace import StaleGradients
    from p2pnode.node.topology import make_topology

    class Pull:
        dim = 1

        def gradient(self, params):
            return torch.ones(1), 0.0  # always the same direction: every real step moves params by lr

    alone = make_topology("complete", 1).neighbourhood(0)
    node = ALGORITHMS["local"](alone, StaleGradients(Pull(), 3), torch.zeros(1), StepRule(lambda k: 1.0))
    trace = []
    for k in range(9):
        node.receive("local", k, [])
        trace.append(float(node.params))
    assert trace == [-1.0, -1.0, -1.0, -2.0, -2.0, -2.0, -3.0, -3.0, -3.0]  # one step per 3 rounds


@pytest.mark.timeout(300)
def test_asynchronous_dimat_with_a_slow_node_still_merges_every_epoch():
    common = dict(algorithm="dimat", nodes=3, split="iid", topology="ring", epochs=2, batch_size=64, lr=0.05)
    sim = Simulation(SimulateSettings(sync="async", slow=["2:4"], pace_batch=False, **common).validate())
    result = sim.run("dimat")
    assert [n.merges for n in sim.nodes] == [2, 2, 2]
    assert result.steps[2] < result.steps[0] / 3
    assert min(result.accuracy) > 0.5


def test_a_value_older_than_max_staleness_leaves_the_mix_but_its_pushed_mass_still_counts():
    import torch

    from p2pnode.node.algorithms import ALGORITHMS, StepRule
    from p2pnode.node.algorithms.base import Message
    from p2pnode.node.topology import make_topology

    class Flat:
        dim = 2

        def gradient(self, params):
            return torch.zeros(2), 0.0

    hood = make_topology("directed-ring", 2).neighbourhood(0)  # in- and out-neighbour: node 1
    node = ALGORITHMS["p2pft"](hood, Flat(), torch.zeros(2), StepRule(lambda k: 0.1))
    node.asynchronous, node.max_staleness = True, 5
    old_value = Message(1, 0, 3, "pull", "value", {"v": torch.ones(2)})
    mass = Message(1, 0, 3, "push", "delta", {"delta": torch.full((2,), 0.5)}, 1)
    node.send("pull", 20)
    node.receive("pull", 20, [old_value])
    assert torch.equal(node.params, torch.zeros(2))  # round 3 is more than 5 rounds before round 20
    node.send("push", 20)
    node.receive("push", 20, [mass])
    assert torch.allclose(node.tau, torch.full((2,), 0.5))  # the mass it pushed is applied all the same
    node.send("pull", 21)  # v = params - lr * tau = -0.05
    node.receive("pull", 21, [Message(1, 0, 18, "pull", "value", {"v": torch.ones(2)})])
    assert torch.allclose(node.params, torch.full((2,), 0.5 * -0.05 + 0.5 * 1.0))  # a fresh value is mixed


def node_d_in_round_10(others: list[MemberInfo], seconds: float, round_times: list[float]) -> SimpleNamespace:
    """What `RoundDriver.behind` and `gradient_budget` read of node D (members A-D, batch 16), in round 10
    with an in-neighbour already in round 11; its gradients take `seconds`."""
    return SimpleNamespace(
        peer_id="D",
        round=10,
        record=SimpleNamespace(members=("A", "B", "C", "D")),
        settings=SimpleNamespace(batch_size=16),
        algorithm=SimpleNamespace(objective=SimpleNamespace(round_wait_seconds=seconds)),
        agent=SimpleNamespace(infos=others, round_times=round_times),
        inbox=SimpleNamespace(newest_round=11),
    )


def test_a_node_waits_for_its_own_gradient_unless_that_would_make_its_rounds_much_longer():
    """`--sync async`: a node goes on with its last gradient only when an in-neighbour is ahead, its
    gradients take 1.5x the others' or longer, and waiting would add a fifth of a round or more. On a
    loaded machine gradients of a few ms vary 2x from one to the next: without the last condition a node
    as fast as the others went on without its gradient in 2-5% of its rounds."""
    from p2pnode.node.driver import RoundDriver

    def others(step: float, round_: int = 10) -> list[MemberInfo]:
        return [MemberInfo(p, "f", "s", 1, round=round_, step_seconds=step) for p in ("A", "B", "C")]

    node = node_d_in_round_10(others(0.004), seconds=0.007, round_times=[0.020] * 5)
    driver = RoundDriver(node)
    assert not driver.behind()  # 1.75x the others, but 3 ms on a 20 ms round: it waits
    node.algorithm.objective.round_wait_seconds = 0.020  # 5x: 16 ms more a round
    assert driver.behind()
    node.inbox.newest_round = 10  # nobody ahead: waiting holds nobody up
    assert not driver.behind()
    node.inbox.newest_round, node.agent.infos = 11, others(0.0)  # the others' pace not known yet
    assert not driver.behind()


def test_the_pace_a_slow_node_matches_leaves_out_members_that_pace_their_own_batch():
    """`--pace-batch` aims at the other members' gradient time. Counting members that shrank their batch
    to the others' pace made that target fall with every shrink: in a testnet with one 5x node the three
    equal ones went down to batches of 3-5 and the slow one to 1-2. Only gradients of the full
    --batch-size (or of a peer that does not say its batch) set the pace."""
    from p2pnode.node.driver import RoundDriver

    def info(peer: str, seconds: float, batch: int) -> MemberInfo:
        return MemberInfo(peer, "f", "s", 1, step_seconds=seconds, batch=batch)

    node = SimpleNamespace(
        peer_id="D",
        record=SimpleNamespace(members=("A", "B", "C", "D")),
        settings=SimpleNamespace(batch_size=16),
        agent=SimpleNamespace(infos=[info("A", 0.010, 16), info("B", 0.004, 5), info("C", 0.003, 3)]),
    )
    driver = RoundDriver(node)
    assert driver.pace() == 0.010  # B and C pace their batch: A alone is the pace (not 0.004)
    node.agent.infos = [info("A", 0.010, 16), info("B", 0.012, 0), info("C", 0.003, 3)]
    assert driver.pace() == 0.011  # a peer that does not say its batch counts as a full one
    node.agent.infos = [info("B", 0.004, 5), info("C", 0.003, 3), info("D", 0.010, 16)]
    assert driver.pace() is None  # only this node is at the full batch: no pace to aim at


def test_a_paced_gradient_may_take_the_others_time_plus_a_tenth_of_a_round_so_that_it_is_waited_for():
    """`--pace-batch`: with the default model a gradient is mostly fixed costs (5 ms, one sample 8-11 ms on a
    loaded machine). Aimed at the others' 5 ms alone, a 5x node gave up pacing and sent late gradients of
    16 samples, though its 39 ms rounds could wait for a batch of 4. The budget is the others' time plus
    half the share of a round a node waits for its own gradient, and a gradient within it is waited for."""
    from p2pnode.node.driver import WAIT_SHARE, RoundDriver

    others = [MemberInfo(p, "f", "s", 1, round=11, step_seconds=0.005, batch=16) for p in "ABC"]
    node = node_d_in_round_10(others, seconds=0.0, round_times=[])
    driver = RoundDriver(node)
    assert driver.gradient_budget() == pytest.approx(0.005)  # no round timed yet: the others' time
    node.agent.round_times = [0.040, 0.039, 0.038]
    budget = driver.gradient_budget()
    assert budget == pytest.approx(0.005 + WAIT_SHARE / 2 * 0.039)
    node.algorithm.objective.round_wait_seconds = budget  # a gradient that takes the whole budget is waited for
    assert not driver.behind()
    node.algorithm.objective.round_wait_seconds = 0.027  # the full batch of the 5x node is not
    assert driver.behind()
    node.agent.infos = []
    assert driver.gradient_budget() is None  # nobody's pace known: nothing to aim at


def test_gradients_in_lockstep_are_timed_and_counted_like_asynchronous_ones():
    class Sleepy:
        batch_size = 16

        def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
            time.sleep(0.02)
            return params * 2, 0.5

    timed = TimedGradients(Sleepy())
    assert timed.seconds is None
    for _ in range(3):
        grad, loss = timed.gradient(torch.ones(3))
    assert torch.equal(grad, torch.full((3,), 2.0)) and loss == 0.5
    assert timed.gradients == 3 and timed.fresh
    assert 0.02 <= timed.seconds < 1.0


def test_status_shows_how_long_each_members_gradients_take_on_what_batch_and_with_what_weight():
    def info(peer: str, seconds: float, batch: int, weight: float = 1.0) -> MemberInfo:
        return MemberInfo(peer, "f", "s", 1, step_seconds=seconds, batch=batch, gradient_weight=weight)

    infos = [info("a" * 12, 0.0123, 16), info("b" * 12, 2.5, 3), info("c" * 12, 0.0, 0), info("d" * 12, 9.0, 1, 0.4)]
    members = status_tables(RunStatus("r", None, infos))[1]
    column = {c.header: list(c.cells) for c in members.columns}
    assert column["gradient"] == ["12.3 ms", "2.50 s", "-", "9.00 s"]  # "-": no round yet
    # 3: a slow member paced below the run's batch; 0.4: one whose batch of 1 still comes late (late.py)
    assert column["batch"] == ["16", "3", "-", "1, weight 0.40"]


async def waited(inbox, phase: str, k: int, limit: float) -> float:
    """Seconds `inbox.wait_for_lag` took for in-neighbour 1's `phase` message of round k."""
    started = time.perf_counter()
    await inbox.wait_for_lag(phase, k, (1,), 0, limit, set)
    return time.perf_counter() - started


def test_an_asynchronous_round_waits_for_each_phase_of_its_own_and_a_push_does_not_stand_in_for_a_pull():
    """`--sync async` waits per phase: P2P-FT's push of round k says nothing about whether the pull of
    round k has come (per sender, as before, a push let a later wait for a pull end early), and a frame
    held for an epoch counts as come once the node enters it (else the node would wait out its limit)."""
    import asyncio

    from p2pnode.node.rounds import Inbox
    from p2pnode.protocol.message import Message

    def msg(src: int, round_: int, phase: str) -> Message:
        return Message(src, 0, round_, phase, "value", {"v": torch.zeros(1)})

    async def scenario() -> tuple[float, ...]:
        inbox = Inbox()
        inbox.put(msg(1, 5, "push"))
        pull_not_come = await waited(inbox, "pull", 5, 0.3)
        push_come = await waited(inbox, "push", 5, 0.3)
        inbox.put(msg(1, 5, "pull"))
        pull_come = await waited(inbox, "pull", 5, 0.3)
        # a pull of round 6 of epoch 2, held while this node is still in epoch 1
        assert inbox.hold("B", SimpleNamespace(epoch=2, nbytes=4))
        held_not_entered = await waited(inbox, "pull", 6, 0.3)
        assert inbox.enter_epoch(2, lambda sender, env: msg(1, 6, "pull")) == 1
        held_entered = await waited(inbox, "pull", 6, 0.3)
        return pull_not_come, push_come, pull_come, held_not_entered, held_entered

    pull_not_come, push_come, pull_come, held_not_entered, held_entered = asyncio.run(scenario())
    assert pull_not_come >= 0.25 and held_not_entered >= 0.25  # waited out its limit: nothing had come
    assert push_come < 0.1 and pull_come < 0.1 and held_entered < 0.1


def test_an_asynchronous_round_waits_for_pushed_mass_only_while_every_member_keeps_pace():
    """A slow member's push goes out only after its gradient, and waiting for the pushes around it chains
    every round through its wait for that gradient: with a slow member no round waits for pushed mass
    (first-phase messages, sent at the run's pace, are still waited for). A member that paces its batch
    keeps pace however long its gradients take: its pushes are waited for (taken a round late, half of
    them cost 1.2 points in the simulator, `simulate --late-mass 0.5`)."""
    from p2pnode.node.driver import RoundDriver

    def infos(steps: dict[str, float], batches: dict[str, int] | None = None) -> list[MemberInfo]:
        batches = batches or {}
        return [MemberInfo(p, "f", "s", 1, step_seconds=s, batch=batches.get(p, 16)) for p, s in steps.items()]

    node = SimpleNamespace(
        peer_id="A",
        settings=SimpleNamespace(batch_size=16),
        record=SimpleNamespace(members=("A", "B", "C", "D"), rank=(0,)),
        agent=SimpleNamespace(infos=infos({"A": 0.005, "B": 0.005, "C": 0.006, "D": 0.007}), record=None),
        transport=SimpleNamespace(index_of={"A": 0, "B": 1, "C": 2, "D": 3}),
        inbox=SimpleNamespace(held=[]),
    )
    driver = RoundDriver(node)
    assert driver.excluded_in_later_phases() == set()  # 1.4x the median: every member keeps pace
    node.agent.infos = infos({"A": 0.005, "B": 0.005, "C": 0.006, "D": 0.025})
    assert driver.excluded_in_later_phases() == {0, 1, 2, 3}  # D is 5x the median
    node.agent.infos = infos({"A": 0.005, "B": 0.005, "C": 0.006, "D": 0.012}, {"D": 3})
    assert driver.excluded_in_later_phases() == set()  # D paces its batch: its pushes are waited for
    node.agent.infos = infos({"A": 0.005, "B": 0.005, "C": 0.006, "D": 0.012}, {"D": 0})
    assert driver.excluded_in_later_phases() == {0, 1, 2, 3}  # an older peer that does not say its batch
    node.agent.infos = infos({"A": 0.030, "B": 0.005, "C": 0.006, "D": 0.007})
    assert driver.excluded_in_later_phases() == {0, 1, 2, 3}  # so is this node itself
    node.agent.infos = infos({"A": 0.0, "B": 0.0, "C": 0.0, "D": 0.025})
    assert driver.excluded_in_later_phases() == set()  # the others' pace not known yet
    assert driver.excluded() == set()


def test_an_asynchronous_round_gives_an_in_neighbour_that_missed_its_last_deadline_only_the_short_grace(monkeypatch):
    """As with `--sync wait`: a crashed in-neighbour costs one whole round limit, then the short grace per
    round until the run's epoch leaves it out (before, every round waited the whole limit: 60 s by default)."""
    import asyncio

    from p2pnode.node import rounds
    from p2pnode.node.rounds import Inbox
    from p2pnode.protocol.message import Message

    monkeypatch.setattr(rounds, "ABSENT_GRACE_S", 0.1)

    async def scenario() -> tuple[float, float, float]:
        inbox = Inbox()
        first = await waited(inbox, "pull", 0, 0.6)  # nothing from node 1: it misses the deadline
        second = await waited(inbox, "pull", 1, 0.6)  # it missed the last one: the short grace only
        inbox.put(Message(1, 0, 2, "pull", "value", {"v": torch.zeros(1)}))
        inbox.take("pull", 2)
        present_again = await waited(inbox, "pull", 3, 0.6)  # it sent again: the whole limit once more
        return first, second, present_again

    first, second, present_again = asyncio.run(scenario())
    assert first >= 0.55 and present_again >= 0.55
    assert second < 0.4


def test_an_asynchronous_round_holds_a_neighbours_next_round_messages_for_their_round():
    """A neighbour ahead has sent rounds k and k + 1 when this node mixes round k: it takes round k's value
    and mass only (taken early, the next round's cost 0.6-1.1 points on digits) and finds round k + 1's in
    its own round k + 1; none is dropped."""
    from p2pnode.node.rounds import Inbox
    from p2pnode.protocol.message import Message

    inbox = Inbox()
    for r in (3, 4, 5):
        inbox.put(Message(1, 0, r, "push", "mass", {"s": torch.full((1,), float(r))}))
    inbox.put(Message(2, 0, 6, "push", "mass", {"s": torch.zeros(1)}))

    assert [(m.src, m.round) for m in inbox.take("push", 3)] == [(1, 3)]
    assert [(m.src, m.round) for m in inbox.take("push", 4)] == [(1, 4)]
    assert [(m.src, m.round) for m in inbox.take("push", 6)] == [(1, 5), (2, 6)]
    assert inbox.take("push", 7) == []


def test_a_silent_in_neighbour_misses_one_deadline_per_asynchronous_phase():
    """The wait judges the deadline and taking what came does not judge it again: counted by both, a
    silent neighbour missed two deadlines a phase and reached SILENT_ROUNDS within one P2P-FT round."""
    import asyncio

    from p2pnode.node.rounds import Inbox

    async def one_phase() -> dict[int, int]:
        inbox = Inbox()
        await inbox.wait_for_lag("pull", 0, (1,), 0, 0.05, set)
        inbox.take("pull", 0)
        return dict(inbox.misses)

    assert asyncio.run(one_phase()) == {1: 1}


def test_a_push_not_waited_for_around_a_slow_member_costs_no_deadline_and_the_next_pull_waits_its_whole_limit(
    monkeypatch,
):
    """Around a slow member the push phase waits for nobody (`excluded_in_later_phases`): an in-neighbour
    whose push has not come yet missed no deadline, so the next pull still waits for it up to the limit,
    not the short grace of an absent one (which dropped its pull when its gradient took 2 s longer)."""
    import asyncio

    from p2pnode.node import rounds
    from p2pnode.node.rounds import Inbox
    from p2pnode.protocol.message import Message

    monkeypatch.setattr(rounds, "ABSENT_GRACE_S", 0.1)

    async def scenario() -> tuple[list[Message], float]:
        inbox = Inbox()
        loop = asyncio.get_running_loop()
        inbox.put(Message(1, 0, 0, "pull", "value", {"v": torch.zeros(1)}))
        await inbox.wait_for_lag("pull", 0, (1,), 0, 2.0, set)
        inbox.take("pull", 0)
        await inbox.wait_for_lag("push", 0, (1,), 0, 2.0, lambda: {1})  # not waited for
        inbox.take("push", 0)
        loop.call_later(0.3, inbox.put, Message(1, 0, 1, "pull", "value", {"v": torch.ones(1)}))
        started = time.perf_counter()
        await inbox.wait_for_lag("pull", 1, (1,), 0, 2.0, set)
        return inbox.take("pull", 1), time.perf_counter() - started

    taken, seconds = asyncio.run(scenario())
    assert [(m.src, m.round) for m in taken] == [(1, 1)]
    assert 0.25 <= seconds < 1.5


def test_asynchronous_rounds_in_which_nobody_sends_do_not_count_as_missed():
    """Asynchronous DIMAT sends only at merge rounds; counting the rounds between as missed reported live
    neighbours silent once an epoch took longer than SILENT_SECONDS (and the coordinator then dropped them)."""
    import asyncio

    from p2pnode.node.driver import RoundDriver
    from p2pnode.node.rounds import Inbox

    reported: list[str] = []

    async def send_all(out: list) -> None:
        return None

    algo = SimpleNamespace(
        phases=("model",),
        asynchronous=True,
        send=lambda phase, k: [],
        expects_messages=lambda phase, k: k % 5 == 4,
        hood=SimpleNamespace(in_neighbours=(1,)),
        params=SimpleNamespace(device=torch.device("cpu")),
        receive=lambda phase, k, arrived: None,
    )
    node = SimpleNamespace(
        algorithm=algo,
        compute=None,
        transport=SimpleNamespace(send_all=send_all, reach=lambda late: None),
        inbox=Inbox(silent_seconds=0.0),
        settings=SimpleNamespace(round_timeout=5.0),
        log=SimpleNamespace(wait_seconds=0.0),
        agent=SimpleNamespace(report_silent=reported.append),
        record=SimpleNamespace(members=("A", "B")),
    )
    driver = RoundDriver(node)

    async def rounds_without_merges() -> None:
        for k in range(4):
            await driver.run_round(k)

    asyncio.run(rounds_without_merges())
    assert node.inbox.misses == {} and reported == []


def _fixed_cost_objective(monkeypatch) -> tuple[SimpleNamespace, object]:
    """A fake clock for node/pace.py (what it slept is recorded) and an objective of --batch-size 16
    whose gradient advances that clock by its `seconds` (10 ms) whatever its batch."""
    from p2pnode.node import pace

    clock = SimpleNamespace(now=0.0, slept=[])
    monkeypatch.setattr(pace, "time", SimpleNamespace(perf_counter=lambda: clock.now, sleep=clock.slept.append))

    class FixedCost:
        batch_size = 16
        seconds = 0.010

        def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
            clock.now += self.seconds
            return params, 0.0

    return clock, FixedCost()


def test_a_slowed_machines_extra_time_scales_with_the_batch_it_computes(monkeypatch):
    """`--slowdown F` emulates a machine F times slower per sample: the full batch sleeps (F - 1) times
    its gradients' time (the median of the run's, so a gradient slowed by other work on the machine is
    not slowed F - 1 times more); a quarter of the batch a quarter of that, even though the digits
    model's own gradient takes as long at any batch (fixed costs), so `--pace-batch` can pace an
    emulated slow node."""
    from p2pnode.node.pace import SlowedGradients

    clock, base = _fixed_cost_objective(monkeypatch)  # 10 ms whatever the batch
    slowed = SlowedGradients(base, factor=5.0)
    for _ in range(3):
        slowed.gradient(torch.zeros(1))
    base.batch_size = 4
    slowed.gradient(torch.zeros(1))
    assert clock.slept[:3] == pytest.approx([0.040] * 3)
    assert clock.slept[3] == pytest.approx(0.010)  # (5 - 1) x 10 ms x 4 / 16; before, 40 ms again
    base.batch_size, base.seconds = 16, 0.030
    slowed.gradient(torch.zeros(1))  # a full batch slowed to 30 ms by other work on the machine
    assert clock.slept[4] == pytest.approx(0.040)  # the median's extra time, not 4 x 30 ms


def test_a_slowed_machine_does_not_multiply_a_passing_load_into_its_speed(monkeypatch):
    """`--slowdown F`'s sleep follows the run's full-batch gradients, not the last few: two windows of
    gradients slowed by the other daemons on the machine (10 of them at 1.7x) must not make an emulated
    machine as fast as the others 1.7x slower (F - 1 times the load), or it paces its batch for nothing.
    With the median of the last 15 the sleep jumped to (F - 1) x 17 ms."""
    from p2pnode.node.pace import SlowedGradients

    clock, base = _fixed_cost_objective(monkeypatch)
    slowed = SlowedGradients(base, factor=10.0)
    for _ in range(100):  # the machine's usual speed
        slowed.gradient(torch.zeros(1))
    base.seconds = 0.017  # a passing load: two pacing windows' worth of slow gradients
    for _ in range(10):
        slowed.gradient(torch.zeros(1))
    assert clock.slept[-1] == pytest.approx(9 * 0.010)
    base.seconds, base.batch_size = 0.010, 8  # paced: half the batch sleeps half the usual extra time
    slowed.gradient(torch.zeros(1))
    assert clock.slept[-1] == pytest.approx(9 * 0.010 / 2)


def test_a_daemons_objective_is_timed_in_lockstep_and_computed_beside_the_rounds_with_async():
    from types import SimpleNamespace

    from p2pnode.node.pace import BackgroundGradients, SlowedGradients, TimedGradients, daemon_objective
    from p2pnode.node.settings import NodeSettings

    class Doubling:
        batch_size = 16

        def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
            return params * 2, 0.5

    driver = SimpleNamespace(behind=lambda: False, gradient_budget=lambda: None, pace=lambda: None)
    lockstep = daemon_objective(Doubling(), NodeSettings(), driver)
    assert type(lockstep) is TimedGradients and type(lockstep.objective) is Doubling
    slowed = daemon_objective(Doubling(), NodeSettings(slowdown=5, sync="async", pace_batch=True), driver)
    assert type(slowed) is BackgroundGradients and type(slowed.objective) is SlowedGradients
    assert slowed.budget is driver.gradient_budget and slowed.pace is driver.pace
    late = daemon_objective(Doubling(), NodeSettings(sync="async", pace_batch=False), driver)
    assert late.budget is None and type(late.objective) is Doubling
    for objective in (slowed, late):
        objective.shutdown()
