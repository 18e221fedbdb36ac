"""The in-memory message that algorithms produce and consume; `envelope.py` puts it on the wire.

It lives in `protocol/` so the wire format depends on nothing in `node/`: algorithms import it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .codecs import Encoded

Payload = torch.Tensor | Encoded


@dataclass
class Message:
    """One directed message. `kind` says how the receiver applies it (see each algorithm).

    `src` and `dst` are positions in the member list of `epoch`: a new epoch renumbers the members
    and starts every link afresh, so a message of another epoch means nothing to the receiver."""

    src: int
    dst: int
    round: int
    phase: str
    kind: str
    tensors: dict[str, Payload]
    seq: int = 0
    epoch: int = 0

    @property
    def nbytes(self) -> int:
        """Tensor payload bytes (encoded size where encoded)."""
        return sum(t.nbytes for t in self.tensors.values())
