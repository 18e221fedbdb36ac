"""P2P-FT: push-pull gradient tracking over a directed graph (DESIGN §2).

    theta_i^{k+1} = sum_j a_ij (theta_j^k - alpha tau_j^k)       pull phase, v_j = theta_j - alpha tau_j
    g_i^{k+1}     = grad L_i(theta_i^{k+1})
    tau_i^{k+1}   = sum_j b_ij (tau_j^k + g_j^{k+1} - g_j^k)     push phase, z_j = tau_j + g_j^{k+1} - g_j^k

with tau^0 = g^0 and g^k the stored previous gradient. The push phase moves mass through the
running sums of `running_sums.py`, so a lost message delays mass instead of destroying it.
A daemon that paces its batch (`--sync async`, node/pace.py) takes g_i^{k+1} at v_i, the value it sends,
so the gradient runs while the pull waits; at the fixed point tau_i = 0 and v_i = theta_i, so it stays exact.
With momentum beta > 0 the pulled value is theta - alpha m, m = beta m + tau (heavy ball on the tracker).

Local steps (`--local-steps K`, K-GT): before it sends, a node takes K - 1 more steps on fresh
mini-batches, each corrected by its tracker,

    y <- y - alpha (tau_i + grad L_i(y) - g_i)                   g_i: its gradient at theta_i

and sends v_i = y. The correction tau_i - g_i stands in for the other nodes' gradients, so a local
step moves towards the global optimum, not its own (the drift of plain local SGD); at the optimum
(consensus, tau = 0) every local step is zero, so the fixed point stays exact. The tracker still
moves only at exchanges, with the gradient at the mixed parameters: sum tau = sum g is untouched.
A pass over the data then takes K times fewer rounds, so K times fewer bytes.
With `--robust clip` both phases clip what neighbours send and the tracker is leaky (robust.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from .base import Algorithm, Layouts, Message, register
from .late import LateGradientWeight
from .pull import PULL_MESSAGES, PullChannel
from .robust import TRACKER_LEAK, MassClipper
from .running_sums import PUSH_MESSAGES, PushReceiver, PushSender

if TYPE_CHECKING:
    from ..settings import RunSettings


@register
class P2PFT(Algorithm):
    name = "p2pft"
    label = "P2P-FT"
    phases = ("pull", "push")
    messages: ClassVar[Layouts] = {"pull": PULL_MESSAGES, "push": PUSH_MESSAGES}
    local_steps_supported = True
    time_varying_graphs = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.local_steps = 1
        self.late = LateGradientWeight()  # on with --sync async --pace-batch (configure)
        self.grad, self.last_loss = self.objective.gradient(self.params)
        self.v = self.params.clone()
        self.reset_links()

    def reset_links(self) -> None:
        """Restart tracking: tau = g (the latest gradient) and empty running sums, so sum tau = sum g
        holds again over the new members whatever mass was lost with the old ones (DESIGN §8)."""
        self.tau = self.grad.clone()
        self.z = torch.zeros_like(self.tau)
        self.pull = PullChannel(self.hood, self.params, self.codec, self.gamma)
        self.sender = PushSender(self.hood, self.params.numel(), self.codec, self.params.device)
        self.receiver = PushReceiver(self.hood, self.params.numel(), self.params.device)
        self.clipper = MassClipper(self.hood.in_neighbours, self.params)

    def configure(self, *, iterations_per_epoch: int, settings: RunSettings | None = None) -> None:
        super().configure(iterations_per_epoch=iterations_per_epoch, settings=settings)
        if settings is not None:
            self.local_steps = settings.local_steps
            self.late.enabled = settings.sync == "async" and bool(settings.pace_batch)

    def outgoing(self, phase: str, k: int) -> list[Message]:
        if phase == "pull":
            lr = self.step.lr(k)
            v = self.params - lr * self.step.direction(self.tau)
            for _ in range(self.local_steps - 1):
                grad, self.last_loss = self.objective.gradient(v)
                v = v - lr * self.step.direction(self.tau + self.late.scale(grad) - self.grad)  # as in the tracker
            self.v = v
            start = getattr(self.objective, "start", None)
            if start is not None:  # a paced daemon computes at v while the round waits for the values (node/pace.py)
                start(v)
            return self.pull.send(self.v, k, phase)
        return self.sender.send(self.z, k, phase)

    def incoming(self, phase: str, k: int, messages: Sequence[Message]) -> None:
        if phase == "pull":
            self.pull.receive(messages)
            self.params = self.pull.mix(self.v, k, self.clipping, self.oldest_mixed(k))
            grad, self.last_loss = self.objective.gradient(self.params)
            self.late.next_round(getattr(self.objective, "fresh", True))
            grad = self.late.scale(grad)
            if self.clipping:  # leaky tracker: clipped mass must not pile up (robust.py)
                self.z = grad + (1 - TRACKER_LEAK) * (self.tau - self.grad)
            else:
                self.z = self.tau + grad - self.grad
            self.grad = grad
            return
        arrived = self.receiver.receive(messages)
        kept = self.hood.col_weight_at(k)  # b_ii of this round
        if self.clipping:
            arrived = self.clipper.apply(kept * self.z, self.receiver.rho)
        self.tau = kept * self.z
        if arrived is not None:
            self.tau = self.tau + arrived.to(self.tau.dtype)
        self.iteration = k + 1

    def request_keyframe(self, dst: int) -> None:
        self.pull.request_keyframe(dst)
        self.sender.request_keyframe(dst)

    @property
    def gaps(self) -> set[int]:
        return self.pull.gaps | self.receiver.gaps

    @property
    def gradient_weight(self) -> float | None:
        return self.late.value if self.late.enabled else None  # --sync async --pace-batch (late.py)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **super().state_dict(),
            "tau": self.tau,
            "grad": self.grad,
            "z": self.z,
            "v": self.v,
            **self.pull.state_dict(),
            **self.sender.state_dict(),
            **self.receiver.state_dict(),
            **(self.clipper.state_dict() if self.clipping else {}),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        for name in ("tau", "grad", "z", "v"):
            setattr(self, name, state[name].clone())
        self.pull.load_state_dict(state)
        self.sender.load_state_dict(state)
        self.receiver.load_state_dict(state)
        self.clipper.load_state_dict(state)
