"""A paced node's small-batch gradients made into a STORM estimator (Cutkosky and Orabona 2019; in
gradient tracking: GT-HSGD, Xin, Khan and Kar 2021), simulator, P2P-FT: an experiment against plain
`--pace-batch`, for the 10x node whose one-sample gradients miss the 1-point target.

    .venv/bin/python bench/paced_storm.py [--cases 10:100,10:10,10:30] [--seeds 0,1,2] [--json PATH]

Case FACTOR:A: node 3 of the paper's split is `simulate --sync async --slow 3:FACTOR` with
`--pace-batch` (a fresh batch of 16 // FACTOR samples every round) and reports

    v_t = g(x_t; B_t) + (1 - A/100) (v_{t-1} - g(x_{t-1}; B_t)),

the same batch B_t at this round's and the last round's parameters: an average over about 100/A
rounds of samples whose lag is corrected by the difference term (unlike a plain window's), at twice
the per-round cost (A = 100 is plain `--pace-batch`, one gradient a round). The tracker sums each
node's latest value, so the fixed point is unchanged. 40 epochs, one torch thread per run.
"""

from __future__ import annotations

import torch
from _slow_node import compare_paced_wrappers

from p2pnode.node.algorithms.base import Objective
from p2pnode.node.pace import ObjectiveWrapper, unwrapped


class StormGradients(ObjectiveWrapper):
    """v_t = g(x_t; B) + (1 - a) (v_{t-1} - g(x_{t-1}; B)) on the wrapped objective's batches."""

    def __init__(self, objective: Objective, a: float) -> None:
        super().__init__(objective)
        self.a = a
        self.base = unwrapped(objective)
        self.previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (x_{t-1}, v_{t-1})

    def _grad(self, params: torch.Tensor, batch) -> tuple[torch.Tensor, float]:
        leaf = params.detach().requires_grad_(True)
        loss = self.base.loss(leaf, batch)
        (grad,) = torch.autograd.grad(loss, leaf)
        return grad, float(loss.detach())

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        batch = self.base.next_batch()
        grad, loss = self._grad(params, batch)
        self.gradients += 1
        if self.previous is not None and self.a < 1:
            before, v = self.previous
            grad = grad + (1 - self.a) * (v - self._grad(before, batch)[0])
        self.previous = (params.detach().clone(), grad)
        return grad, loss


def storm_percent(objective: Objective, a_percent: int) -> StormGradients:
    return StormGradients(objective, a_percent / 100)


def main() -> None:
    compare_paced_wrappers(__doc__.splitlines()[0], "10:100,10:10,10:30", storm_percent, "a_percent", "A (%)")


if __name__ == "__main__":
    main()
