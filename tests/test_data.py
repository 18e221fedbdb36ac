"""Datasets (digits, image folders) and how their training samples are split among nodes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from p2pnode.cli.app import main
from p2pnode.node.data import load_data, parse_class_set, parse_split, partition
from p2pnode.node.errors import BadInput

DIGITS_SIZE, DIGITS_MEAN, DIGITS_STD = (1, 8, 8), (0.5,), (0.5,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", DIGITS_SIZE, DIGITS_MEAN, DIGITS_STD)


# --- digits -------------------------------------------------------------------------------------


def test_digits_split_is_1437_train_and_360_test(digits):
    assert len(digits.train) == 1437
    assert len(digits.test) == 360
    assert len(digits.train_labels) == 1437
    assert len(digits.test_labels) == 360
    assert digits.num_classes == 10
    assert digits.classes == [str(i) for i in range(10)]


def test_digits_test_set_holds_all_ten_classes(digits):
    counts = np.bincount(digits.test_labels, minlength=10)
    assert len(counts) == 10
    assert counts.min() >= 30  # stratified: about 36 per class


def test_digits_split_is_the_same_on_every_load(digits):
    again = load_data("digits", DIGITS_SIZE, DIGITS_MEAN, DIGITS_STD)
    np.testing.assert_array_equal(digits.train_labels, again.train_labels)
    np.testing.assert_array_equal(digits.test_labels, again.test_labels)
    assert torch.equal(digits.train.tensors[0], again.train.tensors[0])
    assert torch.equal(digits.test.tensors[0], again.test.tensors[0])


def test_digits_come_out_at_model_input_size_and_normalisation(digits):
    x, y = digits.train[0]
    assert x.shape == DIGITS_SIZE
    assert int(y) == digits.train_labels[0]
    images = digits.train.tensors[0]
    # pixels in [0, 1] normalised with mean 0.5 and std 0.5 lie in [-1, 1] and use both ends
    assert images.min().item() == pytest.approx(-1.0)
    assert images.max().item() == pytest.approx(1.0)


def test_train_and_test_images_do_not_overlap(digits):
    train = {tuple(x.flatten().tolist()) for x in digits.train.tensors[0]}
    test = [tuple(x.flatten().tolist()) for x in digits.test.tensors[0]]
    assert not any(t in train for t in test)


def test_unknown_dataset_name_raises_bad_input():
    with pytest.raises(BadInput, match="unknown dataset"):
        load_data("no-such-dataset", DIGITS_SIZE, DIGITS_MEAN, DIGITS_STD)


# --- split specs --------------------------------------------------------------------------------


def test_parse_split_reads_class_ranges_per_node():
    assert parse_split("0-1,2-3,4-6,7-9") == [[0, 1], [2, 3], [4, 5, 6], [7, 8, 9]]


def test_parse_split_reads_iid():
    assert parse_split("iid") == "iid"
    assert parse_split(" iid ") == "iid"


def test_parse_split_reads_dirichlet_alpha():
    assert parse_split("dirichlet:0.5") == 0.5
    assert parse_split("dirichlet:2") == 2.0


def test_parse_split_reads_unions_within_a_node():
    assert parse_split("0-1+5,2-4") == [[0, 1, 5], [2, 3, 4]]


def test_parse_class_set_reads_ranges_unions_and_lists():
    assert parse_class_set("0-1+5") == [0, 1, 5]
    assert parse_class_set("3") == [3]
    assert parse_class_set("0,3,5") == [0, 3, 5]
    assert parse_class_set("5+0-2") == [0, 1, 2, 5]
    assert parse_class_set("2-2") == [2]


@pytest.mark.parametrize(
    "spec", ["4-x", "3-1", "0-1,3-1", "dirichlet:-1", "dirichlet:0", "dirichlet:abc", "", "a", "1-2-3"]
)
def test_parse_split_rejects_malformed_spec(spec):
    with pytest.raises(BadInput, match="split"):
        parse_split(spec)


def test_parse_split_rejects_infinite_dirichlet_alpha():
    with pytest.raises(BadInput, match="dirichlet"):
        parse_split("dirichlet:inf")


@pytest.mark.parametrize("spec", ["4-x", "3-1", "", "x", "0-1+", "-1"])
def test_parse_class_set_rejects_malformed_spec(spec):
    with pytest.raises(BadInput, match="--classes"):
        parse_class_set(spec)


# --- partitions ---------------------------------------------------------------------------------


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())), "a sample is given to two nodes"
    assert sorted(joined.tolist()) == list(range(n)), "some sample is given to no node"


def test_partition_by_class_ranges_gives_each_node_exactly_its_classes(digits):
    labels = digits.train_labels
    spec = parse_split("0-1,2-3,4-6,7-9")
    parts = partition(labels, spec, 4, seed=0, num_classes=10)
    assert len(parts) == 4
    for classes, part in zip(spec, parts, strict=True):
        assert set(labels[part].tolist()) == set(classes)
        # every sample of the node's classes, not just some
        assert len(part) == int(np.isin(labels, classes).sum())
    assert_disjoint_cover(parts, len(labels))


def test_overlapping_class_sets_split_shared_class_evenly_without_duplication():
    labels = np.repeat(np.arange(3), [10, 21, 8])  # class 1 (21 samples) is claimed by both nodes
    parts = partition(labels, [[0, 1], [1, 2]], 2, seed=0, num_classes=3)
    shared = [int((labels[p] == 1).sum()) for p in parts]
    assert sorted(shared) == [10, 11]
    assert set(labels[parts[0]].tolist()) == {0, 1}
    assert set(labels[parts[1]].tolist()) == {1, 2}
    assert_disjoint_cover(parts, len(labels))


def test_class_claimed_by_three_nodes_is_split_in_thirds():
    labels = np.repeat(np.arange(4), [5, 30, 5, 5])
    parts = partition(labels, [[0, 1], [1, 2], [1, 3]], 3, seed=1, num_classes=4)
    assert [int((labels[p] == 1).sum()) for p in parts] == [10, 10, 10]
    assert_disjoint_cover(parts, len(labels))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5"])
def test_iid_and_dirichlet_are_disjoint_and_cover_everything(digits, spec):
    labels = digits.train_labels
    parts = partition(labels, parse_split(spec), 4, seed=0, num_classes=10)
    assert len(parts) == 4
    assert all(len(p) > 0 for p in parts)
    assert_disjoint_cover(parts, len(labels))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5"])
def test_iid_and_dirichlet_are_seeded(digits, spec):
    labels = digits.train_labels
    a = partition(labels, parse_split(spec), 4, seed=7, num_classes=10)
    b = partition(labels, parse_split(spec), 4, seed=7, num_classes=10)
    c = partition(labels, parse_split(spec), 4, seed=8, num_classes=10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_partition_is_stratified(digits):
    labels = digits.train_labels
    parts = partition(labels, "iid", 4, seed=0, num_classes=10)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for p in parts:
        counts = np.bincount(labels[p], minlength=10)
        expected = np.bincount(labels, minlength=10) / 4
        assert np.all(np.abs(counts - expected) <= 1)


def test_small_dirichlet_alpha_gives_skewed_class_mixes(digits):
    labels = digits.train_labels
    parts = partition(labels, 0.05, 4, seed=0, num_classes=10)
    # with a tiny alpha most of each node's samples come from a few classes
    top = [np.sort(np.bincount(labels[p], minlength=10))[-3:].sum() / len(p) for p in parts]
    assert min(top) > 0.6


def test_partition_with_classes_missing_from_data_raises_bad_input(digits):
    with pytest.raises(BadInput, match="class 10 is not in digits"):
        partition(digits.train_labels, parse_split("0-1,2-3,4-6,7-12"), 4, 0, 10, "digits")


def test_partition_with_wrong_number_of_class_sets_raises_bad_input(digits):
    with pytest.raises(BadInput, match="3 class sets"):
        partition(digits.train_labels, parse_split("0-1,2-3,4-9"), 4, 0, 10)


def test_partition_leaving_a_node_without_samples_raises_bad_input():
    labels = np.repeat(np.arange(3), 5)  # class 3 exists in the label space but has no samples
    with pytest.raises(BadInput, match="node 1 gets no training samples"):
        partition(labels, [[0, 1, 2], [3]], 2, 0, num_classes=4)


# --- image folders ------------------------------------------------------------------------------


def write_images(root: Path, classes: list[str], per_class: int, size: int = 12, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{k}.png")


CLASSES = ["cat", "dog", "fox"]


@pytest.mark.parametrize(
    ("size", "mean", "std"),
    [(DIGITS_SIZE, DIGITS_MEAN, DIGITS_STD), ((3, 32, 32), IMAGENET_MEAN, IMAGENET_STD)],
)
def test_image_folder_without_split_loads_at_model_input_size(tmp_path, size, mean, std):
    root = tmp_path / "pics"
    write_images(root, CLASSES, 10)
    data = load_data(str(root), size, mean, std)
    assert data.name == "pics"
    assert data.num_classes == 3
    assert data.classes == CLASSES
    assert len(data.train) == 24
    assert len(data.test) == 6
    assert np.bincount(data.test_labels, minlength=3).tolist() == [2, 2, 2]  # stratified 80/20
    x, y = data.train[0]
    assert x.shape == size
    assert x.dtype == torch.float32
    assert y == data.train_labels[0]
    assert data.test[0][0].shape == size


def test_image_folder_split_is_fixed(tmp_path):
    root = tmp_path / "pics"
    write_images(root, CLASSES, 10)
    a = load_data(str(root), DIGITS_SIZE, DIGITS_MEAN, DIGITS_STD)
    b = load_data(str(root), DIGITS_SIZE, DIGITS_MEAN, DIGITS_STD)
    assert list(a.train.indices) == list(b.train.indices)
    assert set(a.train.indices).isdisjoint(a.test.indices)
    assert len(set(a.train.indices) | set(a.test.indices)) == 30


@pytest.mark.parametrize("test_dir", ["test", "val"])
def test_image_folder_with_train_and_test_subfolders_uses_them(tmp_path, test_dir):
    root = tmp_path / "pics"
    write_images(root / "train", CLASSES, 4, seed=1)
    write_images(root / test_dir, CLASSES, 2, seed=2)
    data = load_data(str(root), (3, 32, 32), IMAGENET_MEAN, IMAGENET_STD)
    assert data.num_classes == 3
    assert data.classes == CLASSES
    assert len(data.train) == 12
    assert len(data.test) == 6
    assert data.train_labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.test_labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.train[0][0].shape == (3, 32, 32)
    assert data.test[5][0].shape == (3, 32, 32)


def test_image_folder_with_only_train_subfolder_keeps_its_class_folders(tmp_path):
    root = tmp_path / "pics"
    write_images(root / "train", CLASSES, 5)
    try:
        data = load_data(str(root), DIGITS_SIZE, DIGITS_MEAN, DIGITS_STD)
    except BadInput:
        return  # refusing the layout with a clear message is fine too
    assert data.classes == CLASSES
    assert data.num_classes == 3


def test_image_folder_normalises_with_model_mean_and_std(tmp_path):
    root = tmp_path / "grey"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    for c, value in (("a", 255), ("b", 0)):
        for k in range(5):
            Image.new("RGB", (12, 12), (value, value, value)).save(root / c / f"{k}.png")
    data = load_data(str(root), (3, 16, 16), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    for ds, labels in ((data.train, data.train_labels), (data.test, data.test_labels)):
        for i in range(len(ds)):
            x, _ = ds[i]
            expected = 2.0 if labels[i] == 0 else -2.0  # (1 - 0.5) / 0.25 and (0 - 0.5) / 0.25
            assert torch.allclose(x, torch.full_like(x, expected), atol=1e-5)


def test_image_folder_with_mismatched_class_folders_raises_bad_input(tmp_path):
    root = tmp_path / "pics"
    write_images(root / "train", CLASSES, 2)
    write_images(root / "test", ["cat", "dog"], 2)
    with pytest.raises(BadInput, match="different class folders"):
        load_data(str(root), DIGITS_SIZE, DIGITS_MEAN, DIGITS_STD)


def test_folder_without_images_raises_bad_input(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(BadInput, match="not an image folder"):
        load_data(str(tmp_path / "empty"), DIGITS_SIZE, DIGITS_MEAN, DIGITS_STD)


def test_a_file_that_is_not_an_image_is_named_in_one_line_when_read(tmp_path, capsys):
    root = tmp_path / "pics"
    write_images(root / "train", CLASSES, 4)
    write_images(root / "test", CLASSES, 2)
    (root / "train" / "dog" / "broken.png").write_bytes(b"not a png")  # PIL's traceback before
    data = load_data(str(root), DIGITS_SIZE, DIGITS_MEAN, DIGITS_STD)
    with pytest.raises(BadInput, match=r"broken\.png is not a readable image \(UnidentifiedImageError\): fix or"):
        [data.train[i] for i in range(len(data.train))]
    code = main(["simulate", "--data", str(root), "--split", "iid", "--nodes", "2", "--epochs", "1"])
    assert code == 2 and "broken.png is not a readable image" in capsys.readouterr().err


def test_a_daemons_own_samples_are_its_classes_or_its_share_of_the_split():
    from p2pnode.node.settings import NodeSettings
    from p2pnode.node.training import local_indices

    labels = np.repeat(np.arange(10), 5)
    by_classes = local_indices(NodeSettings(classes="7-9"), labels, 10, "digits")
    assert sorted(set(labels[by_classes])) == [7, 8, 9] and len(by_classes) == 15
    share = local_indices(NodeSettings(index=2, nodes=4, split="0-1,2-3,4-6,7-9"), labels, 10, "digits")
    assert sorted(set(labels[share])) == [4, 5, 6]
    with pytest.raises(BadInput, match="class 10 is not in digits"):
        local_indices(NodeSettings(classes="10-11"), labels, 10, "digits")
    with pytest.raises(BadInput, match="give this node its data"):
        local_indices(NodeSettings(), labels, 10, "digits")
    with pytest.raises(BadInput, match="no training samples"):
        local_indices(NodeSettings(classes="3"), np.repeat([0, 1, 2], 5), 10, "digits")


def test_an_image_broken_mid_run_with_augment_is_left_out_and_training_goes_on(tmp_path, caplog):
    # --augment reads every image each time it is drawn: one changed on disk mid-run stopped the daemon
    # with its BadInput; now it leaves the node's samples (named once in the log) and the rest train on
    from p2pnode.node.models import build_model
    from p2pnode.node.training import FeatureBank, VisionObjective

    root = tmp_path / "pics"
    write_images(root / "train", CLASSES, 4)
    write_images(root / "test", CLASSES, 1)
    model = build_model("vit_digits", num_classes=3)
    data = load_data(str(root), model.input_size, model.mean, model.std, augment=True)
    mine = np.arange(len(data.train))
    bank = FeatureBank(model, data.train, data.train_labels, mine, cached=False)
    objective = VisionObjective(model, bank, mine, batch_size=4, seed=0)
    params = model.trainable_vector()
    objective.gradient(params)
    broken = root / "train" / "dog" / "1.png"
    broken.write_bytes(b"truncated")
    seen = objective.samples_seen
    for _ in range(8):  # two and a half passes over the 12 samples, each batch drawn again
        grad, loss = objective.gradient(params)
        assert torch.isfinite(grad).all() and np.isfinite(loss)
    assert objective.samples_seen - seen >= 8 * 3
    assert len(bank.unreadable) == 1 and len(objective.indices) == 11
    warnings = [r.getMessage() for r in caplog.records if "training goes on without it" in r.getMessage()]
    assert len(warnings) == 1 and "1.png is not a readable image" in warnings[0]
    for path in (root / "train").rglob("*.png"):
        path.write_bytes(b"gone")
    with pytest.raises(BadInput, match="none of this node's training images can be read any more"):
        objective.gradient(params)
