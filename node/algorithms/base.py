"""The algorithm interface shared by the daemon and the simulator.

An algorithm is a per-node state machine. Each iteration runs its `phases` in order; for each
phase the driver (simulator or daemon) calls `outgoing` to collect the messages to send, delivers
whatever arrives, and calls `incoming` with it. Algorithms never touch sockets, clocks or globals,
so the same object runs over in-memory links or a real network.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch

from ...protocol.codecs import Codec, CodecError, Encoded, decode
from ...protocol.message import Message, Payload
from ..errors import BadInput, Diverged
from ..topology import Neighbourhood

if TYPE_CHECKING:
    from ..settings import RunSettings


class Objective(Protocol):
    """A node's local loss. `gradient` draws the node's next mini-batch (or uses all data)."""

    dim: int

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Flat gradient at `params` and the mini-batch loss."""
        ...


LearningRate = Callable[[int], float]

PARAMS = -1  # in a message layout: as many values as this node's trainable parameters
Layout = dict[str, int]  # the tensors one message carries: name -> number of values (PARAMS, or a count)
Layouts = dict[str, dict[str, tuple[Layout, ...]]]  # phase -> kind of message -> the layouts it may have


def as_tensor(x: Payload) -> torch.Tensor:
    """A message tensor as a torch tensor, decoding it if it is still encoded."""
    return decode(x) if isinstance(x, Encoded) else x


def on_device(messages: list[Message], device: torch.device) -> list[Message]:
    """`messages` with every tensor decoded and on `device`: codecs decode on the CPU, and a node that
    trains on a GPU mixes there."""
    if device.type == "cpu":
        return messages
    moved = [{k: as_tensor(v).to(device) for k, v in m.tensors.items()} for m in messages]
    return [dataclasses.replace(m, tensors=tensors) for m, tensors in zip(messages, moved, strict=True)]


@dataclass
class StepRule:
    """Local optimizer: SGD (heavy-ball momentum when momentum > 0) or Adam, step size from a schedule.

    `direction(g)` is what the step size multiplies: g, the momentum buffer, or Adam's m_hat / sqrt(v_hat)."""

    lr: LearningRate
    momentum: float = 0.0
    optimizer: str = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    _buffer: torch.Tensor | None = field(default=None, repr=False)
    _second: torch.Tensor | None = field(default=None, repr=False)
    _steps: int = 0

    def direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.optimizer == "adam":
            return self._adam(grad)
        if self.momentum == 0.0:
            return grad
        if self._buffer is None:
            self._buffer = grad.clone()
        else:
            self._buffer.mul_(self.momentum).add_(grad)
        return self._buffer

    def _adam(self, grad: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        if self._buffer is None:
            self._buffer, self._second = torch.zeros_like(grad), torch.zeros_like(grad)
        self._steps += 1
        self._buffer.mul_(b1).add_(grad, alpha=1 - b1)
        self._second.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = self._buffer / (1 - b1**self._steps)
        v_hat = self._second / (1 - b2**self._steps)
        return m_hat / (v_hat.sqrt() + self.eps)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {} if self._buffer is None else {"momentum_buffer": self._buffer}
        if self._second is not None:
            state |= {"adam_second": self._second, "adam_steps": torch.tensor(self._steps)}
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        buffer, second = state.get("momentum_buffer"), state.get("adam_second")
        self._buffer = None if buffer is None else buffer.clone()
        self._second = None if second is None else second.clone()
        self._steps = int(state.get("adam_steps", 0))


class Algorithm(ABC):
    """Base class: subclass it, set `name`, `label` and `phases`, and register it with `@register`."""

    name: ClassVar[str]
    label: ClassVar[str]  # how tables, plots and attention grids name it
    phases: ClassVar[tuple[str, ...]]
    communicates: ClassVar[bool] = True
    needs_undirected: ClassVar[bool] = False
    time_varying_graphs: ClassVar[bool] = False  # mixes with each round's links and weights (Neighbourhood.senders)
    local_steps_supported: ClassVar[bool] = False  # takes --local-steps gradient steps per round
    # What in-neighbours send, by phase: each kind of message and the layouts it may carry. A daemon
    # refuses any other message when it arrives (`message_problem`), so a peer's malformed message never
    # fails inside `incoming` or broadcasts a one-value tensor over the parameters. Empty: not checked.
    messages: ClassVar[Layouts] = {}

    def __init__(
        self,
        hood: Neighbourhood,
        objective: Objective,
        params: torch.Tensor,
        step: StepRule,
        codec: Codec | None = None,
        gamma: float = 1.0,
    ) -> None:
        self.hood = hood
        self.objective = objective
        self.params = params.detach().clone()
        self.step = step
        self.codec = codec
        self.gamma = gamma
        self.iteration = 0
        self.epoch = 0
        self.last_loss = float("nan")
        self.iterations_per_epoch = 1
        self.robust = "none"  # or "clip": self-centred clipping of what neighbours send (robust.py)
        self.asynchronous = False  # --sync async: rounds go on with whatever has arrived (see `oldest_mixed`)
        self.max_staleness = 50

    def configure(self, *, iterations_per_epoch: int, settings: RunSettings | None = None) -> None:
        """Told by the driver once, before the first iteration: epoch length and the run's settings
        (for schedules in epochs and algorithm options such as DIMAT's --merge-every, and --robust)."""
        self.iterations_per_epoch = iterations_per_epoch
        if settings is not None:
            self.robust = settings.robust
            self.asynchronous = settings.sync == "async"
            self.max_staleness = settings.max_staleness

    def oldest_mixed(self, k: int) -> int | None:
        """The oldest round of a neighbour's value that round k still mixes (None: any). Only asynchronous
        rounds leave values out: one more than --max-staleness rounds old would pull this node back to
        where that neighbour was long ago (a laptop asleep); what it pushed still counts."""
        return k - self.max_staleness if self.asynchronous else None

    @property
    def clipping(self) -> bool:
        """Whether this node mixes with self-centred clipping (`--robust clip`, see robust.py)."""
        return self.robust == "clip"

    def local_step(self, k: int, params: torch.Tensor) -> torch.Tensor | float:
        """The step to subtract for this node's next gradient at `params`, for the algorithms that step
        on their own gradient (not P2P-FT's tracker). A slow node's round that has no new gradient yet
        (node/pace.py) gets 0: stepping again on its old one would count that batch twice."""
        grad, loss = self.objective.gradient(params)
        if not getattr(self.objective, "fresh", True):
            return 0.0
        self.last_loss = loss
        return self.step.lr(k) * self.step.direction(grad)

    def model_in_use(self) -> AbstractContextManager:
        """Held while the algorithm runs the model itself: a background gradient (node/pace.py) shares it."""
        return getattr(self.objective, "lock", None) or contextlib.nullcontext()

    def enter_epoch(self, hood: Neighbourhood, epoch: int) -> None:
        """Take part in a new membership epoch from the next round on (DESIGN §8).

        `hood` is this node's neighbourhood in the new member list (positions renumbered). Every
        link starts afresh: counters, sequence numbers, gaps, codec replicas and residuals are reset
        and trackers restart from the latest gradient; the parameters and the optimizer state stay.
        The driver calls it between rounds, on every member of the new epoch at the same round."""
        self.hood = hood
        self.epoch = epoch
        self.reset_links()

    def reset_links(self) -> None:  # noqa: B027 - a no-op for algorithms without per-link state
        """Forget all per-link state (subclasses with channels or trackers rebuild them here)."""

    def send(self, phase: str, k: int) -> list[Message]:
        """What drivers call: `outgoing`, each message stamped with this node's epoch. Raises `Diverged`
        rather than send values that are not finite."""
        try:
            messages = self.outgoing(phase, k)
        except CodecError as e:  # the codecs refuse only non-finite values of a float tensor
            raise self._diverged(k, str(e)) from None
        for m in messages:
            if not all(torch.isfinite(t).all() for t in m.tensors.values() if isinstance(t, torch.Tensor)):
                raise self._diverged(k, "its values are not finite")
            m.epoch = self.epoch
        return messages

    def _diverged(self, k: int, why: str) -> Diverged:
        return Diverged(
            f"node {self.node} diverged at round {k} ({why}): lower --lr, or use --robust clip if a "
            "neighbour may be hostile"
        )

    def receive(self, phase: str, k: int, messages: Sequence[Message]) -> None:
        """What drivers call: `incoming` with only the messages of this node's epoch from its in-neighbours
        (a message of another epoch numbers its nodes differently and carries no usable state), by sender:
        every sum over in-neighbours then runs in one order, so a daemon's run does not depend on which
        neighbour's message came first (the simulator's order: it delivers by sender)."""
        ins = set(self.hood.in_neighbours)
        mine = [m for m in messages if m.epoch == self.epoch and m.src in ins]
        self.incoming(phase, k, sorted(mine, key=lambda m: m.src))

    def message_problem(self, msg: Message) -> str | None:
        """Why this node cannot apply `msg` (a kind its phase does not send, tensors missing, extra or of
        the wrong size), or None: what the transport checks before a round may use a peer's message."""
        if not self.messages:
            return None
        kinds = self.messages.get(msg.phase, {})
        if msg.kind not in kinds:
            only = ", ".join(kinds) or "none"
            return f"{self.name} sends no {msg.kind!r} message in phase {msg.phase!r} (only {only})"
        dim = self.params.numel()
        for layout in kinds[msg.kind]:
            if set(layout) == set(msg.tensors):
                break
        else:
            expected = " or ".join("{" + ", ".join(sorted(layout)) + "}" for layout in kinds[msg.kind])
            return f"a {msg.kind!r} message carries {sorted(msg.tensors)}, expected {expected}"
        for name, size in layout.items():
            shape = tuple(msg.tensors[name].shape)
            want = dim if size == PARAMS else size
            if shape != (want,):
                return f"tensor {name!r} of a {msg.kind!r} message has shape {shape}, expected ({want},)"
        return None

    def expects_messages(self, phase: str, k: int) -> bool:
        """Whether in-neighbours send in `phase` of iteration k (the daemon waits only then)."""
        return self.communicates

    @property
    def node(self) -> int:
        return self.hood.node

    @abstractmethod
    def outgoing(self, phase: str, k: int) -> list[Message]:
        """Messages to send in `phase` of iteration `k`."""

    @abstractmethod
    def incoming(self, phase: str, k: int, messages: Sequence[Message]) -> None:
        """Apply the messages that arrived for `phase` of iteration `k` (possibly fewer than sent)."""

    def request_keyframe(self, dst: int) -> None:  # noqa: B027 - a no-op for algorithms without increments
        """The link to `dst` lost messages: send full state on it next time (if the algorithm has any)."""

    @property
    def gaps(self) -> set[int]:
        """In-neighbours whose stream of increments has a gap (they must send a keyframe)."""
        return set()

    @property
    def gradient_weight(self) -> float | None:
        """What this node's latest gradient counts with (None: the algorithm does not weight late gradients)."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume this node in the same epoch, links included (extended by
        subclasses; for tests and analysis)."""
        return {**self.model_state_dict(), "iteration": torch.tensor(self.iteration)}

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """What a restart takes (`load_model_state`), and all a daemon's checkpoint holds: the parameters
        and the optimizer state. Link state (running sums, replicas, trackers) took 14 times the
        parameters' size on a directed ring of 8 nodes and 56 on a complete one, and was never read."""
        return {"params": self.params, **self.step.state_dict()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Resume everything, links included: only for a snapshot of this same epoch (tests, analysis).
        A node that restarts uses `load_model_state` and then enters a new epoch."""
        self.load_model_state(state)
        self.iteration = int(state["iteration"])

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take the parameters and optimizer state of a checkpoint, nothing that belongs to links:
        a restarted node never resumes running-sum counters (their receivers have moved on)."""
        self.params = state["params"].clone()
        self.step.load_state_dict(state)


ALGORITHMS: dict[str, type[Algorithm]] = {}


def register(cls: type[Algorithm]) -> type[Algorithm]:
    ALGORITHMS[cls.name] = cls
    return cls


def label_of(name: str) -> str:
    """The algorithm's name in tables and figures (`P2P-FT` for `p2pft`); an unknown name as it is."""
    return ALGORITHMS[name].label if name in ALGORITHMS else name


def get_algorithm(name: str) -> type[Algorithm]:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise BadInput(f"unknown algorithm {name!r}: choose one of {', '.join(sorted(ALGORITHMS))}") from None
