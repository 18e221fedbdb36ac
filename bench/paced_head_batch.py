"""A paced node whose head gradient comes from more samples than its block gradient (simulator, P2P-FT).

    .venv/bin/python bench/paced_head_batch.py [--cases 5:3,5:16,10:1,10:16] [--seeds 0,1,2] [--json PATH]

Case FACTOR:H: node 3 of the paper's split is `simulate --sync async --slow 3:FACTOR` with `--pace-batch`
(a fresh gradient of B = 16 // FACTOR samples every round), and the gradient of the final norm and the
head is the mean over H >= B samples: the paced batch and H - B more drawn from the node's own pass.
Both parts stay unbiased estimates of the node's gradient, so the tracker's fixed point is unchanged.
A head-only gradient needs the block's forward but not its backward (about a third of a sample's cost),
so the H - B extra samples are not free: H = 16 is the upper bound of what the idea could give.
40 epochs, one torch thread per run.
"""

from __future__ import annotations

import torch
from _slow_node import compare_paced_wrappers

from p2pnode.node.algorithms.base import Objective
from p2pnode.node.pace import ObjectiveWrapper, unwrapped

HEAD_PARTS = ("norm.", "head.")  # after the last block: cheap to differentiate once its forward is done


class HeadFromMoreSamples(ObjectiveWrapper):
    """The wrapped (paced) gradient with its norm-and-head part averaged over `head_batch` samples."""

    def __init__(self, objective: Objective, head_batch: int) -> None:
        super().__init__(objective)
        self.head_batch = head_batch
        model = unwrapped(objective).model
        sizes = dict(zip(model._names, model._sizes, strict=True))
        self.head_size = sum(n for name, n in sizes.items() if name.startswith(HEAD_PARTS))

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        grad, loss = self.objective.gradient(params)
        base = unwrapped(self.objective)
        batch, extra = base.batch_size, self.head_batch - base.batch_size
        if extra <= 0:
            return grad, loss
        base.batch_size = extra
        try:
            more, _ = base.gradient(params)
        finally:
            base.batch_size = batch
        grad = grad.clone()
        head = slice(grad.numel() - self.head_size, None)
        grad[head] = (batch * grad[head] + extra * more[head]) / self.head_batch
        return grad, loss


def main() -> None:
    compare_paced_wrappers(
        __doc__.splitlines()[0], "5:3,5:16,10:1,10:16", HeadFromMoreSamples, "head_batch", "head batch"
    )


if __name__ == "__main__":
    main()
