"""Local-FT (no communication) and centralized fine-tuning (one node holding all data)."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Algorithm, Message, register


@register
class LocalFT(Algorithm):
    name = "local"
    label = "Local-FT"
    phases = ("local",)
    communicates = False

    def outgoing(self, phase: str, k: int) -> list[Message]:
        return []

    def incoming(self, phase: str, k: int, messages: Sequence[Message]) -> None:
        self.params = self.params - self.local_step(k, self.params)
        self.iteration = k + 1


@register
class CentralFT(LocalFT):
    """The target to match: the simulator gives this one node the union of every node's data."""

    name = "central"
    label = "Central FT"
