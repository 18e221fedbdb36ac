"""D-PSGD / CDSGD (the P2P-FT paper's eq. 1): mix with in-neighbours, step along the local gradient.

theta_i^{k+1} = sum_j a_ij theta_j^k - alpha grad L_i(theta_i^k)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from .base import Algorithm, Layouts, Message, register
from .pull import PULL_MESSAGES, PullChannel


@register
class DSGD(Algorithm):
    name = "dsgd"
    label = "D-PSGD"
    phases = ("mix",)
    messages: ClassVar[Layouts] = {"mix": PULL_MESSAGES}

    metropolis = False
    time_varying_graphs = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reset_links()

    def reset_links(self) -> None:
        self.pull = PullChannel(self.hood, self.params, self.codec, self.gamma, self.metropolis)

    def outgoing(self, phase: str, k: int) -> list[Message]:
        return self.pull.send(self.params, k, phase)

    def incoming(self, phase: str, k: int, messages: Sequence[Message]) -> None:
        step = self.local_step(k, self.params)
        self.pull.receive(messages)
        mixed = self.pull.mix(self.params, k, self.clipping, self.oldest_mixed(k))
        self.params = mixed - step
        self.iteration = k + 1

    def request_keyframe(self, dst: int) -> None:
        self.pull.request_keyframe(dst)

    @property
    def gaps(self) -> set[int]:
        return self.pull.gaps

    def state_dict(self) -> dict:
        return {**super().state_dict(), **self.pull.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pull.load_state_dict(state)


@register
class CDSGD(DSGD):
    """Consensus SGD (CDSGD): the same step with doubly stochastic Metropolis weights on an undirected graph."""

    name = "cdsgd"
    label = "CDSGD"
    needs_undirected = True
    metropolis = True
    time_varying_graphs = False
