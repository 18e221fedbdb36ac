"""The settings of one run, shared by `p2pnode simulate` and (later) `p2pnode start`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .algorithms import ALGORITHMS
from .data import parse_split
from .errors import BadInput
from .models import DEFAULT_MODEL

SCHEDULES = ("cosine", "constant")


@dataclass
class RunSettings:
    # model
    model: str = DEFAULT_MODEL
    trainable_blocks: int = 1
    pretrained: bool = False
    checkpoint: str | None = None
    model_seed: int = 0
    # data
    data: str = "digits"
    data_root: str | None = None
    download: bool = False
    augment: bool = False
    cache_features: bool = True
    split: str = "0-1,2-3,4-6,7-9"
    nodes: int = 4
    # graph and algorithm
    topology: str = "directed-ring"
    algorithm: str = "p2pft"
    compare: list[str] = field(default_factory=list)
    # training
    epochs: int = 40
    lr: float = 0.05
    schedule: str = "cosine"
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"

    def validate(self) -> RunSettings:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise BadInput(f"--lr must be a positive step size (got {self.lr})")
        if self.epochs < 1:
            raise BadInput(f"--epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            raise BadInput(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.nodes < 1:
            raise BadInput(f"--nodes must be at least 1 (got {self.nodes})")
        if not 0 <= self.momentum < 1:
            raise BadInput(f"--momentum must be in [0, 1) (got {self.momentum})")
        if self.weight_decay < 0:
            raise BadInput(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if self.schedule not in SCHEDULES:
            raise BadInput(f"unknown --schedule {self.schedule!r}: use {' or '.join(SCHEDULES)}")
        for name in [self.algorithm, *self.compare]:
            if name not in ALGORITHMS:
                raise BadInput(f"unknown algorithm {name!r}: choose from {', '.join(sorted(ALGORITHMS))}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise BadInput(f"unknown --device {self.device!r}: use auto, cpu or cuda[:N]")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BadInput(f"--device {self.device} asked for, but this machine has no CUDA GPU; use --device cpu")
        split = parse_split(self.split)
        if isinstance(split, list) and len(split) != self.nodes:
            raise BadInput(f"--split lists {len(split)} class sets but --nodes is {self.nodes}; give one per node")
        if self.augment:
            self.cache_features = False
        return self

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_dict(self) -> dict:
        return asdict(self)
