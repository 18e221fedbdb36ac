"""SGP: stochastic gradient push (push-sum with de-biasing), for directed graphs.

Each node keeps a numerator x_i and a scalar weight w_i (w^0 = 1) and evaluates at z_i = x_i / w_i:

    x_i <- x_i - alpha * grad L_i(z_i)
    (x_i, w_i) <- sum_j b_ij (x_j, w_j)        push: j sends b_ij * (x_j, w_j), B column-stochastic

B needs only each sender's out-degree, so SGP runs on directed graphs; the weights w correct the bias
that a column-stochastic mix alone would leave. With `--robust clip` each in-neighbour's (x, w) is
clipped around this node's own share and the weights are leaky (robust.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from .base import PARAMS, Algorithm, Layouts, Message, as_tensor, register
from .robust import TRACKER_LEAK, clip_around

Share = tuple[int, torch.Tensor, float]  # (in-neighbour, its x share, its w share)


@register
class SGP(Algorithm):
    name = "sgp"
    label = "SGP"
    phases = ("push",)
    messages: ClassVar[Layouts] = {"push": {"params": ({"x": PARAMS, "w": 1},)}}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reset_links()

    def reset_links(self) -> None:
        """Restart push-sum from the de-biased parameters: mass lost with departed nodes is forgotten."""
        self.x = self.params.clone()
        self.w = 1.0

    def outgoing(self, phase: str, k: int) -> list[Message]:
        self.x = self.x - self.local_step(k, self.x / self.w)
        hood = self.hood
        messages = []
        for d in hood.out_neighbours:
            share = hood.col_weight(d)
            weight = torch.tensor([share * self.w], dtype=torch.float64)  # float64: the mass must add up
            messages.append(Message(self.node, d, k, phase, "params", {"x": share * self.x, "w": weight}))
        return messages

    def incoming(self, phase: str, k: int, messages: Sequence[Message]) -> None:
        x, w = self.hood.self_col_weight * self.x, self.hood.self_col_weight * self.w
        shares = [
            (m.src, as_tensor(m.tensors["x"]), float(as_tensor(m.tensors["w"])[0]))
            for m in messages
            if m.kind == "params" and m.src in self.hood.in_neighbours
        ]
        if self.clipping:
            shares = self._clipped(shares, x, w)
        for _, xj, wj in shares:
            x = x + xj.to(x.dtype)
            w += wj
        if self.clipping:  # leaky weights: pull w back towards 1, keeping x / w (robust.py)
            leaked = 1 + (1 - TRACKER_LEAK) * (w - 1)
            x, w = x * (leaked / w), leaked
        self.x, self.w = x, w
        self.params = self.x / self.w
        self.iteration = k + 1

    @staticmethod
    def _clipped(shares: list[Share], x: torch.Tensor, w: float) -> list[Share]:
        """Each in-neighbour's (x, w) clipped around this node's own share (x, w) of its mass."""
        xs = clip_around(x, {j: xj for j, xj, _ in shares})
        ws = clip_around(torch.tensor([w], dtype=torch.float64), {j: torch.tensor([wj]) for j, _, wj in shares})
        return [(j, xs[j], float(ws[j][0])) for j, _, _ in shares]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), "x": self.x, "w": torch.tensor(self.w, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.x, self.w = state["x"].clone(), float(state["w"])
