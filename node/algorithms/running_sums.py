"""Loss-tolerant push channel for mass (DESIGN §3, §4).

The sender keeps, per out-link, the cumulative mass sigma it has ever pushed there and the part
`delivered` it has transmitted; the receiver keeps rho, the cumulative mass it has applied. A
`delta` message carries sigma - delivered in the wire dtype (error feedback: rounding stays in
flight and is sent later); a `total` message (keyframe) carries sigma itself in float64 and lets
the receiver catch up after any loss. Counters are float64. Invariant, summed over all nodes:
sum tau + sum_links (sigma - rho) = sum of the latest gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...protocol.codecs import Codec
from ..topology import Neighbourhood
from .base import PARAMS, Layout, Message, as_tensor

# the messages of a push phase: the running sum itself (keyframe) or its increment
PUSH_MESSAGES: dict[str, tuple[Layout, ...]] = {"total": ({"sigma": PARAMS},), "delta": ({"delta": PARAMS},)}


class PushSender:
    def __init__(
        self, hood: Neighbourhood, dim: int, codec: Codec | None = None, device: torch.device | str = "cpu"
    ) -> None:
        self.hood, self.codec = hood, codec
        self.sigma = {d: torch.zeros(dim, dtype=torch.float64, device=device) for d in hood.out_neighbours}
        self.delivered = {d: torch.zeros(dim, dtype=torch.float64, device=device) for d in hood.out_neighbours}
        self.seq = dict.fromkeys(hood.out_neighbours, 0)
        self.keyframe_due: set[int] = set()

    def send(self, z: torch.Tensor, round_: int, phase: str) -> list[Message]:
        """Add b_li * z to the counter of every out-link this round uses; return the messages that carry
        it (a link a round does not use adds nothing: its mass is the sender's own)."""
        out = []
        for dst in self.hood.receivers(round_):
            self.sigma[dst] += self.hood.col_weight_at(round_) * z.to(torch.float64)
            self.seq[dst] += 1
            if dst in self.keyframe_due:
                self.keyframe_due.discard(dst)
                self.delivered[dst] = self.sigma[dst].clone()
                out.append(
                    Message(
                        self.hood.node, dst, round_, phase, "total", {"sigma": self.sigma[dst].clone()}, self.seq[dst]
                    )
                )
                continue
            pending = (self.sigma[dst] - self.delivered[dst]).to(z.dtype)
            delta = pending if self.codec is None else self.codec.encode(pending)
            self.delivered[dst] += as_tensor(delta).to(self.delivered[dst])  # float64, on its device
            out.append(Message(self.hood.node, dst, round_, phase, "delta", {"delta": delta}, self.seq[dst]))
        return out

    def request_keyframe(self, dst: int) -> None:
        """Send the full counter next time (after a reconnect or a reported gap)."""
        self.keyframe_due.add(dst)

    def in_flight(self) -> dict[int, torch.Tensor]:
        return {d: self.sigma[d] - self.delivered[d] for d in self.sigma}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for d in self.sigma:
            state[f"push.sigma.{d}"] = self.sigma[d]
            state[f"push.delivered.{d}"] = self.delivered[d]
            state[f"push.seq.{d}"] = torch.tensor(self.seq[d])
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for d in self.sigma:
            self.sigma[d] = state[f"push.sigma.{d}"].clone()
            self.delivered[d] = state[f"push.delivered.{d}"].clone()
            self.seq[d] = int(state[f"push.seq.{d}"])


class PushReceiver:
    def __init__(self, hood: Neighbourhood, dim: int, device: torch.device | str = "cpu") -> None:
        self.hood = hood
        self.rho = {s: torch.zeros(dim, dtype=torch.float64, device=device) for s in hood.in_neighbours}
        self.last_seq = dict.fromkeys(hood.in_neighbours, 0)
        self.gaps: set[int] = set()

    def receive(self, messages: Sequence[Message]) -> torch.Tensor | None:
        """Sum of the newly delivered mass (float64), or None if nothing new arrived.

        Duplicates and stale messages are ignored. A `delta` after a gap is ignored too and the
        sender is listed in `gaps` (it must send a keyframe); a `total` is applied whenever it is newer.
        """
        acc: torch.Tensor | None = None
        for m in sorted(messages, key=lambda m: m.seq):
            if m.src not in self.rho or m.seq <= self.last_seq[m.src]:
                continue
            if m.kind == "total":
                new = m.tensors["sigma"].to(torch.float64) - self.rho[m.src]
                self.rho[m.src] = m.tensors["sigma"].to(torch.float64).clone()
                self.gaps.discard(m.src)
            elif m.kind == "delta" and m.seq == self.last_seq[m.src] + 1 and m.src not in self.gaps:
                new = as_tensor(m.tensors["delta"]).to(torch.float64)
                self.rho[m.src] += new
            else:
                self.gaps.add(m.src)
                continue
            self.last_seq[m.src] = m.seq
            acc = new if acc is None else acc + new
        return acc

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for s in self.rho:
            state[f"push.rho.{s}"] = self.rho[s]
            state[f"push.last_seq.{s}"] = torch.tensor(self.last_seq[s])
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for s in self.rho:
            self.rho[s] = state[f"push.rho.{s}"].clone()
            self.last_seq[s] = int(state[f"push.last_seq.{s}"])
