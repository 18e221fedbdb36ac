"""Datasets and how they are split among nodes.

Built in: `digits` (scikit-learn, 1,797 8x8 images, fixed stratified 80/20 split). Image folders
(ImageFolder layout: `ROOT/train` and `ROOT/test` or `ROOT/val` if present, else a fixed stratified
80/20 split of ROOT). torchvision's CIFAR-10, CIFAR-100, Flowers102 and Oxford-IIIT Pets from
`--data-root`, downloaded there with `--download` on a machine that reaches their hosts.
Every image comes out at the model's input size, channel count and normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import BadInput

if TYPE_CHECKING:
    from torchvision.transforms import Compose

DATASETS = ("digits", "cifar10", "cifar100", "flowers102", "pets", "PATH (image folder)")
DEFAULT_DATA_ROOT = Path.home() / ".cache" / "p2pnode" / "data"


@dataclass
class ImageData:
    name: str
    train: Dataset
    test: Dataset
    train_labels: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    classes: list[str]


def _to_model_input(
    x: torch.Tensor, size: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] -> the model's channels, resolution and normalisation."""
    c, h, w = size
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    if x.shape[1] != c:
        x = x.mean(1, keepdim=True).expand(-1, c, -1, -1) if c in (1, 3) else x
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return ((x - m) / s).contiguous()


def load_digits_data(size: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...]) -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = np.asarray(d.target, dtype=np.int64)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    x = _to_model_input(x, size, mean, std)
    return ImageData(
        "digits",
        TensorDataset(x[tr], torch.from_numpy(y[tr])),
        TensorDataset(x[te], torch.from_numpy(y[te])),
        y[tr],
        y[te],
        10,
        [str(i) for i in range(10)],
    )


def _transforms(size: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...], augment: bool) -> Compose:
    from torchvision import transforms as T

    c, h, w = size
    steps = [T.Grayscale(1)] if c == 1 else [T.Lambda(lambda im: im.convert("RGB"))]
    if augment:
        steps += [T.RandomResizedCrop((h, w), scale=(0.6, 1.0), antialias=True), T.RandomHorizontalFlip()]
    else:
        steps += [T.Resize((h, w), antialias=True)]
    steps += [
        T.ToTensor(),
        T.Normalize(mean[:c] if len(mean) >= c else mean * c, std[:c] if len(std) >= c else std * c),
    ]
    return T.Compose(steps)


def _stratified_split(labels: np.ndarray, test_fraction: float = 0.2) -> list[np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    counts = np.bincount(labels)
    strat = labels if counts[counts > 0].min() >= 2 else None
    return train_test_split(idx, test_size=test_fraction, stratify=strat, random_state=0)


def _read_image(path: str) -> Image.Image:
    """ImageFolder's loader, with a file that is not an image named in one line instead of PIL's traceback."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadInput(f"{path} is not a readable image ({type(e).__name__}): fix or remove it") from None


def load_image_folder(
    root: Path, size: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...], augment: bool
) -> ImageData:
    from torchvision.datasets import ImageFolder

    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    try:
        if train_dir.is_dir() and test_dir is not None:
            train = ImageFolder(str(train_dir), transform=_transforms(size, mean, std, augment), loader=_read_image)
            test = ImageFolder(str(test_dir), transform=_transforms(size, mean, std, False), loader=_read_image)
            if test.classes != train.classes:
                raise BadInput(f"{train_dir} and {test_dir} hold different class folders")
            return ImageData(
                root.name,
                train,
                test,
                np.asarray(train.targets),
                np.asarray(test.targets),
                len(train.classes),
                train.classes,
            )
        whole = train_dir if train_dir.is_dir() else root  # ROOT/train alone: split it 80/20
        full_train = ImageFolder(str(whole), transform=_transforms(size, mean, std, augment), loader=_read_image)
        full_test = ImageFolder(str(whole), transform=_transforms(size, mean, std, False), loader=_read_image)
    except (FileNotFoundError, RuntimeError) as e:
        raise BadInput(f"{root} is not an image folder ({e}); expected ROOT/CLASS/IMAGE files") from None
    labels = np.asarray(full_train.targets)
    tr, te = _stratified_split(labels)
    return ImageData(
        root.name,
        Subset(full_train, tr),
        Subset(full_test, te),
        labels[tr],
        labels[te],
        len(full_train.classes),
        full_train.classes,
    )


def load_torchvision(
    name: str,
    root: Path,
    size: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    augment: bool,
    download: bool,
) -> ImageData:
    from torchvision import datasets as D

    train_tf, test_tf = _transforms(size, mean, std, augment), _transforms(size, mean, std, False)
    try:
        if name in ("cifar10", "cifar100"):
            cls = D.CIFAR10 if name == "cifar10" else D.CIFAR100
            train = cls(str(root), train=True, transform=train_tf, download=download)
            test = cls(str(root), train=False, transform=test_tf, download=download)
            ytr, yte, classes = np.asarray(train.targets), np.asarray(test.targets), list(train.classes)
        elif name == "flowers102":
            parts = [D.Flowers102(str(root), split=s, transform=train_tf, download=download) for s in ("train", "val")]
            train = torch.utils.data.ConcatDataset(parts)
            test = D.Flowers102(str(root), split="test", transform=test_tf, download=download)
            ytr = np.concatenate([np.asarray(p._labels) for p in parts])
            yte, classes = np.asarray(test._labels), [str(i) for i in range(102)]
        else:
            train = D.OxfordIIITPet(str(root), split="trainval", transform=train_tf, download=download)
            test = D.OxfordIIITPet(str(root), split="test", transform=test_tf, download=download)
            ytr, yte, classes = np.asarray(train._labels), np.asarray(test._labels), list(train.classes)
    except (RuntimeError, OSError) as e:
        how = "the download failed" if download else "pass --download to fetch it"
        raise BadInput(
            f"dataset {name} is not under {root} ({how}: {str(e).splitlines()[0]}); "
            f"or use --data digits, which ships with scikit-learn"
        ) from None
    return ImageData(name, train, test, ytr, yte, len(classes), classes)


def load_data(
    name: str,
    size: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    root: str | Path | None = None,
    augment: bool = False,
    download: bool = False,
) -> ImageData:
    """Load a dataset by name (see DATASETS) or an image folder by path, at the model's input size."""
    if name == "digits":
        return load_digits_data(size, mean, std)
    if name in ("cifar10", "cifar100", "flowers102", "pets"):
        return load_torchvision(name, Path(root or DEFAULT_DATA_ROOT), size, mean, std, augment, download)
    path = Path(name)
    if path.is_dir():
        return load_image_folder(path, size, mean, std, augment)
    raise BadInput(f"unknown dataset {name!r}: use one of {', '.join(DATASETS[:5])} or a folder of images")


# --- partitions ------------------------------------------------------------------------------------


def parse_class_set(spec: str, what: str = "--classes") -> list[int]:
    """'0-1' or '0-1+5' (and, for a single node, '0,3,5') -> sorted class ids."""
    classes: set[int] = set()
    for part in spec.replace(",", "+").split("+"):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-"))
                if lo > hi:
                    raise ValueError
                classes.update(range(lo, hi + 1))
            else:
                classes.add(int(part))
        except ValueError:
            raise BadInput(
                f"bad {what} {spec!r}: write class ranges like 0-1 or 0-1+5 (non-negative, low-high)"
            ) from None
    if any(c < 0 for c in classes):
        raise BadInput(f"bad {what} {spec!r}: class ids start at 0")
    return sorted(classes)


def parse_split(spec: str) -> list[list[int]] | str | float:
    """'0-1,2-3,4-6,7-9' -> one class set per node; 'iid' -> 'iid'; 'dirichlet:A' -> A."""
    spec = spec.strip()
    if spec == "iid":
        return "iid"
    if spec.startswith("dirichlet:"):
        try:
            alpha = float(spec.split(":", 1)[1])
        except ValueError:
            alpha = -1.0
        if not (alpha > 0 and math.isfinite(alpha)):
            raise BadInput(f"bad --split {spec!r}: write dirichlet:ALPHA with ALPHA > 0, e.g. dirichlet:0.5")
        return alpha
    if not spec:
        raise BadInput("empty --split: write class ranges per node (0-1,2-3,4-6,7-9), iid or dirichlet:ALPHA")
    return [parse_class_set(s, "--split") for s in spec.split(",")]


def check_classes(classes: list[int], num_classes: int, dataset: str) -> None:
    missing = [c for c in classes if c >= num_classes]
    if missing:
        raise BadInput(f"class {missing[0]} is not in {dataset} (it has classes 0-{num_classes - 1})")


def partition(
    labels: np.ndarray,
    spec: list[list[int]] | str | float,
    nodes: int,
    seed: int,
    num_classes: int,
    dataset: str = "the dataset",
) -> list[np.ndarray]:
    """Indices of each node's training samples. Class sets claimed by several nodes are split evenly."""
    rng = np.random.default_rng(seed)
    if isinstance(spec, list):
        if len(spec) != nodes:
            raise BadInput(f"--split lists {len(spec)} class sets but the run has {nodes} nodes; give one per node")
        for s in spec:
            check_classes(s, num_classes, dataset)
        parts: list[list[int]] = [[] for _ in range(nodes)]
        for c in range(num_classes):
            owners = [i for i, s in enumerate(spec) if c in s]
            idx = rng.permutation(np.flatnonzero(labels == c))
            for owner, chunk in zip(owners, np.array_split(idx, len(owners)) if owners else [], strict=False):
                parts[owner].extend(chunk.tolist())
        out = [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    elif spec == "iid":
        idx = rng.permutation(len(labels))
        idx = idx[np.argsort(labels[idx], kind="stable")]  # stratified round-robin
        out = [np.sort(idx[i::nodes]) for i in range(nodes)]
    else:
        out = _dirichlet(labels, float(spec), nodes, rng, num_classes)
    for i, p in enumerate(out):
        if len(p) == 0:
            raise BadInput(f"node {i} gets no training samples from this split; give it classes present in the data")
    return out


def _dirichlet(
    labels: np.ndarray, alpha: float, nodes: int, rng: np.random.Generator, num_classes: int
) -> list[np.ndarray]:
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(nodes)]
        for c in range(num_classes):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet([alpha] * nodes)) * len(idx)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].extend(chunk.tolist())
        if all(parts):
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise BadInput(f"dirichlet:{alpha} leaves a node without samples; use a larger ALPHA or fewer nodes")
