"""SGP, CDSGD and the DIMAT family (dimat, wa, wm) on the shared algorithm interface."""

from __future__ import annotations

import pytest
import torch
from test_exactness import problem, ring_with_chord

from p2pnode.node.algorithms import ALGORITHMS, StepRule
from p2pnode.node.engine import InMemoryNetwork
from p2pnode.node.errors import BadInput
from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation
from p2pnode.node.topology import Topology, make_topology


def run_least_squares(name: str, topo: Topology, iterations: int, lr: float = 0.002, check=None):
    objectives, x_star = problem()
    x0 = torch.zeros(objectives[0].dim, dtype=torch.float64)
    nodes = [ALGORITHMS[name](topo.neighbourhood(i), o, x0, StepRule(lambda k: lr)) for i, o in enumerate(objectives)]
    net = InMemoryNetwork(nodes)
    for k in range(iterations):
        net.iteration(k)
        if check is not None:
            check(nodes)
    return nodes, x_star


def test_sgp_conserves_push_sum_weight_and_its_constant_step_bias_shrinks_with_the_step():
    totals: list[float] = []
    nodes, x_star = run_least_squares(
        "sgp", ring_with_chord(8), 4000, check=lambda ns: totals.append(sum(n.w for n in ns))
    )
    assert max(abs(t - 8.0) for t in totals) < 1e-9  # column-stochastic pushes conserve the weight mass
    coarse = max(float((n.params - x_star).norm() / x_star.norm()) for n in nodes)
    nodes, _ = run_least_squares("sgp", ring_with_chord(8), 16000, lr=0.0005)
    fine = max(float((n.params - x_star).norm() / x_star.norm()) for n in nodes)
    # a constant step leaves an O(alpha) bias (DESIGN §2): a quarter of the step, a much smaller error
    assert fine < 0.4 * coarse, (coarse, fine)


def test_sgp_without_weights_would_be_biased_so_the_weights_are_not_all_one():
    nodes, _ = run_least_squares("sgp", ring_with_chord(8), 50)
    assert max(abs(n.w - 1.0) for n in nodes) > 1e-3  # the chord makes B column- but not row-stochastic


@pytest.mark.parametrize("spec,n", [("ring", 5), ("complete", 4), ("ring", 2)])
def test_metropolis_weights_are_doubly_stochastic_on_undirected_graphs(spec, n):
    topo = make_topology(spec, n)
    pi = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        h = topo.neighbourhood(i)
        pi[i, i] = h.self_metropolis_weight
        for j in h.in_neighbours:
            pi[i, j] = h.metropolis_weight(j)
    assert torch.allclose(pi, pi.T)
    assert torch.allclose(pi.sum(0), torch.ones(n, dtype=torch.float64))
    assert (pi >= 0).all()


def test_cdsgd_mixing_preserves_the_network_average_where_row_stochastic_dsgd_drifts():
    # an undirected star: the hub has degree 4, the leaves 1, so a_ij = 1/(deg_i + 1) is not doubly stochastic
    star = Topology(5, frozenset({(0, j) for j in range(1, 5)} | {(j, 0) for j in range(1, 5)}), "star")
    objectives, _ = problem(n=5)
    starts = [torch.full((objectives[0].dim,), float(i), dtype=torch.float64) for i in range(5)]
    means = {}
    for name in ("cdsgd", "dsgd"):
        nodes = [
            ALGORITHMS[name](star.neighbourhood(i), o, x0, StepRule(lambda k: 0.0))
            for i, (o, x0) in enumerate(zip(objectives, starts, strict=True))
        ]
        net = InMemoryNetwork(nodes)
        for k in range(50):
            net.iteration(k)
        means[name] = float(sum(n.params for n in nodes)[0] / 5)
    assert means["cdsgd"] == pytest.approx(2.0, abs=1e-12)  # the mean of 0..4
    assert abs(means["dsgd"] - 2.0) > 0.1


@pytest.mark.parametrize("algorithm", ["dimat", "wa", "wm", "cdsgd"])
def test_algorithms_that_merge_with_doubly_stochastic_weights_refuse_a_directed_topology(algorithm):
    with pytest.raises(BadInput, match="undirected"):
        SimulateSettings(algorithm=algorithm, topology="directed-ring").validate()


def test_merge_every_must_be_positive():
    with pytest.raises(BadInput, match="merge-every"):
        SimulateSettings(algorithm="dimat", topology="ring", merge_every=0).validate()


def test_dimat_merges_at_the_end_of_every_merge_every_th_epoch_after_the_warmup():
    dimat = ALGORITHMS["dimat"].__new__(ALGORITHMS["dimat"])
    dimat.iterations_per_epoch, dimat.merge_every, dimat.warmup_epochs = 3, 2, 2
    merges = [k for k in range(18) if dimat.is_merge(k)]
    assert merges == [11, 17]  # epochs 4 and 6 end there; epoch 2 is still warm-up


@pytest.mark.timeout(180)
@pytest.mark.parametrize("algorithm", ["dimat", "wa", "wm"])
def test_dimat_family_trains_on_digits_and_sends_only_at_merges(algorithm):
    settings = SimulateSettings(
        algorithm=algorithm,
        nodes=3,
        split="iid",
        topology="ring",
        epochs=2,
        batch_size=64,
        lr=0.05,
        merge_every=1,
        model="vit_digits_4px",  # 2 epochs are too few for the default vit_digits to pass 50%
    ).validate()
    sim = Simulation(settings)
    result = sim.run(algorithm)
    assert all(n.merges == 2 for n in sim.nodes)
    # 2 merges x 2 neighbours x 34,250 float32 parameters
    assert result.bytes_sent == [2 * 2 * 34250 * 4] * 3
    assert all(0.5 < a <= 1.0 for a in result.accuracy), result.accuracy
