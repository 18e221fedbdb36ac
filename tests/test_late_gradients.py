"""How P2P-FT weighs a gradient that serves several rounds (node/algorithms/late.py)."""

from __future__ import annotations

import pytest
import torch

from p2pnode.node.algorithms import ALGORITHMS, StepRule
from p2pnode.node.algorithms.late import LATE_ROUNDS, LateGradientWeight
from p2pnode.node.settings import SimulateSettings
from p2pnode.node.topology import make_topology


def weights(fresh: list[bool], enabled: bool = True) -> list[float]:
    late = LateGradientWeight(enabled=enabled)
    return [late.next_round(f) for f in fresh]


def test_a_gradient_every_round_or_every_late_rounds_keeps_its_full_weight():
    assert weights([True] * 20) == [1.0] * 20
    assert weights([False, True] * 10) == [1.0] * 20  # each serves LATE_ROUNDS = 2 rounds


def test_gradients_that_each_serve_five_rounds_count_with_late_rounds_over_five():
    w = weights(([False] * 4 + [True]) * 20)
    assert w[-40:] == [LATE_ROUNDS / 5] * 40


def test_a_first_gradient_that_takes_fifty_rounds_is_damped_while_it_ages():
    w = weights([False] * 49)
    assert w[0] == 1.0 and w[9] == LATE_ROUNDS / 11 and w[-1] == LATE_ROUNDS / 50


def test_one_slow_round_among_gradients_of_a_round_each_moves_nothing():
    assert weights([True] * 10 + [False, False, True] + [True] * 5) == [1.0] * 18


def test_the_weight_stays_one_when_pacing_is_off():
    assert weights(([False] * 4 + [True]) * 5, enabled=False) == [1.0] * 25


class Slow:
    """A least-squares-like objective whose gradients are new only every `period` calls."""

    dim = 2

    def __init__(self, period: int) -> None:
        self.period, self.calls, self.fresh = period, 0, True

    def gradient(self, params):
        self.calls += 1
        self.fresh = self.calls % self.period == 1 or self.period == 1
        return torch.ones(self.dim, dtype=torch.float64), 0.0


@pytest.mark.parametrize(
    ("sync", "pace_batch", "damped"), [("async", True, True), ("async", False, False), ("wait", None, False)]
)
def test_p2pft_damps_late_gradients_only_with_sync_async_and_a_paced_batch(sync, pace_batch, damped):
    settings = SimulateSettings(sync=sync, pace_batch=pace_batch).validate()
    hood = make_topology("complete", 2).neighbourhood(0)
    node = ALGORITHMS["p2pft"](hood, Slow(5), torch.zeros(2, dtype=torch.float64), StepRule(lambda k: 0.1))
    node.configure(iterations_per_epoch=10, settings=settings)
    for k in range(30):
        node.incoming("pull", k, [])
    assert (node.late.value < 1) is damped
    assert torch.equal(node.grad, torch.full((2,), node.late.value, dtype=torch.float64))
