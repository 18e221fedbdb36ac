"""Pull channel: out-neighbours learn this node's value; mixing uses the newest one per in-neighbour.

Exact mode (no codec): each message carries the value itself (`value`); the receiver keeps the
newest per in-neighbour by round, so a lost or late message only makes the mix use an older value.

Compressed mode (DESIGN §4): every node keeps a public copy h_i of its own value, and every
receiver a replica H_j of each in-neighbour's copy. The sender transmits C(v_i - h_i) (`copy`,
tensor `d`) and both ends add the decoded increment, so copy and replica stay identical. Mixing is a
consensus step  theta_i = v_i + gamma * sum_j a_ij (H_j - h_i),  which with exact copies and
gamma = 1 is the plain mix sum_j a_ij v_j. Replicas need every increment in order: after a gap the
receiver lists the sender in `gaps` and ignores increments until a keyframe (tensor `h`) arrives.

`mix(v, k, clipping=True)` is `--robust clip`: each H_j - h_i (or v_j - v_i) is clipped first (robust.py).

On a graph whose links change from round to round (`one-peer-exponential`), round k sends only to
that round's receivers and mixes only that round's senders, with that round's weights. A link is then
used every few rounds, so one copy for all out-links would leave each receiver's replica missing the
increments sent on the others: each out-link keeps its own copy h_il (and its own sequence numbers),
and the mix takes the replicas directly, theta_i = v_i + gamma * sum_j a_ij (H_j - v_i) (there is no
one copy of v_i to centre on). With exact copies it is the same plain mix; the copies' errors shrink
with the increments, so the fixed point is still exact (tests/test_exactness.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ...protocol.codecs import Codec
from ..topology import Neighbourhood
from .base import PARAMS, Layout, Message, as_tensor
from .robust import clip_around

# the messages of a pull phase: a value, or a copy's keyframe (h) or increment (d)
PULL_MESSAGES: dict[str, tuple[Layout, ...]] = {"value": ({"v": PARAMS},), "copy": ({"h": PARAMS}, {"d": PARAMS})}


class PullChannel:
    def __init__(
        self,
        hood: Neighbourhood,
        like: torch.Tensor,
        codec: Codec | None = None,
        gamma: float = 1.0,
        metropolis: bool = False,
    ):
        self.hood, self.codec, self.gamma = hood, codec, gamma
        # doubly stochastic Metropolis pi_ij (fixed graphs only), else row-stochastic a_ij of each round
        self.metropolis = (hood.metropolis_weight, hood.self_metropolis_weight) if metropolis else None
        self.copy = torch.zeros_like(like)  # h_i, compressed mode only
        self.link_copies: dict[int, torch.Tensor] = {}  # h_il per out-link, on a graph that changes by round
        self.link_seq: dict[int, int] = {}
        self.replicas: dict[int, torch.Tensor] = {}  # H_j, or the newest exact value v_j
        self.replica_round = dict.fromkeys(hood.in_neighbours, -1)
        self.seq = 0
        self.last_seq = dict.fromkeys(hood.in_neighbours, 0)
        self.gaps: set[int] = set()
        self.keyframe_due: set[int] = set()

    def send(self, v: torch.Tensor, round_: int, phase: str) -> list[Message]:
        me = self.hood.node
        if self.codec is None:
            return [Message(me, d, round_, phase, "value", {"v": v}) for d in self.hood.receivers(round_)]
        if self.hood.time_varying:
            return [self._send_on_link(v, d, round_, phase) for d in self.hood.receivers(round_)]
        self.seq += 1
        increment = self.codec.encode(v - self.copy)
        self.copy += as_tensor(increment).to(self.copy)  # the codec decodes on the CPU
        out = []
        for d in self.hood.out_neighbours:
            if d in self.keyframe_due:
                self.keyframe_due.discard(d)
                out.append(Message(me, d, round_, phase, "copy", {"h": self.copy.clone()}, self.seq))
            else:
                out.append(Message(me, d, round_, phase, "copy", {"d": increment}, self.seq))
        return out

    def _send_on_link(self, v: torch.Tensor, d: int, round_: int, phase: str) -> Message:
        """The increment of link d's own copy (a graph whose links change by round)."""
        copy = self.link_copies.setdefault(d, torch.zeros_like(self.copy))
        self.link_seq[d] = seq = self.link_seq.get(d, 0) + 1
        increment = self.codec.encode(v - copy)
        copy += as_tensor(increment).to(copy)
        if d in self.keyframe_due:
            self.keyframe_due.discard(d)
            return Message(self.hood.node, d, round_, phase, "copy", {"h": copy.clone()}, seq)
        return Message(self.hood.node, d, round_, phase, "copy", {"d": increment}, seq)

    def receive(self, messages: Sequence[Message]) -> None:
        for m in sorted(messages, key=lambda m: (m.seq, m.round)):
            j = m.src
            if j not in self.replica_round:
                continue
            if m.kind == "value":
                if m.round > self.replica_round[j]:
                    self.replicas[j], self.replica_round[j] = as_tensor(m.tensors["v"]), m.round
            elif m.kind == "copy" and m.seq > self.last_seq[j]:
                if "h" in m.tensors:
                    self.replicas[j] = as_tensor(m.tensors["h"]).clone()
                    self.gaps.discard(j)
                elif m.seq == self.last_seq[j] + 1 and j not in self.gaps:
                    inc = as_tensor(m.tensors["d"])
                    self.replicas[j] = self.replicas[j] + inc if j in self.replicas else inc.clone()
                else:
                    self.gaps.add(j)
                    continue
                self.last_seq[j], self.replica_round[j] = m.seq, m.round

    def mix(self, v: torch.Tensor, k: int, clipping: bool = False, oldest: int | None = None) -> torch.Tensor:
        """The mix of round k of v with the in-neighbours' values; with `clipping`, each of them first
        moved to within the clipping radius of this node's own (self-centred clipping, robust.py). Values
        sent before round `oldest` are left out, their weight staying on v (the mix stays stochastic)."""
        weight, self_weight = self._weights(k)
        senders = self.hood.senders(k)  # every in-neighbour on a fixed graph
        fresh = {
            j: r
            for j, r in self.replicas.items()
            if j in senders and (oldest is None or self.replica_round[j] >= oldest)
        }
        if self.codec is None:
            replicas = clip_around(v, fresh) if clipping else fresh
            total, mass = v * self_weight, self_weight
            for j, vj in replicas.items():
                total, mass = total + weight(j) * vj.to(v.dtype), mass + weight(j)
            return total / mass if abs(mass - 1.0) > 1e-12 else total
        own = v if self.hood.time_varying else self.copy
        replicas = clip_around(own, fresh) if clipping else fresh
        step = torch.zeros_like(v)
        for j, hj in replicas.items():
            step += weight(j) * (hj.to(v.dtype) - own)
        return v + self.gamma * step

    def _weights(self, k: int) -> tuple[Callable[[int], float], float]:
        """(the weight of in-neighbour j, this node's own weight) in round k's mix."""
        if self.metropolis is not None:
            return self.metropolis
        share = self.hood.row_weight_at(k)  # 1 / (the round's senders + 1)
        return (lambda j: share), share

    def request_keyframe(self, dst: int) -> None:
        self.keyframe_due.add(dst)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"pull.copy": self.copy, "pull.seq": torch.tensor(self.seq)}
        for d, copy in self.link_copies.items():
            state[f"pull.link_copy.{d}"] = copy
            state[f"pull.link_seq.{d}"] = torch.tensor(self.link_seq[d])
        for j, r in self.replicas.items():
            state[f"pull.replica.{j}"] = r
            state[f"pull.replica_round.{j}"] = torch.tensor(self.replica_round[j])
            state[f"pull.last_seq.{j}"] = torch.tensor(self.last_seq[j])
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.copy = state["pull.copy"].clone()
        self.seq = int(state["pull.seq"])
        for d in self.hood.out_neighbours:
            if f"pull.link_copy.{d}" in state:
                self.link_copies[d] = state[f"pull.link_copy.{d}"].clone()
                self.link_seq[d] = int(state[f"pull.link_seq.{d}"])
        for j in self.hood.in_neighbours:
            if f"pull.replica.{j}" in state:
                self.replicas[j] = state[f"pull.replica.{j}"].clone()
                self.replica_round[j] = int(state[f"pull.replica_round.{j}"])
                self.last_seq[j] = int(state[f"pull.last_seq.{j}"])
