"""SGP: stochastic gradient push (push-sum with de-biasing), for directed graphs.

Each node keeps a numerator x_i and a scalar weight w_i (w^0 = 1) and evaluates at z_i = x_i / w_i:

    x_i <- x_i - alpha * grad L_i(z_i)
    (x_i, w_i) <- sum_j b_ij (x_j, w_j)        push: j sends b_ij * (x_j, w_j), B column-stochastic

B needs only each sender's out-degree, so SGP runs on directed graphs; the weights w correct the bias
that a column-stochastic mix alone would leave.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Algorithm, Message, as_tensor, register


@register
class SGP(Algorithm):
    name = "sgp"
    phases = ("push",)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reset_links()

    def reset_links(self) -> None:
        """Restart push-sum from the de-biased parameters: mass lost with departed nodes is forgotten."""
        self.x = self.params.clone()
        self.w = 1.0

    def outgoing(self, phase: str, k: int) -> list[Message]:
        grad, self.last_loss = self.objective.gradient(self.x / self.w)
        self.x = self.x - self.step.lr(k) * self.step.direction(grad)
        hood = self.hood
        messages = []
        for d in hood.out_neighbours:
            share = hood.col_weight(d)
            weight = torch.tensor([share * self.w], dtype=torch.float64)  # float64: the mass must add up
            messages.append(Message(self.node, d, k, phase, "params", {"x": share * self.x, "w": weight}))
        return messages

    def incoming(self, phase: str, k: int, messages: Sequence[Message]) -> None:
        x, w = self.hood.self_col_weight * self.x, self.hood.self_col_weight * self.w
        for m in messages:
            if m.kind == "params" and m.src in self.hood.in_neighbours:
                x = x + as_tensor(m.tensors["x"]).to(x.dtype)
                w += float(as_tensor(m.tensors["w"])[0])
        self.x, self.w = x, w
        self.params = self.x / self.w
        self.iteration = k + 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), "x": self.x, "w": torch.tensor(self.w, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.x, self.w = state["x"].clone(), float(state["w"])
