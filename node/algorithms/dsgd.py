"""D-PSGD / CDSGD (the P2P-FT paper's eq. 1): mix with in-neighbours, step along the local gradient.

theta_i^{k+1} = sum_j a_ij theta_j^k - alpha grad L_i(theta_i^k)
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Algorithm, Message, register


@register
class DSGD(Algorithm):
    name = "dsgd"
    phases = ("mix",)

    def outgoing(self, phase: str, k: int) -> list[Message]:
        return self._to_out_neighbours(phase, k, "value", theta=self.params)

    def incoming(self, phase: str, k: int, messages: Sequence[Message]) -> None:
        grad, self.last_loss = self.objective.gradient(self.params)
        mixed = self._mix(self.params, messages, "theta")
        self.params = mixed - self.step.lr(k) * self.step.direction(grad)
        self.iteration = k + 1
