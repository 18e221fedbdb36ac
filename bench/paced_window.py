"""A paced node's small-batch gradients averaged over its last W rounds (simulator, P2P-FT): less
variance for a few rounds of lag, an experiment against plain `--pace-batch` (W = 1).

    .venv/bin/python bench/paced_window.py [--cases 5:1,5:3,10:1,10:4,10:10] [--seeds 0,1,2] [--json PATH]

Case FACTOR:W: node 3 of the paper's split is `simulate --sync async --slow 3:FACTOR` with
`--pace-batch` (a fresh gradient of 16 // FACTOR samples every round) and reports the mean of its
last W such gradients, each computed at its own round's parameters: W * (16 // FACTOR) samples
behind every value, the oldest W - 1 rounds old. The tracker still sums each node's latest value
(P2P-FT adds differences), so the fixed point is unchanged. 40 epochs, one torch thread per run.
"""

from __future__ import annotations

from collections import deque

import torch
from _slow_node import compare_paced_wrappers

from p2pnode.node.algorithms.base import Objective
from p2pnode.node.pace import ObjectiveWrapper


class WindowedGradients(ObjectiveWrapper):
    """The mean of the wrapped objective's last `window` gradients (`ObjectiveWrapper` delegates the rest)."""

    def __init__(self, objective: Objective, window: int) -> None:
        super().__init__(objective)
        self.recent: deque[torch.Tensor] = deque(maxlen=window)

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        grad, loss = self.objective.gradient(params)
        self.recent.append(grad)
        return torch.stack(tuple(self.recent)).mean(0), loss


def main() -> None:
    compare_paced_wrappers(
        __doc__.splitlines()[0], "5:1,5:3,10:1,10:4,10:10", WindowedGradients, "window", "window (rounds)"
    )


if __name__ == "__main__":
    main()
