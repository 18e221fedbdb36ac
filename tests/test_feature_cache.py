"""The frozen-feature cache changes nothing: cached and uncached trunk features give the same loss and gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from p2pnode.node.data import load_data, partition
from p2pnode.node.models import build_model
from p2pnode.node.training import FeatureBank, VisionObjective, accuracy


def compare_gradients(model, dataset, labels, indices, batch_size, steps, seed=5):
    """Run `steps` gradients at perturbed parameters through a cached and an uncached bank."""
    cached = FeatureBank(model, dataset, labels, indices, cached=True)
    uncached = FeatureBank(model, dataset, labels, indices, cached=False)
    assert cached._rows is not None and uncached._rows is None  # the two paths really differ
    a = VisionObjective(model, cached, indices, batch_size, seed=seed)
    b = VisionObjective(model, uncached, indices, batch_size, seed=seed)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        params = model.trainable_vector() + 0.01 * torch.randn(model.num_trainable, generator=g)
        grad_a, loss_a = a.gradient(params)
        grad_b, loss_b = b.gradient(params)
        assert grad_a.shape == (model.num_trainable,)
        assert grad_a.abs().max().item() > 0, "the gradient must not vanish, or the comparison proves nothing"
        assert abs(loss_a - loss_b) <= 1e-5
        assert (grad_a - grad_b).abs().max().item() <= 1e-5
    assert a.samples_seen == b.samples_seen == steps * min(batch_size, len(indices))
    return cached, uncached


@pytest.fixture(scope="module")
def digits_setup():
    model = build_model("vit_digits")
    data = load_data("digits", model.input_size, model.mean, model.std)
    return model, data


def test_cached_and_uncached_features_give_same_loss_and_gradient_on_digits(digits_setup):
    model, data = digits_setup
    parts = partition(data.train_labels, [[0, 1, 2], [3, 4, 5, 6, 7, 8, 9]], 2, seed=0, num_classes=10)
    compare_gradients(model, data.train, data.train_labels, parts[0], batch_size=32, steps=4)


def test_cached_features_equal_trunk_output(digits_setup):
    model, data = digits_setup
    idx = np.array([5, 17, 400, 1000])
    bank = FeatureBank(model, data.train, data.train_labels, idx, cached=True)
    x, y = bank.get(idx)
    images = torch.stack([data.train[i][0] for i in idx])
    assert (x - model.features(images)).abs().max().item() <= 1e-6
    assert y.tolist() == data.train_labels[idx].tolist()


def test_cached_and_uncached_banks_give_same_accuracy(digits_setup):
    model, data = digits_setup
    params = model.trainable_vector()
    cached = FeatureBank(model, data.test, data.test_labels, None, cached=True)
    uncached = FeatureBank(model, data.test, data.test_labels, None, cached=False)
    assert accuracy(model, params, cached) == accuracy(model, params, uncached)


def test_feature_cache_rejects_sample_it_did_not_cache(digits_setup):
    model, data = digits_setup
    bank = FeatureBank(model, data.train, data.train_labels, [1, 2, 3], cached=True)
    with pytest.raises(KeyError, match="sample 4"):
        bank.get([1, 4])


@pytest.mark.timeout(120)
def test_cached_and_uncached_features_give_same_gradient_for_deit_on_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for split in ("train", "test"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for k in range(2):
                pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "imgs" / split / c / f"{k}.png")
    model = build_model("deit_small_patch16_224", num_classes=2)
    data = load_data(str(tmp_path / "imgs"), model.input_size, model.mean, model.std)
    assert data.train[0][0].shape == (3, 224, 224)
    indices = np.arange(len(data.train))
    assert len(indices) == 4
    compare_gradients(model, data.train, data.train_labels, indices, batch_size=4, steps=1)
