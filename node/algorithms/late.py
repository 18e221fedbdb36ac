"""The weight P2P-FT gives a gradient that stays in use for several rounds (a slow node, `--sync async`).

The tracker adds each node's latest gradient every round. A node whose gradients each serve d rounds
(the rounds between two new ones) pulls every node d times towards where the run was when it computed
them: delayed feedback, whose gain grows with d. Pacing (`--pace-batch`, node/pace.py) keeps d at 1 by
shrinking the batch; what it cannot absorb (one sample still taking several rounds, a machine 50x or
more slower than the others) made whole runs fail: with a 200x node the simulator ended at 31% and
the daemons at 9-22% (a late gradient every 4-12 rounds; README "A machine 20x to 200x slower"). A
node that paces its batch therefore counts its gradient with weight min(1, LATE_ROUNDS / d), so a late
gradient pulls about as far in total as one that serves LATE_ROUNDS rounds (staleness-aware steps, as
in asynchronous SGD).

The weaker guarantee this buys, stated and tested (tests/test_async_exactness.py): the tracker sums the
weighted gradients exactly (sum tau plus mass in flight = sum of w_i g_i), so the run converges to the
minimiser of sum_i w_i L_i, where w_i = 1 for every node whose gradients serve LATE_ROUNDS rounds or
fewer; a slower node's data counts less, in proportion to how rarely its gradients come. Without
pacing (`--no-pace-batch`) every late gradient counts in full and the fixed point stays the exact one.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque

import torch

logger = logging.getLogger(__name__)

LATE_ROUNDS = 2  # a gradient that serves this many rounds or fewer keeps its full weight
LAG_GRADIENTS = 8  # d is the median of the rounds the last this many gradients served (and the current one's)


class LateGradientWeight:
    """Follows how many rounds each of a node's gradients serves and gives the weight to count it with."""

    def __init__(self, enabled: bool = False) -> None:
        self.late_rounds = LATE_ROUNDS  # read here, so a bench can set the module's value per run
        self.enabled = enabled
        self.served = 1  # rounds the gradient in use has served, this one included (tau^0 = g^0 serves round 1)
        self.intervals: deque[int] = deque(maxlen=LAG_GRADIENTS)  # rounds served by the last gradients
        self.value = 1.0
        self.damped_once = False

    def next_round(self, fresh: bool) -> float:
        """The weight of this round's gradient; `fresh`: whether it is a new one."""
        if not self.enabled:
            return self.value  # 1.0: nothing to follow
        if fresh:
            self.intervals.append(self.served)
            self.served = 1
        else:
            self.served += 1
        # the gradient in use counts as one more interval: a first gradient that takes 50 rounds is late
        # from the start, while one round of a passing load among gradients of a round each moves nothing
        rounds = statistics.median((*self.intervals, self.served))
        self.value = min(1.0, self.late_rounds / rounds)
        if self.value < 1 and not self.damped_once:
            self.damped_once = True
            logger.info(
                "this node's gradients each serve %g rounds even with a paced batch: the tracker counts them with "
                "weight %.2f (and less while they come later), so its data counts less (README: slow volunteers)",
                rounds,
                self.value,
            )
        return self.value

    def scale(self, grad: torch.Tensor) -> torch.Tensor:
        """`grad` counted with this round's weight (the same tensor while the weight is 1)."""
        return grad if self.value == 1 else self.value * grad
