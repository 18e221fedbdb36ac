"""The settings of one run, shared by `p2pnode simulate`, `p2pnode start` and `p2pnode testnet`.

Each field's `help` metadata becomes a command-line option (see cli/options.py); values come from,
in order of precedence: the flag, the environment variable `P2PNODE_<FIELD>`, `--config FILE`
(TOML, keys named like the fields or flags), the default here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .algorithms import ALGORITHMS
from .data import parse_class_set, parse_split
from .errors import BadInput
from .models import DEFAULT_MODEL

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")
ROBUST_RULES = ("none", "clip")
TESTNET_HOSTS = ("loopback", "netns")
SYNC_MODES = ("wait", "async")


def opt(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunSettings:
    # model
    model: str = opt(DEFAULT_MODEL, "timm model name; the default needs no download")
    trainable_blocks: int = opt(1, "last blocks to fine-tune (Swin: of the last stage)")
    pretrained: bool = opt(False, "load timm hub weights (needs internet)")
    checkpoint: str | None = opt(None, "local weights to start from (.safetensors or .pt)")
    model_seed: int = opt(0, "seed of the random initialisation shared by all nodes")
    # data
    data: str = opt("digits", "digits, cifar10, cifar100, flowers102, pets, or an image folder")
    data_root: str | None = opt(None, "where torchvision datasets are kept")
    download: bool = opt(False, "download torchvision datasets into --data-root")
    augment: bool = opt(False, "random crops and flips (turns the feature cache off)")
    cache_features: bool = opt(True, "compute the frozen trunk once per sample")
    split: str = opt("0-1,2-3,4-6,7-9", "class sets per node (0-1,2-3,4-6,7-9), iid, or dirichlet:ALPHA")
    nodes: int | None = opt(None, "number of nodes (default: one per --split class set, else 4)")
    # graph and algorithm
    topology: str = opt(
        "auto",
        "auto (directed-ring up to 4 members, exponential above: the ring mixes too slowly for more), "
        "directed-ring, exponential, one-peer-exponential (the exponential graph's links, one a round in turn: "
        "the ring's messages; p2pft and dsgd), complete, ring, random:K, or an edge-list file",
    )
    algorithm: str = opt("p2pft", "p2pft, sgp, dsgd, cdsgd, dimat, wa, wm, local or central (see README)")
    codec: str = opt(
        "int8",
        "compression of exchanged tensors: int8 (blockwise, one scale per 256 values; int8:BLOCK for another "
        "block), int4 (blockwise; int4:BLOCK), none, fp16, bf16, topk:FRACTION (0 < FRACTION <= 1)",
    )
    gamma: float = opt(1.0, "consensus step for compressed exchange (<= 1; lower for aggressive top-k)")
    robust: str = opt("none", "mixing that survives a bad neighbour: none, or clip (self-centred clipping; not exact)")
    # training. Defaults found by bench/reproduce_table1.py on digits (see README): they bring every
    # P2P-FT node within 2 points of central fine-tuning at the same number of passes over the data.
    epochs: int = opt(40, "passes over all training data")
    lr: float = opt(0.01, "step size alpha")
    schedule: str = opt("cosine", "cosine or constant step size")
    momentum: float = opt(0.9, "heavy-ball momentum, 0 for plain SGD")
    optimizer: str = opt("sgd", "local optimizer: sgd (with --momentum) or adam")
    local_steps: int = opt(
        1,
        "p2pft: gradient steps per exchange, each corrected by the tracker (K-GT); a pass over the data then "
        "takes K times fewer rounds and bytes (1: one step per exchange)",
    )
    merge_every: int = opt(1, "dimat, wa, wm: merge with neighbours every N epochs")
    warmup_epochs: int = opt(0, "dimat, wa, wm: local training epochs before the first merge")
    weight_decay: float = opt(0.0, "L2 penalty on the trainable parameters")
    batch_size: int = opt(16, "mini-batch size per node")
    seed: int = opt(0, "seed for partitions, sampling and random topologies")
    device: str = opt("auto", "auto, cpu or cuda[:N]")
    # pace: wait keeps every node in lockstep, async lets each go at its own pace (README: slow volunteers)
    sync: str = opt(
        "wait",
        "wait: each round waits for every in-neighbour (up to --round-timeout); async: each node steps at its "
        "own pace, mixing the newest values and whatever mass has arrived",
    )
    max_staleness: int = opt(
        50, "with --sync async: a neighbour's value over N rounds old is left out of the mix (its mass is kept)"
    )
    pace_batch: bool | None = opt(
        None,
        "with --sync async (on by default there): a node whose gradients take 1.5x the others' or longer shrinks "
        "its mini-batch to keep their pace (not below what their time buys at its own time per sample), so its "
        "gradients stay fresh, and P2P-FT counts a gradient that still serves d > 2 rounds with weight 2/d (its data "
        "then counts less); --no-pace-batch: it keeps --batch-size and they come late, at full weight",
    )

    def validate(self) -> RunSettings:
        from ..protocol.codecs import CodecError, get_codec

        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise BadInput(f"--{f.name.replace('_', '-')} must be a finite number (got {value})")
        for name in ("seed", "model_seed"):
            if getattr(self, name) < 0:
                raise BadInput(f"--{name.replace('_', '-')} must be a whole number >= 0 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise BadInput(f"--lr must be a positive step size (got {self.lr})")
        if self.epochs < 1:
            raise BadInput(f"--epochs must be at least 1 (got {self.epochs})")
        if self.batch_size < 1:
            raise BadInput(f"--batch-size must be at least 1 (got {self.batch_size})")
        split = parse_split(self.split)
        if self.nodes is None:
            self.nodes = len(split) if isinstance(split, list) else 4
        if self.nodes < 1:
            raise BadInput(f"--nodes must be at least 1 (got {self.nodes})")
        if not 0 <= self.momentum < 1:
            raise BadInput(f"--momentum must be in [0, 1) (got {self.momentum})")
        if self.weight_decay < 0:
            raise BadInput(f"--weight-decay must be >= 0 (got {self.weight_decay})")
        if not 0 < self.gamma <= 1:
            raise BadInput(f"--gamma must be in (0, 1] (got {self.gamma})")
        if self.optimizer not in ("sgd", "adam"):
            raise BadInput(f"unknown --optimizer {self.optimizer!r}: use sgd or adam")
        if self.local_steps < 1:
            raise BadInput(f"--local-steps must be at least 1 (got {self.local_steps})")
        if self.local_steps > 1 and not getattr(ALGORITHMS.get(self.algorithm), "local_steps_supported", False):
            raise BadInput(f"--local-steps is for p2pft (got --algorithm {self.algorithm}); use --local-steps 1")
        if self.local_steps > 1 and self.sync != "wait":
            raise BadInput("--local-steps needs --sync wait (an asynchronous node's gradients come late)")
        if self.merge_every < 1:
            raise BadInput(f"--merge-every must be at least 1 epoch (got {self.merge_every})")
        if self.warmup_epochs < 0:
            raise BadInput(f"--warmup-epochs must be >= 0 (got {self.warmup_epochs})")
        if self.sync not in SYNC_MODES:
            raise BadInput(f"unknown --sync {self.sync!r}: use {' or '.join(SYNC_MODES)}")
        if self.pace_batch and self.sync != "async":
            raise BadInput("--pace-batch needs --sync async (with --sync wait every round waits for every gradient)")
        if self.pace_batch is None:  # not given: a slow node paces its batch wherever it can (README: slow volunteers)
            self.pace_batch = self.sync == "async"
        if self.max_staleness < 1:
            raise BadInput(f"--max-staleness must be at least 1 round (got {self.max_staleness})")
        if self.robust not in ROBUST_RULES:
            raise BadInput(f"unknown --robust {self.robust!r}: use {' or '.join(ROBUST_RULES)}")
        if self.schedule not in SCHEDULES:
            raise BadInput(f"unknown --schedule {self.schedule!r}: use {' or '.join(SCHEDULES)}")
        for name in [self.algorithm, *getattr(self, "compare", [])]:
            if name not in ALGORITHMS:
                raise BadInput(f"unknown algorithm {name!r}: choose from {', '.join(sorted(ALGORITHMS))}")
        try:
            get_codec(self.codec)
        except CodecError as e:
            raise BadInput(str(e)) from None
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise BadInput(f"unknown --device {self.device!r}: use auto, cpu or cuda[:N]")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise BadInput(f"--device {self.device} asked for, but this machine has no CUDA GPU; use --device cpu")
        if isinstance(split, list) and len(split) != self.nodes and getattr(self, "classes", None) is None:
            raise BadInput(f"--split lists {len(split)} class sets but --nodes is {self.nodes}; give one per node")
        from .topology import make_topology

        topo = make_topology(self.topology, self.nodes, self.seed)  # a bad file stops here, before any process
        for name in [self.algorithm, *getattr(self, "compare", [])]:
            if ALGORITHMS[name].needs_undirected and not topo.is_undirected:
                raise BadInput(
                    f"{name} merges with doubly stochastic weights, which need an undirected topology: "
                    f"{topo.name} is directed; use ring, complete or an edge-list file with A <-> B links"
                )
        names = [self.algorithm, *getattr(self, "compare", [])]
        fixed = [name for name in names if ALGORITHMS[name].communicates and not ALGORITHMS[name].time_varying_graphs]
        if topo.time_varying and fixed:
            raise BadInput(
                f"{fixed[0]} mixes over a fixed graph, and --topology {topo.name} changes its links every round: "
                "use it with p2pft or dsgd, or choose another topology"
            )
        if topo.time_varying and self.robust != "none":
            # one in-neighbour a round gives no radius to clip by, and its links' totals grow at a fraction
            # of this node's own pace, which MassClipper would clip as if they were bad (40 epochs: 90.3%)
            raise BadInput(
                f"--robust {self.robust} needs at least 3 in-neighbours a round to tell a bad one, and --topology "
                f"{topo.name} hears one: use exponential, complete or random:K with it"
            )
        merging = [name for name in names if "merge" in ALGORITHMS[name].phases]
        first_merge = self.merge_every * (self.warmup_epochs // self.merge_every + 1)  # DIMAT.is_merge's first epoch
        if merging and first_merge > self.epochs:
            raise BadInput(
                f"{merging[0]} would never merge: with --warmup-epochs {self.warmup_epochs} and --merge-every "
                f"{self.merge_every} its first merge ends epoch {first_merge}, past --epochs {self.epochs}"
            )
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

    def run_fields(self) -> dict:
        """The settings every member of a run must share (checked through the DHT)."""
        local = {"device", "data_root", "download", "checkpoint", "split", "pace_batch"}  # each node's own choice
        shared = {f.name for f in fields(RunSettings)} - local
        return {k: v for k, v in asdict(self).items() if k in shared}

    def shown_run_fields(self) -> dict[str, str]:
        """`run_fields` as text, as a refused peer's differences are shown (lists joined by commas)."""
        return {k: ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in self.run_fields().items()}

    def settings_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.run_fields(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SimulateSettings(RunSettings):
    compare: list[str] = opt(
        [],
        "other algorithms to run on the same data (simulated): any of p2pft, sgp, dsgd, cdsgd, dimat, wa, wm, "
        "local, central",
    )
    churn: str | None = opt(
        None,
        "membership changes, ACTION:NODE@ROUND with ACTION join, leave, crash or rejoin: e.g. leave:3@200,join:3@400",
    )
    attack: list[str] = opt(
        [],
        "make a node Byzantine, NODE:KIND with KIND signflip, scale:FACTOR, noise, alie or stale (e.g. 2:signflip)",
    )
    slow: list[str] = opt(
        [], "make a node slower, NODE:FACTOR (1-1000): it computes one step per FACTOR rounds of the others"
    )
    late_mass: float = opt(
        0.0,
        "with --sync async: the chance that a message of pushed mass (P2P-FT's push phase) arrives a round late, "
        "as in the daemons once a member is slow; 0: every message in its round",
    )

    def validate(self) -> SimulateSettings:
        from .attacks import parse_attacks
        from .churn import parse_churn

        super().validate()
        parse_churn(self.churn, self.nodes)
        parse_attacks(self.attack, self.nodes)
        parse_slow(self.slow, self.nodes)
        if not 0 <= self.late_mass <= 1:
            raise BadInput(f"--late-mass must be a probability in [0, 1] (got {self.late_mass})")
        if self.late_mass and self.sync != "async":
            raise BadInput("--late-mass needs --sync async (with --sync wait every round waits for every message)")
        return self


@dataclass
class NodeSettings(RunSettings):
    peers: list[str] = opt([], "bootstrap multiaddrs (repeat the flag or separate with commas)")
    listen: list[str] = opt(["/ip4/0.0.0.0/tcp/0"], "multiaddrs to listen on")
    announce: list[str] = opt([], "public multiaddrs to announce (behind NAT: your public address)")
    identity: str | None = opt(None, "file with this node's private key (keeps the peer id across restarts)")
    owner: str | None = opt(None, "the run owner's public key (from `p2pnode keygen`): only invited peers may join")
    invite: str | None = opt(None, "this node's invitation file (from `p2pnode invite`), for a run with --owner")
    run_id: str = opt("default", "name of the run to join")
    classes: str | None = opt(None, "this node's classes, e.g. 0-1 (default: its share of --split)")
    index: int = opt(-1, "this node's position in the run (default: order by peer id)")
    state_dir: str = opt("p2pnode-state", "where checkpoints, progress and result.json go")
    checkpoint_every: int = opt(50, "write a checkpoint every N rounds (and on shutdown)")
    round_timeout: float = opt(60.0, "seconds to wait for in-neighbours before a round goes on without them")
    join_timeout: float = opt(600.0, "seconds to wait for --nodes members before giving up")
    heartbeat: float = opt(5.0, "seconds between membership refreshes in the DHT")
    use_relay: bool = opt(True, "reach peers behind NAT through libp2p relays")
    use_auto_relay: bool = opt(False, "look for relays to become reachable when behind NAT yourself")
    leave_timeout: float = opt(
        60.0, "after SIGTERM, seconds to wait for the epoch that drops this node before just going"
    )
    metrics_port: int | None = opt(None, "serve Prometheus metrics on this port (127.0.0.1; see --metrics-addr)")
    metrics_addr: str = opt("127.0.0.1", "address for --metrics-port (0.0.0.0 exposes it)")
    slowdown: float = opt(
        1.0,
        "emulate a machine N times slower per sample, 1-1000 (a full batch's gradient: N times as long)",
    )

    def validate(self) -> NodeSettings:
        super().validate()
        if self.classes is not None:
            parse_class_set(self.classes)
        check_multiaddrs("--peers", self.peers, peer_id=True)
        check_multiaddrs("--listen", self.listen)
        check_multiaddrs("--announce", self.announce)
        check_run_id(self.run_id)
        if self.index < -1:
            raise BadInput(f"--index is a position from 0 (got {self.index})")
        if self.classes is None and self.index >= self.nodes:
            raise BadInput(
                f"--index {self.index} is past the run's {self.nodes} shares of --split: use 0-{self.nodes - 1}, "
                "or give this node its own --classes"
            )
        if self.checkpoint_every < 1:
            raise BadInput(f"--checkpoint-every must be at least 1 (got {self.checkpoint_every})")
        if min(self.round_timeout, self.join_timeout, self.heartbeat, self.leave_timeout) <= 0:
            raise BadInput("--round-timeout, --join-timeout, --heartbeat and --leave-timeout must be positive")
        if not 1 <= self.slowdown <= MAX_SLOWDOWN:
            raise BadInput(f"--slowdown must be a factor from 1 to {MAX_SLOWDOWN} (got {self.slowdown})")
        if self.metrics_port is not None and not 1 <= self.metrics_port <= 65535:
            raise BadInput(f"--metrics-port must be a port number 1-65535 (got {self.metrics_port})")
        if self.algorithm == "central" and self.nodes != 1:
            raise BadInput("central is the single-node reference: use it with simulate, or --nodes 1")
        return self


_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_run_id(run_id: str) -> str:
    """A run's name keys its DHT records and state: letters, digits, '-' and '_', at most 64."""
    if not _RUN_ID.fullmatch(run_id):
        raise BadInput(f"bad --run-id {run_id!r}: use 1-64 letters, digits, '-' and '_'")
    return run_id


def check_multiaddrs(flag: str, addrs: list[str], peer_id: bool = False) -> list[str]:
    """`addrs` unchanged if each is a multiaddr (with /p2p/ID when `peer_id`); else one line on the first bad one."""
    from hivemind.utils.multiaddr import Multiaddr

    example = "/ip4/203.0.113.5/tcp/31337/p2p/12D3KooW..." if peer_id else "/ip4/0.0.0.0/tcp/31337"
    for addr in addrs:
        try:
            protocols = [p.name for p in Multiaddr(addr).protocols()]
        except Exception as e:  # the multiaddr parser raises several types, each with the reason
            raise BadInput(f"bad {flag} {addr!r}: not a multiaddr ({e}); give e.g. {example}") from None
        if peer_id and "p2p" not in protocols:
            raise BadInput(
                f"bad {flag} {addr!r}: no /p2p/PEER_ID at its end; copy the full address a peer prints, e.g. {example}"
            )
    return addrs


# An emulated machine this much slower at most: a larger factor (3:1e9 was taken) left a daemon in its
# first gradient for good, and the testnet waiting on it until its --timeout.
MAX_SLOWDOWN = 1000


def parse_slow(specs: list[str], nodes: int) -> dict[int, float]:
    """`--slow NODE:FACTOR` entries as {node: factor}; one line on anything malformed."""
    slow: dict[int, float] = {}
    for spec in specs:
        node, sep, factor = spec.partition(":")
        try:
            i, f = int(node), float(factor)
        except ValueError:
            raise BadInput(f"bad --slow {spec!r}: give NODE:FACTOR, e.g. 3:5 (node 3 five times slower)") from None
        if not sep or not 0 <= i < nodes:
            raise BadInput(f"bad --slow {spec!r}: NODE must be 0..{nodes - 1}")
        if not 1 <= f <= MAX_SLOWDOWN:
            raise BadInput(f"bad --slow {spec!r}: FACTOR must be a number from 1 to {MAX_SLOWDOWN}")
        if i in slow:
            raise BadInput(f"--slow names node {i} twice")
        slow[i] = f
    return slow


def load_config(path: str | Path) -> dict:
    """Read a TOML config file; keys may use dashes or underscores."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    p = Path(path)
    if not p.exists():
        raise BadInput(f"config file {p} does not exist")
    if not p.is_file():
        raise BadInput(f"config file {p} is not a file: give the path of a TOML file")
    try:
        raw = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"config file {p} is not valid TOML: {e}") from None
    except OSError as e:
        raise BadInput(f"cannot read config file {p}: {e.strerror or e}") from None
    return {k.replace("-", "_"): v for k, v in raw.items()}


_SCALARS = {"int": ((int,), "a whole number"), "float": ((int, float), "a number"), "str": ((str,), "a string")}


def _check_scalar(name: str, annotation: str, value: Any) -> Any:
    """A config file's value checked against the field's type (flags and environment variables arrive
    typed); a whole number for a float field becomes a float, as the flag would give it."""
    kind = annotation.removesuffix(" | None")
    if kind not in _SCALARS or (value is None and annotation.endswith("None")):
        return value
    types, what = _SCALARS[kind]
    if isinstance(value, bool) or not isinstance(value, types):
        raise BadInput(f"setting {name} must be {what} (got {value!r})")
    return float(value) if kind == "float" else value


def build_settings(cls: type[RunSettings], values: dict, config: str | Path | None = None) -> RunSettings:
    """Merge flags (`values`, None = not given) over the config file over the defaults; validate."""
    names = {f.name: f for f in fields(cls)}
    merged = load_config(config) if config else {}
    unknown = sorted(set(merged) - set(names))
    if unknown:
        raise BadInput(f"config file {config} has unknown setting {unknown[0]!r}")
    merged.update({k: v for k, v in values.items() if v is not None})
    for k, v in merged.items():
        if "bool" in str(names[k].type) and not isinstance(v, bool):  # bool, or bool | None: set by others
            raise BadInput(f"setting {k} must be true or false (got {v!r})")
        merged[k] = v = _check_scalar(k, str(names[k].type), v)
        if "list" in str(names[k].type) and isinstance(v, str):
            merged[k] = [x for x in v.split(",") if x]
        elif "list" in str(names[k].type):
            if not isinstance(v, list | tuple):
                raise BadInput(f"setting {k} must be a list or a comma-separated string (got {v!r})")
            merged[k] = [x for item in v for x in str(item).split(",") if x]
    try:
        settings = cls(**merged)
    except TypeError as e:
        raise BadInput(f"bad settings: {e}") from None
    settings.validate()
    from .topology import slow_mixing_warning

    if warning := slow_mixing_warning(settings.topology, settings.nodes):
        logger.warning(warning)
    return settings


@dataclass
class TestnetSettings(RunSettings):
    __test__ = False  # not a pytest class

    run_id: str = opt("testnet", "name of the run")
    compare: list[str] = opt(
        [],
        "algorithms to simulate in-process on the same data for reference: any of p2pft, sgp, dsgd, cdsgd, dimat, "
        "wa, wm, local, central",
    )
    workdir: str | None = opt(
        None,
        "folder for each node's state and log (default: a temporary folder); reused, the last run's files go to "
        "nodeI/set-aside-TIME/",
    )
    round_timeout: float = opt(60.0, "seconds a node waits for its in-neighbours each round")
    timeout: float = opt(1800.0, "give up (and tear everything down) after this many seconds")
    closed: bool = opt(False, "a closed run: an owner key in the workdir and an invitation for each node")
    churn: str | None = opt(
        None,
        "membership changes in seconds, ACTION:NODE@SECONDSs (join, leave, crash, rejoin): e.g. crash:3@40s,join:4@30s",
    )
    hosts: str = opt("loopback", "loopback (all peers on 127.0.0.1), or netns: each on its own namespaced host (root)")
    rate: str | None = opt(None, "with --hosts netns: every host's upload rate, e.g. 50mbit (unshaped if unset)")
    loss: float = opt(0.0, "with --hosts netns: percent of packets dropped on arrival at every host (nftables)")
    nat: int = opt(0, "with --hosts netns: the first N nodes each sit behind a masquerading home router")
    slow: list[str] = opt([], "make a node slower, NODE:FACTOR (1-1000): its training steps take FACTOR times as long")

    def validate(self) -> TestnetSettings:
        from .netlab import valid_rate

        super().validate()
        check_run_id(self.run_id)
        if self.hosts not in TESTNET_HOSTS:
            raise BadInput(f"unknown --hosts {self.hosts!r}: use {' or '.join(TESTNET_HOSTS)}")
        if self.hosts == "loopback" and (self.rate is not None or self.loss or self.nat):
            raise BadInput("--rate, --loss and --nat shape the emulated network: add --hosts netns")
        if self.rate is not None and not valid_rate(self.rate):
            raise BadInput(f"bad --rate {self.rate!r}: give a rate like 50mbit, 10mbit or 1gbit")
        if not 0 <= self.loss < 100:
            raise BadInput(f"--loss is a percentage in [0, 100) (got {self.loss})")
        if not 0 <= self.nat <= self.nodes:
            raise BadInput(f"--nat must be between 0 and --nodes {self.nodes} (got {self.nat})")
        parse_slow(self.slow, self.nodes)
        if self.timeout <= 0 or self.round_timeout <= 0:
            raise BadInput("--timeout and --round-timeout must be positive")
        return self


def to_flags(settings: RunSettings, only: type[RunSettings] = RunSettings) -> list[str]:
    """Command-line flags that reproduce the fields of `only` (the shared run settings by default)."""
    flags: list[str] = []
    for f in fields(only):
        value = getattr(settings, f.name)
        name = "--" + f.name.replace("_", "-")
        if value is None or value == []:
            continue
        if isinstance(value, bool):
            flags.append(name if value else f"--no-{name[2:]}")
        elif isinstance(value, list):
            for item in value:
                flags += [name, str(item)]
        else:
            flags += [name, str(value)]
    return flags
