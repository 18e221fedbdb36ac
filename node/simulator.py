"""`p2pnode simulate`: n nodes in one process over in-memory links, on the shared fine-tuning core.

With `--churn` (DESIGN §8) nodes join, leave, crash and come back during the run. Node ids are
fixed (node i always owns shard i); a membership epoch is a member list (survivors keep their
order, joiners are appended) and the topology built over its positions. The run's length and
step-size schedule are fixed at the start from all nodes' data, so churn never changes them.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..protocol.codecs import get_codec
from .algorithms import ALGORITHMS, StepRule
from .algorithms.base import Algorithm
from .attacks import Poisoner, parse_attacks
from .churn import ChurnEvent, initial_members, parse_churn
from .data import parse_split, partition
from .engine import Delay, InMemoryNetwork
from .errors import BadInput
from .pace import slow_objective, unwrapped
from .settings import RunSettings, SimulateSettings, parse_slow
from .topology import BUILT_IN, Topology, make_topology
from .training import FeatureBank, VisionObjective, accuracy, prepare_model_and_data

# (algorithm, epoch, epochs, mean accuracy) after each evaluated epoch
EpochCallback = Callable[[str, int, int, float], None]
# (round, network) before each round runs, after that round's membership changes (tests, analysis)
RoundCallback = Callable[[int, InMemoryNetwork], None]

LATE_MASS_STREAM = 7  # --late-mass draws from its own stream of the run's seed: batches and partitions stay the same

# Rounds from a crash to the epoch without the crashed node: its neighbours report it after 3 silent
# rounds, then the coordinator announces the new epoch 2 rounds ahead, as the daemon does.
CRASH_DETECTION_ROUNDS = 5


@dataclass
class AlgorithmResult:
    """One algorithm's run. Per-node lists are indexed by node id.

    `history` holds per evaluated epoch (pass over the data) `epoch`, `accuracy` and `loss` (one
    entry per node id, None for a node outside the run then), `membership` (one record per
    membership epoch: round, epoch, members, joined, rejoined, left, crashed) and `presence`
    ({node id: [[from_round, to_round or None], ...]}: the node ran rounds from..to-1). With churn,
    `accuracy` is each node's at the end of the run, or when it left if it was out by then."""

    accuracy: list[float]
    bytes_sent: list[int]
    messages_sent: list[int]
    iterations: int
    seconds: float
    history: dict[str, list | dict] = field(default_factory=dict)
    bytes_per_epoch: list[float] = field(default_factory=list)  # per node
    messages_per_epoch: list[float] = field(default_factory=list)
    attackers: list[int] = field(default_factory=list)  # Byzantine node ids (`--attack`): not in honest_mean
    honest_mean: float | None = None  # mean accuracy of the other nodes
    steps: list[int] = field(default_factory=list)  # gradients each node computed (fewer for a --slow one, async)
    samples: list[int] = field(default_factory=list)  # training samples each node drew (fewer for a paced batch)
    # the run's length in a normal node's step times: in lockstep every round waits for the slowest node
    duration_steps: float = 0.0
    seconds_per_round: list[float | None] = field(default_factory=list)  # daemons: each node's measured pace

    def __post_init__(self) -> None:
        if self.honest_mean is None:
            self.honest_mean = honest_mean(self.accuracy, self.attackers)


def honest_mean(accuracy: list[float | None], attackers: list[int]) -> float:
    """Mean accuracy over the honest nodes (those not in `attackers`) that have one."""
    values = [a for i, a in enumerate(accuracy) if i not in attackers and a is not None]
    return sum(values) / len(values) if values else float("nan")


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


def iterations_per_epoch(total_samples: int, nodes: int, batch_size: int, local_steps: int = 1) -> int:
    """One epoch = one pass over all training data, summed over the nodes that train (each round takes
    `local_steps` mini-batches per node)."""
    return max(1, math.ceil(total_samples / (nodes * batch_size * local_steps)))


def check_local_steps(total_samples: int, nodes: int, batch_size: int, local_steps: int) -> None:
    """BadInput if --local-steps K asks for more mini-batches a round than a pass over the data holds: an
    epoch would still be one round, and each would train K / (those mini-batches) passes."""
    per_pass = iterations_per_epoch(total_samples, nodes, batch_size)
    if local_steps > per_pass:
        raise BadInput(
            f"--local-steps {local_steps} is more than a pass over the data: {per_pass} mini-batches of "
            f"--batch-size {batch_size} make one here; use at most {per_pass}"
        )


def local_steps(settings: RunSettings, algorithm: str) -> int:
    """Gradient steps per round of `algorithm` in this run: --local-steps for an algorithm that takes them."""
    return settings.local_steps if ALGORITHMS[algorithm].local_steps_supported else 1


def _clone_state(state: dict) -> dict:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def check_churn(events: list[ChurnEvent], settings: RunSettings, total: int) -> None:
    """Reject, before anything runs, a schedule the simulator cannot carry out: an edge-list topology
    (it names fixed nodes), events outside rounds 1..total-1, and member counts the topology cannot take."""
    if not events:
        return
    spec = settings.topology
    if spec not in BUILT_IN and not spec.startswith("random:"):
        raise BadInput(
            f"--churn needs a built-in topology ({', '.join(BUILT_IN)} or random:K) to rebuild over "
            f"each member list; {spec!r} is an edge-list file over fixed nodes"
        )
    for e in events:
        if not 1 <= e.when < total:
            raise BadInput(f"--churn event {e} is outside the run: its rounds are 0..{total - 1}, events go at 1..")
    inside = set(initial_members(events, settings.nodes))
    for e in events:
        if e.action in ("leave", "crash"):
            inside.discard(e.node)
        else:
            inside.add(e.node)
        try:
            make_topology(spec, len(inside), settings.seed)
        except BadInput as err:
            raise BadInput(f"--churn event {e} leaves {len(inside)} nodes in the run: {err}") from None


class _Membership:
    """Carries out a churn schedule on one run's network: crashes, epoch changes, joiners, and the
    record of who took part when (DESIGN §8, simulated)."""

    def __init__(
        self,
        sim: Simulation,
        net: InMemoryNetwork,
        build: Callable[[int, torch.Tensor, Topology, int], Algorithm],
        events: list[ChurnEvent],
    ) -> None:
        self.sim, self.net, self.build = sim, net, build
        self.due: dict[int, list[ChurnEvent]] = defaultdict(list)
        for e in events:
            self.due[int(e.when)].append(e)
        self.removal: dict[int, int] = {}  # crashed node -> round of the epoch that drops it
        self.checkpoints: dict[int, dict] = {}  # node -> state_dict clone when it left or crashed
        self.last_accuracy: dict[int, float] = {}  # node -> accuracy when it left or crashed
        self.presence: dict[int, list[list[int | None]]] = {i: [] for i in range(len(net.nodes))}
        for i in net.members:
            self.presence[i].append([0, None])
        self.records = [self._record(0, [], [], [], [])]

    def _record(self, k: int, joined: list, rejoined: list, left: list, crashed: list) -> dict:
        return {
            "round": k,
            "epoch": self.net.epoch,
            "members": list(self.net.members),
            "joined": joined,
            "rejoined": rejoined,
            "left": left,
            "crashed": crashed,
        }

    def present(self, i: int) -> bool:
        """Whether node i runs now: a member of the current epoch that has not crashed."""
        return i in self.net.members and i not in self.net.down

    def _out(self, i: int, k: int) -> None:
        node = self.net.nodes[i]
        self.checkpoints[i] = _clone_state(node.model_state_dict())
        self.last_accuracy[i] = accuracy(self.sim.model, node.params, self.sim.test_bank)
        self.presence[i][-1][1] = k

    def before_round(self, k: int) -> None:
        events = self.due.get(k, [])
        dropped = [i for i, r in self.removal.items() if r == k]
        for i in dropped:
            del self.removal[i]
        left, joiners = [], []
        for e in events:
            if e.action == "crash":
                self._out(e.node, k)
                self.net.down.add(e.node)
                self.removal[e.node] = k + CRASH_DETECTION_ROUNDS
            elif e.action == "leave":
                self._out(e.node, k)
                left.append(e.node)
            else:
                if e.node in self.removal:  # back before its crash was noticed: this epoch drops the old one
                    del self.removal[e.node]
                    dropped.append(e.node)
                joiners.append(e)
        if not (left or dropped or joiners):
            return
        gone = set(left) | set(dropped)
        members = [i for i in self.net.members if i not in gone] + [e.node for e in joiners]
        topology = make_topology(self.sim.settings.topology, len(members), self.sim.settings.seed)
        up = [i for i in self.net.members if i not in self.net.down]
        donor = next((i for i in up if i not in gone), up[0] if up else None)
        for e in joiners:
            position = members.index(e.node)
            if e.action == "join":  # a fresh node downloads the donor's parameters
                node = self.build(e.node, self.net.nodes[donor].params, topology, position)
            else:  # a restart: its own checkpoint, parameters and optimizer state, never link state
                state = self.checkpoints[e.node]
                node = self.build(e.node, state["params"], topology, position)
                node.load_model_state(state)
            node.iteration = k
            self.net.nodes[e.node] = node
            self.presence[e.node].append([k, None])
        self.net.change_epoch(members, topology)
        joined = [e.node for e in joiners]
        rejoined = [e.node for e in joiners if e.action == "rejoin"]
        self.records.append(self._record(k, joined, rejoined, left, dropped))


class Simulation:
    """Builds the model, data, partitions and feature caches once; runs any algorithm on them.

    `churn` (events or a `--churn` string) defaults to the settings' own when they are
    SimulateSettings; it applies to every algorithm but `central`, and so does `--attack`."""

    def __init__(
        self,
        settings: RunSettings,
        on_cache: Callable[[int, int], None] | None = None,
        churn: str | list[ChurnEvent] | None = None,
    ) -> None:
        self.settings = s = settings.validate()
        if churn is None and isinstance(s, SimulateSettings):
            churn = s.churn
        self.churn = parse_churn(churn, s.nodes) if churn is None or isinstance(churn, str) else list(churn)
        self.attacks = parse_attacks(getattr(s, "attack", None), s.nodes)
        self.device = s.torch_device
        self.model, self.data = prepare_model_and_data(s, self.device)
        self.parts = partition(
            self.data.train_labels, parse_split(s.split), s.nodes, s.seed, self.data.num_classes, self.data.name
        )
        samples = sum(len(p) for p in self.parts)
        check_local_steps(samples, s.nodes, s.batch_size, local_steps(s, s.algorithm))
        rounds = iterations_per_epoch(samples, s.nodes, s.batch_size, local_steps(s, s.algorithm)) * s.epochs
        check_churn(self.churn, s, rounds)
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

    def run(
        self, name: str, on_epoch: EpochCallback | None = None, on_round: RoundCallback | None = None
    ) -> AlgorithmResult:
        s = self.settings
        cls = ALGORITHMS[name]
        if name == "central":  # always alone on all data: churn does not apply
            topo, shards, churn, attacks = make_topology("complete", 1), [np.concatenate(self.parts)], [], []
            slow = {}
        else:
            topo, shards, churn, attacks = self.topology, self.parts, self.churn, self.attacks
            slow = parse_slow(getattr(s, "slow", []), s.nodes)
        per_epoch = iterations_per_epoch(sum(len(p) for p in shards), len(shards), s.batch_size, local_steps(s, name))
        total = per_epoch * s.epochs
        lr = step_schedule(s, total)

        def build(i: int, params: torch.Tensor, topology: Topology, position: int) -> Algorithm:
            objective = VisionObjective(
                self.model,
                self.train_bank,
                shards[i],
                s.batch_size,
                seed=objective_seed(s, i),
                weight_decay=s.weight_decay,
            )
            if s.sync == "async" and i in slow:  # a smaller batch, or late gradients; it exchanges every round
                objective = slow_objective(objective, slow[i], s.pace_batch)
            codec = None if s.codec == "none" else get_codec(s.codec)
            step = StepRule(lr, s.momentum, s.optimizer)
            node = cls(topology.neighbourhood(position), objective, params, step, codec, s.gamma)
            node.configure(iterations_per_epoch=per_epoch, settings=s)
            return node

        members = initial_members(churn, len(shards))
        if churn:
            topo = make_topology(s.topology, len(members), s.seed)
        nodes: list[Algorithm | None] = [None] * len(shards)
        for position, i in enumerate(members):
            nodes[i] = build(i, self.initial, topo, position)
        net = InMemoryNetwork(
            nodes, members=members, delay=_late_mass(getattr(s, "late_mass", 0.0), cls.phases, s.seed)
        )
        if attacks:  # Byzantine nodes: what they send is rewritten on its way
            net.deliver = Poisoner(attacks, net, s.codec, s.seed)
        attackers = sorted(a.node for a in attacks)
        self.nodes = net.nodes  # the last run's node objects by id, for inspection
        membership = _Membership(self, net, build, churn)
        history: dict[str, list] = {"epoch": [], "accuracy": [], "loss": []}
        start = time.perf_counter()
        k = 0
        for epoch in range(1, s.epochs + 1):
            losses = []
            for _ in range(per_epoch):
                membership.before_round(k)
                if on_round is not None:
                    on_round(k, net)
                net.iteration(k)
                losses.append([n.last_loss if membership.present(i) else None for i, n in enumerate(net.nodes)])
                k += 1
            accs = [
                accuracy(self.model, n.params, self.test_bank) if membership.present(i) else None
                for i, n in enumerate(net.nodes)
            ]
            history["epoch"].append(epoch)
            history["accuracy"].append(accs)
            history["loss"].append(_mean_losses(losses))
            if on_epoch is not None:
                on_epoch(name, epoch, s.epochs, honest_mean(accs, attackers))
        history["membership"] = membership.records
        history["presence"] = membership.presence
        final = [a if a is not None else membership.last_accuracy[i] for i, a in enumerate(history["accuracy"][-1])]
        return AlgorithmResult(
            accuracy=final,
            bytes_sent=net.bytes_sent,
            messages_sent=net.messages_sent,
            iterations=total,
            seconds=time.perf_counter() - start,
            history=history,
            bytes_per_epoch=[b / s.epochs for b in net.bytes_sent],
            messages_per_epoch=[m / s.epochs for m in net.messages_sent],
            attackers=attackers,
            steps=[getattr(n.objective, "gradients", total) if n is not None else 0 for n in net.nodes],
            samples=[getattr(unwrapped(n.objective), "samples_seen", 0) if n is not None else 0 for n in net.nodes],
            duration_steps=float(total if s.sync == "async" else total * max(slow.values(), default=1.0)),
        )


def _late_mass(probability: float, phases: Sequence[str], seed: int) -> Delay | None:
    """`--late-mass`: messages of the phases after the first (P2P-FT's pushed mass) arrive a round late with
    this probability, drawn from the run's seed. The daemons' asynchronous rounds wait for their
    in-neighbours' values of the round but, once a member is slow, take pushed mass as it comes."""
    if probability <= 0 or len(phases) < 2:
        return None
    rng = np.random.default_rng([seed, LATE_MASS_STREAM])
    later = set(phases[1:])
    return lambda m: int(m.phase in later and rng.random() < probability)


def _mean_losses(losses: list[list[float | None]]) -> list[float | None]:
    """Mean mini-batch loss per node over one epoch's rounds, counting only the rounds it ran (None if none)."""
    if all(x is not None for row in losses for x in row):
        return np.mean(losses, axis=0).tolist()
    columns = ([x for x in col if x is not None] for col in zip(*losses, strict=True))
    return [float(np.mean(col)) if col else None for col in columns]


def simulate(
    settings: RunSettings,
    on_epoch: EpochCallback | None = None,
    on_cache: Callable[[int, int], None] | None = None,
    save: str | Path | None = None,
) -> SimulationResult:
    """Run `settings.algorithm` and every algorithm in `settings.compare` on the same data and model;
    with `save`, write each node's final parameters there per algorithm (`p2pnode attention` reads them)."""
    from .saved_models import save_simulation_run, set_aside_saved_models

    torch.set_num_threads(max(1, torch.get_num_threads()))
    sim = Simulation(settings, on_cache)
    if save is not None:
        set_aside_saved_models(save)
    names = list(dict.fromkeys([settings.algorithm, *settings.compare]))
    results = {}
    for name in names:
        results[name] = sim.run(name, on_epoch)
        if save is not None:
            save_simulation_run(save, sim, name)  # before the next run replaces the node objects
    return SimulationResult(settings.to_dict(), results, sim.model.fingerprint)
