"""The order a node draws its samples in: reshuffled passes, and class by class while its batch is paced."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import torch

from p2pnode.node.training import VisionObjective


def objective_over(class_sizes: list[int], batch_size: int, seed: int = 3) -> tuple[VisionObjective, np.ndarray]:
    """An objective over samples of the given class sizes (labels only: drawing batches needs no model)."""
    labels = np.repeat(np.arange(len(class_sizes)), class_sizes)
    indices = np.arange(len(labels)) + 1000  # the node's samples, not the dataset's first ones
    dataset_labels = np.full(1000 + len(labels), -1)
    dataset_labels[indices] = labels
    bank = SimpleNamespace(labels=torch.as_tensor(dataset_labels))
    model = SimpleNamespace(num_trainable=1)
    return VisionObjective(model, bank, indices, batch_size, seed=seed), dataset_labels


def draw(objective: VisionObjective, samples: int) -> np.ndarray:
    drawn = []
    while sum(len(b) for b in drawn) < samples:
        drawn.append(objective.next_batch())
    return np.concatenate(drawn)[:samples]


def test_a_full_batch_draws_plain_reshuffled_passes_as_before():
    objective, _ = objective_over([30, 30, 30], batch_size=10, seed=7)
    rng = np.random.default_rng(7)
    expected = np.concatenate([rng.permutation(objective.indices) for _ in range(3)])
    assert np.array_equal(draw(objective, 270), expected)


def test_a_paced_batch_takes_the_node_classes_in_turn():
    objective, labels = objective_over([40, 40, 40], batch_size=16)
    objective.batch_size = 3
    for _ in range(100):  # two and a half passes
        assert sorted(labels[objective.next_batch()]) == [0, 1, 2]
    objective.batch_size = 1
    one_by_one = labels[draw(objective, 30)]
    assert all(sorted(one_by_one[i : i + 3]) == [0, 1, 2] for i in range(0, 30, 3))


def test_a_paced_batch_keeps_unequal_classes_in_proportion_and_draws_each_sample_once_a_pass():
    sizes = [50, 20, 30]
    objective, labels = objective_over(sizes, batch_size=16)
    objective.batch_size = 2
    for _ in range(3):
        one_pass = draw(objective, 100)
        assert sorted(one_pass) == sorted(objective.indices)
        for end in range(1, 101):  # every prefix of the pass holds each class in proportion, within 2
            counts = Counter(labels[one_pass[:end]])
            assert all(abs(counts[c] - end * n / 100) <= 2 for c, n in enumerate(sizes)), (end, counts)


def test_a_batch_paced_mid_pass_still_draws_the_rest_of_that_pass_once():
    objective, labels = objective_over([25, 25, 25, 25], batch_size=16)
    first = draw(objective, 32)  # two full batches
    objective.batch_size = 4
    rest = draw(objective, 68)
    assert sorted(np.concatenate([first, rest])) == sorted(objective.indices)
    counts = Counter(labels[rest])
    assert all(
        abs(Counter(labels[rest[:end]])[c] - end * n / 68) <= 2 for end in range(1, 69) for c, n in counts.items()
    )
    objective.batch_size = 16  # back at the full batch: plain reshuffled passes again
    assert sorted(draw(objective, 100)) == sorted(objective.indices)


def test_a_position_read_while_a_batch_is_drawn_is_the_one_before_that_draw():
    """A checkpoint reads the position from the compute thread while a background gradient may be drawing
    (node/pace.py): read field by field, a new pass's generator state paired with the old pass's order."""
    objective, _ = objective_over([3, 3], batch_size=4)
    objective.next_batch()  # two samples left in this pass: the next draw starts a new one
    before = objective.position()
    real = objective.rng
    read_mid_draw = []

    def permute_and_read(x):
        out = real.permutation(x)
        read_mid_draw.append(objective.position())  # what a checkpoint in another thread would read now
        return out

    objective.rng = SimpleNamespace(permutation=permute_and_read, random=real.random, bit_generator=real.bit_generator)
    objective.next_batch()
    (mid,) = read_mid_draw
    assert mid.rng == before.rng and mid.samples_seen == before.samples_seen == 4
    assert np.array_equal(mid.order, before.order)


def test_a_resumed_position_draws_the_batches_the_node_would_have_drawn():
    objective, _ = objective_over([7, 5, 9], batch_size=4)
    draw(objective, 30)
    position = objective.position()
    resumed, _ = objective_over([7, 5, 9], batch_size=4, seed=99)  # another generator, replaced by the resume
    resumed.resume(position)
    assert np.array_equal(draw(resumed, 60), draw(objective, 60))
    assert resumed.samples_seen == objective.samples_seen
