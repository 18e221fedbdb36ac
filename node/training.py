"""Local fine-tuning: the frozen-feature cache, a node's loss on its own data, and evaluation.

With the trunk frozen and no augmentation, the input of the first trainable block is a fixed
function of the image, so `FeatureBank(cached=True)` computes it once per sample and reuses it
every epoch. With augmentation each draw is a new image and the trunk runs every time; an image that can no
longer be read mid-run (changed or removed on disk) is then left out of training and named once in the
log, where a bad image found before the first round stops the node with one line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Dataset

from .data import ImageData, load_data, parse_class_set, parse_split, partition
from .errors import BadInput
from .models import FineTuneModel, build_model

if TYPE_CHECKING:
    from .settings import NodeSettings, RunSettings

Progress = Callable[[int, int], None]
logger = logging.getLogger(__name__)


def prepare_model_and_data(settings: RunSettings, device: torch.device) -> tuple[FineTuneModel, ImageData]:
    """The model (frozen trunk + new head for the data's classes) and the data at its input size."""
    s = settings
    probe = build_model(s.model, 1, s.trainable_blocks, False, None, s.model_seed)
    data = load_data(s.data, probe.input_size, probe.mean, probe.std, s.data_root, s.augment, s.download)
    model = build_model(s.model, data.num_classes, s.trainable_blocks, s.pretrained, s.checkpoint, s.model_seed)
    return model.to(device), data


def local_indices(settings: NodeSettings, labels: np.ndarray, num_classes: int, dataset: str) -> np.ndarray:
    """A daemon's own training samples: those of `--classes`, or its share (`--index`) of `--split`."""
    s = settings
    if s.classes is not None:
        classes = parse_class_set(s.classes)
        missing = [c for c in classes if c >= num_classes]
        if missing:
            raise BadInput(f"class {missing[0]} is not in {dataset} (classes 0-{num_classes - 1})")
        indices = np.flatnonzero(np.isin(labels, classes))
    elif s.index < 0:
        raise BadInput("give this node its data: --classes RANGES, or --index N to take its share of --split")
    else:
        indices = partition(labels, parse_split(s.split), s.nodes, s.seed, num_classes, dataset)[s.index]
    if len(indices) == 0:
        raise BadInput("this node has no training samples: check --classes")
    return indices


class FeatureBank:
    """Maps sample indices of one dataset to trainable-block inputs (and labels)."""

    def __init__(
        self,
        model: FineTuneModel,
        dataset: Dataset,
        labels: np.ndarray,
        indices: Sequence[int] | None = None,
        cached: bool = True,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        progress: Progress | None = None,
    ) -> None:
        self.model, self.dataset, self.device, self.cached = model, dataset, torch.device(device), cached
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.unreadable: set[int] = set()  # uncached: samples whose image could not be read when drawn
        self._rows: torch.Tensor | None = None
        if cached:
            idx = np.arange(len(dataset)) if indices is None else np.unique(np.asarray(indices))
            self._pos = torch.full((len(dataset),), -1, dtype=torch.long)
            self._pos[torch.as_tensor(idx)] = torch.arange(len(idx))
            chunks = []
            for start in range(0, len(idx), batch_size):
                chunks.append(self._features([self.dataset[int(i)][0] for i in idx[start : start + batch_size]]))
                if progress is not None:
                    progress(min(start + batch_size, len(idx)), len(idx))
            self._rows = torch.cat(chunks) if chunks else torch.empty(0)

    def _features(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.model.features(torch.stack(list(images)).to(self.device))

    def _draw(self, idx: Sequence[int]) -> tuple[list[int], list[torch.Tensor]]:
        """The images of `idx` that read now; one that does not joins `unreadable`, named in the log."""
        kept, images = [], []
        for i in idx:
            if i in self.unreadable:
                continue
            try:
                images.append(self.dataset[i][0])
            except BadInput as e:
                self.unreadable.add(i)
                logger.warning("%s; training goes on without it", e)
            else:
                kept.append(i)
        return kept, images

    def get(self, idx: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Trainable-block inputs and labels of `idx`; uncached, without the images that cannot be read."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if self._rows is None:
            kept, images = self._draw(idx.tolist())
            labels = self.labels[kept].to(self.device)
            if not kept:
                return torch.empty(0, device=self.device), labels
            return self._features(images), labels
        labels = self.labels[idx].to(self.device)
        pos = self._pos[idx]
        if (pos < 0).any():
            raise KeyError(f"sample {int(idx[pos < 0][0])} is not in this feature cache")
        return self._rows[pos], labels


@dataclass(frozen=True)
class BatchPosition:
    """The samples left in the current pass (in order), the shuffling generator's state, and how many
    samples have been drawn: what a restart needs to go on with the same data order."""

    order: np.ndarray
    rng: dict
    samples_seen: int


class VisionObjective:
    """One node's cross-entropy on its own samples; `gradient` draws the next shuffled mini-batch.

    Every pass draws each sample once, in a new random order. While the batch is below the one it was
    built with (a slow node's `--pace-batch`), the samples left in the pass are drawn class by class
    in turn (stratified reshuffling): a batch of 3 from classes 7-9 holds one of each, and a batch of 1
    cycles through them. Each pass still weighs every sample once, so the objective is unchanged; what
    changes is that a few consecutive small batches see the node's classes in their proportions, where
    random ones leave the momentum buffer leaning on one class for rounds (README: slow volunteers).
    """

    def __init__(
        self,
        model: FineTuneModel,
        bank: FeatureBank,
        indices: np.ndarray,
        batch_size: int,
        seed: int,
        weight_decay: float = 0.0,
    ) -> None:
        self.model, self.bank = model, bank
        self.indices = np.asarray(indices)
        self.batch_size = min(batch_size, len(self.indices))
        self.full_batch = self.batch_size  # a paced (smaller) batch draws class by class
        self.weight_decay = weight_decay
        self.rng = np.random.default_rng(seed)
        self.dim = model.num_trainable
        self._order = np.empty(0, dtype=np.int64)
        self._by_class = False  # whether the samples left in `_order` are interleaved by class
        self.samples_seen = 0
        self._left_out = 0  # how many of the bank's unreadable images `indices` no longer holds
        self._position = self._snapshot()

    def next_batch(self) -> np.ndarray:
        paced = self.batch_size < self.full_batch
        if paced and not self._by_class:
            self._order, self._by_class = self.interleave_classes(self._order), True
        elif not paced:
            self._by_class = False
        if len(self._order) < self.batch_size:
            new_pass = self.rng.permutation(self.indices)
            self._order = np.concatenate([self._order, self.interleave_classes(new_pass) if paced else new_pass])
        batch, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        self.samples_seen += len(batch)
        self._position = self._snapshot()
        return batch

    def _snapshot(self) -> BatchPosition:
        return BatchPosition(self._order, self.rng.bit_generator.state, self.samples_seen)

    def position(self) -> BatchPosition:
        """Where this node is in its passes over its data, as of its last draw: a checkpoint's (read by
        another thread while a background gradient, node/pace.py, may be drawing the next batch; read
        field by field, the generator of a new pass could pair with the order of the old one)."""
        return self._position

    def resume(self, position: BatchPosition) -> None:
        """Continue from a checkpoint's position instead of replaying the node's first passes."""
        self._order, self.samples_seen = position.order, position.samples_seen
        self.rng.bit_generator.state = position.rng
        self._position = self._snapshot()

    def interleave_classes(self, order: np.ndarray) -> np.ndarray:
        """`order` with its classes taken in turn, each in proportion to its count and in its own order
        within `order`: sample r of a class of n goes to position key (r + u) / n, u uniform per class."""
        labels = self.bank.labels.numpy()[order]
        keys = np.empty(len(order))
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            keys[members] = (np.arange(len(members)) + self.rng.random()) / len(members)
        return order[np.argsort(keys, kind="stable")]

    def loss(self, params: torch.Tensor, batch: np.ndarray) -> torch.Tensor:
        return self._loss(params, *self.bank.get(batch))

    def _loss(self, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(self.model.logits(params, x), y)
        if self.weight_decay:
            loss = loss + 0.5 * self.weight_decay * params.pow(2).sum()
        return loss

    def _readable_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next mini-batch's inputs, without images that could not be read (uncached banks only):
        those leave this node's samples for good, and a batch left empty is drawn again."""
        for _ in range(len(self.indices) + 1):  # an empty draw finds at least one more unreadable image
            x, y = self.bank.get(self.next_batch())
            if len(self.bank.unreadable) > self._left_out:  # only when a draw found a new one
                self._left_out = len(self.bank.unreadable)
                bad = np.fromiter(self.bank.unreadable, dtype=np.int64)
                self.indices = self.indices[~np.isin(self.indices, bad)]
                self._order = self._order[~np.isin(self._order, bad)]
                self._position = self._snapshot()
            if len(y):
                return x, y
            if len(self.indices) == 0:
                break
        raise BadInput(
            f"none of this node's training images can be read any more ({len(self.bank.unreadable)} failed): "
            "restore its data folder and start it again: it resumes from its last checkpoint in --state-dir"
        )

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        leaf = params.detach().requires_grad_(True)
        loss = self._loss(leaf, *self._readable_batch())
        (grad,) = torch.autograd.grad(loss, leaf)
        return grad, float(loss.detach())


@torch.no_grad()
def accuracy(model: FineTuneModel, params: torch.Tensor, bank: FeatureBank, batch_size: int = 512) -> float:
    """Top-1 accuracy of `params` on every sample of `bank`'s dataset."""
    n = len(bank.labels)
    correct = 0
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(start + batch_size, n))
        x, y = bank.get(idx)
        correct += int((model.logits(params, x).argmax(1) == y).sum())
    return correct / max(n, 1)
