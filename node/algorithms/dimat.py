"""DIMAT: local training, then every `merge_every` epochs a merge with neighbours after aligning them.

    x_i <- sum_j pi_ij P_ij x_j        (P_ii = identity)

pi is doubly stochastic on an undirected graph (Metropolis weights; uniform on `complete`). P_ij
permutes neighbour j's hidden units to match node i's: by activation matching on node i's own data
(`dimat`, DESIGN §5), by weight matching (`wm`), or not at all (`wa`, plain averaging on DIMAT's
schedule). Only the trainable block's internal dimensions are permuted, never the residual stream.
With `--robust clip` each aligned neighbour is clipped around this node's parameters (robust.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import torch

from .. import alignment
from .base import PARAMS, Algorithm, Layouts, Message, as_tensor, register
from .robust import clip_around

if TYPE_CHECKING:
    from ..settings import RunSettings

FEATURE_SAMPLES = 256  # own samples whose activations are correlated when aligning a neighbour


@register
class DIMAT(Algorithm):
    name = "dimat"
    label = "DIMAT"
    phases = ("merge",)
    messages: ClassVar[Layouts] = {"merge": {"params": ({"x": PARAMS},)}}
    needs_undirected = True
    matching = "activations"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.merge_every, self.warmup_epochs = 1, 0
        self.merges = 0
        self.newest: dict[int, tuple[int, torch.Tensor]] = {}  # --sync async: neighbour -> (round, model)

    def reset_links(self) -> None:
        self.newest = {}

    def configure(self, *, iterations_per_epoch: int, settings: RunSettings | None = None) -> None:
        super().configure(iterations_per_epoch=iterations_per_epoch, settings=settings)
        if settings is not None:
            self.merge_every, self.warmup_epochs = settings.merge_every, settings.warmup_epochs

    def is_merge(self, k: int) -> bool:
        """Merge at the end of every `merge_every`-th epoch, once the warm-up epochs are done."""
        done = k + 1
        period = self.merge_every * self.iterations_per_epoch
        return done % period == 0 and done > self.warmup_epochs * self.iterations_per_epoch

    def expects_messages(self, phase: str, k: int) -> bool:
        return self.is_merge(k)

    def outgoing(self, phase: str, k: int) -> list[Message]:
        if not self.is_merge(k):
            return []
        return [Message(self.node, d, k, phase, "params", {"x": self.params}) for d in self.hood.out_neighbours]

    def incoming(self, phase: str, k: int, messages: Sequence[Message]) -> None:
        self.params = self.params - self.local_step(k, self.params)
        # in this node's dtype: a model of another float dtype made the alignment's forward pass raise
        received = {m.src: as_tensor(m.tensors["x"]).to(self.params.dtype) for m in messages if m.kind == "params"}
        if self.asynchronous:  # merge with each neighbour's newest model, whenever it was sent
            for m in messages:
                if m.kind == "params" and m.round >= self.newest.get(m.src, (-1, None))[0]:
                    self.newest[m.src] = (m.round, received[m.src])
            oldest = self.oldest_mixed(k)
            received = {j: x for j, (r, x) in self.newest.items() if r >= oldest}
        if self.clipping:  # nothing non-finite reaches the alignment (it would be clipped to nothing anyway)
            received = {j: x for j, x in received.items() if bool(torch.isfinite(x).all())}
        if self.is_merge(k) and received:
            with self.model_in_use():
                self.params = self.merge(received)
            self.merges += 1
        self.iteration = k + 1

    def merge(self, received: dict[int, torch.Tensor]) -> torch.Tensor:
        model = self.objective.model
        own = alignment.to_params(model, self.params)
        hood = self.hood
        # neighbours not heard from keep their weight on this node's own parameters (pi stays stochastic)
        self_weight = 1.0 - sum(hood.metropolis_weight(j) for j in received)
        aligned = {j: self.align(own, alignment.to_params(model, x)) for j, x in received.items()}
        if self.clipping:
            aligned = self.clipped(aligned)
        others = [(hood.metropolis_weight(j), params) for j, params in aligned.items()]
        return alignment.to_vector(model, alignment.merge(own, others, self_weight))

    def clipped(self, aligned: dict[int, alignment.Params]) -> dict[int, alignment.Params]:
        """Aligned neighbours moved to within the clipping radius of this node's parameters (robust.py)."""
        model = self.objective.model
        vectors = {j: alignment.to_vector(model, params) for j, params in aligned.items()}
        return {j: alignment.to_params(model, v) for j, v in clip_around(self.params, vectors).items()}

    def align(self, own: alignment.Params, other: alignment.Params) -> alignment.Params:
        model = self.objective.model
        if self.matching == "activations":
            features, _ = self.objective.bank.get(self.objective.indices[:FEATURE_SAMPLES])
            perms = alignment.match_activations(model, own, other, features)
        elif self.matching == "weights":
            perms = alignment.match_weights(own, other, alignment.block_kind(model), alignment.head_count(model))
        else:
            return other
        return alignment.permute_tail(other, perms, alignment.block_kind(model))


@register
class WeightAveraging(DIMAT):
    """WA: DIMAT's schedule with plain averaging (no alignment)."""

    name = "wa"
    label = "WA"
    matching = "none"


@register
class WeightMatching(DIMAT):
    """WM: DIMAT's schedule, neighbours aligned by weight matching instead of activations."""

    name = "wm"
    label = "WM"
    matching = "weights"
