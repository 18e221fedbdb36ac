"""`p2pnode simulate`: n nodes in one process over in-memory links, on the shared fine-tuning core."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..protocol.codecs import get_codec
from .algorithms import ALGORITHMS, StepRule
from .data import parse_split, partition
from .engine import InMemoryNetwork
from .settings import RunSettings
from .topology import Topology, make_topology
from .training import FeatureBank, VisionObjective, accuracy, prepare_model_and_data

# (algorithm, epoch, epochs, mean accuracy) after each evaluated epoch
EpochCallback = Callable[[str, int, int, float], None]


@dataclass
class AlgorithmResult:
    accuracy: list[float]
    bytes_sent: list[int]
    messages_sent: list[int]
    iterations: int
    seconds: float
    history: dict[str, list] = field(default_factory=dict)
    bytes_per_epoch: list[float] = field(default_factory=list)  # per node
    messages_per_epoch: list[float] = field(default_factory=list)


@dataclass
class SimulationResult:
    settings: dict
    results: dict[str, AlgorithmResult]
    fingerprint: str

    def to_json(self) -> dict:
        return {
            "settings": self.settings,
            "fingerprint": self.fingerprint,
            "results": {k: asdict(v) for k, v in self.results.items()},
        }


def cosine(lr: float, total: int) -> Callable[[int], float]:
    return lambda k: lr * 0.5 * (1 + math.cos(math.pi * min(k, total) / max(total, 1)))


def step_schedule(settings: RunSettings, total: int) -> Callable[[int], float]:
    return cosine(settings.lr, total) if settings.schedule == "cosine" else (lambda k: settings.lr)


def objective_seed(settings: RunSettings, node: int) -> int:
    """Mini-batch order of node `node`: the same in the simulator and in the daemon."""
    return settings.seed * 1000 + node


def iterations_per_epoch(total_samples: int, nodes: int, batch_size: int) -> int:
    """One epoch = one pass over all training data, summed over the nodes that train."""
    return max(1, math.ceil(total_samples / (nodes * batch_size)))


class Simulation:
    """Builds the model, data, partitions and feature caches once; runs any algorithm on them."""

    def __init__(self, settings: RunSettings, on_cache: Callable[[int, int], None] | None = None) -> None:
        self.settings = s = settings.validate()
        self.device = s.torch_device
        self.model, self.data = prepare_model_and_data(s, self.device)
        self.parts = partition(
            self.data.train_labels, parse_split(s.split), s.nodes, s.seed, self.data.num_classes, self.data.name
        )
        self.topology: Topology = make_topology(s.topology, s.nodes, s.seed)
        self.train_bank = FeatureBank(
            self.model,
            self.data.train,
            self.data.train_labels,
            np.concatenate(self.parts),
            s.cache_features,
            self.device,
            progress=on_cache,
        )
        self.test_bank = FeatureBank(self.model, self.data.test, self.data.test_labels, None, True, self.device)
        self.initial = self.model.trainable_vector().to(self.device)

    def run(self, name: str, on_epoch: EpochCallback | None = None) -> AlgorithmResult:
        s = self.settings
        cls = ALGORITHMS[name]
        if name == "central":
            topo, shards = make_topology("complete", 1), [np.concatenate(self.parts)]
        else:
            topo, shards = self.topology, self.parts
        per_epoch = iterations_per_epoch(sum(len(p) for p in shards), len(shards), s.batch_size)
        total = per_epoch * s.epochs
        lr = step_schedule(s, total)
        nodes = []
        for i, shard in enumerate(shards):
            objective = VisionObjective(
                self.model, self.train_bank, shard, s.batch_size, seed=objective_seed(s, i), weight_decay=s.weight_decay
            )
            codec = None if s.codec == "none" else get_codec(s.codec)
            step = StepRule(lr, s.momentum, s.optimizer)
            nodes.append(cls(topo.neighbourhood(i), objective, self.initial, step, codec, s.gamma))
            nodes[-1].configure(iterations_per_epoch=per_epoch, settings=s)
        net = InMemoryNetwork(nodes)
        self.nodes = nodes  # the last run's node objects, for inspection
        history: dict[str, list] = {"epoch": [], "accuracy": [], "loss": []}
        start = time.perf_counter()
        k = 0
        for epoch in range(1, s.epochs + 1):
            losses = []
            for _ in range(per_epoch):
                net.iteration(k)
                losses.append([n.last_loss for n in nodes])
                k += 1
            accs = [accuracy(self.model, n.params, self.test_bank) for n in nodes]
            history["epoch"].append(epoch)
            history["accuracy"].append(accs)
            history["loss"].append(np.mean(losses, axis=0).tolist())
            if on_epoch is not None:
                on_epoch(name, epoch, s.epochs, float(np.mean(accs)))
        return AlgorithmResult(
            accuracy=history["accuracy"][-1],
            bytes_sent=net.bytes_sent,
            messages_sent=net.messages_sent,
            iterations=total,
            seconds=time.perf_counter() - start,
            history=history,
            bytes_per_epoch=[b / s.epochs for b in net.bytes_sent],
            messages_per_epoch=[m / s.epochs for m in net.messages_sent],
        )


def simulate(
    settings: RunSettings, on_epoch: EpochCallback | None = None, on_cache: Callable[[int, int], None] | None = None
) -> SimulationResult:
    """Run `settings.algorithm` and every algorithm in `settings.compare` on the same data and model."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sim = Simulation(settings, on_cache)
    names = list(dict.fromkeys([settings.algorithm, *settings.compare]))
    results = {name: sim.run(name, on_epoch) for name in names}
    return SimulationResult(settings.to_dict(), results, sim.model.fingerprint)
