"""Byzantine nodes in the simulator: `simulate --attack NODE:KIND` (DESIGN §9).

A Byzantine node runs its algorithm like everyone else (it still receives and trains), but every
message it sends has its tensors replaced by poisoned ones: finite, of the right shape and dtype, and
encoded with the run's codec where the original was, so they pass every check a receiver makes.
Tensors of one element (SGP's push-sum weight) are left alone: a tiny weight would make x / w blow
up, which is a different, cruder attack. KIND is one of

- `signflip`: -x;
- `scale:FACTOR`: FACTOR * x (e.g. `scale:100`);
- `noise`: x plus Gaussian noise as large as x itself (per coordinate, the root mean square of x);
- `alie`: "a little is enough" (Baruch, Baruch & Goldberg 2019): mu - z sigma, the coordinate-wise
  mean and standard deviation of what the honest nodes last sent in the same kind of message, with
  z = Phi^-1((n - s) / n), s = floor(n / 2 + 1) - f for n nodes and f attackers; a shift that hides
  inside the honest spread (z = 0.25 for one attacker among five);
- `stale`: replays, on each link and forever, the first value it sent there.

NODE is a node id, 0-based, as in `--churn`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import torch

from ..protocol.codecs import Codec, Encoded, get_codec
from ..protocol.message import Message, Payload
from .algorithms import as_tensor
from .engine import InMemoryNetwork
from .errors import BadInput

KINDS = ("signflip", "scale", "noise", "alie", "stale")
MAX_FACTOR = 1e6  # a larger scale overflows float32 parameters: no longer a well-formed message
_SPEC = re.compile(r"^(?P<node>\d+):(?P<kind>[a-z]+)(?::(?P<arg>.*))?$")
_HELP = "signflip, scale:FACTOR, noise, alie or stale"


@dataclass(frozen=True)
class Attack:
    node: int
    kind: str
    factor: float = 1.0  # scale only

    def __str__(self) -> str:
        return f"{self.node}:{self.kind}" + (f":{self.factor:g}" if self.kind == "scale" else "")


def parse_attacks(specs: Sequence[str] | str | None, nodes: int) -> list[Attack]:
    """Parse `--attack` values (each NODE:KIND, or several comma-separated) for a run of `nodes` nodes."""
    items = [specs] if isinstance(specs, str) else list(specs or [])
    attacks = [_parse_one(item.strip(), nodes) for spec in items for item in spec.split(",") if item.strip()]
    seen: set[int] = set()
    for a in attacks:
        if a.node in seen:
            raise BadInput(f"--attack names node {a.node} twice; give each Byzantine node one KIND")
        seen.add(a.node)
    if attacks and len(seen) >= nodes:
        raise BadInput(f"--attack makes all {nodes} nodes Byzantine; leave at least one honest node")
    return attacks


def _parse_one(item: str, nodes: int) -> Attack:
    m = _SPEC.match(item)
    if m is None:
        raise BadInput(f"bad --attack {item!r}: write NODE:KIND with KIND {_HELP}, e.g. 2:signflip or 1:scale:100")
    node, kind, arg = int(m["node"]), m["kind"], m["arg"]
    if kind not in KINDS:
        raise BadInput(f"unknown --attack kind {kind!r} in {item!r}: choose one of {_HELP}")
    if node >= nodes:
        raise BadInput(f"--attack {item!r} names node {node}, but the run has nodes 0..{nodes - 1}")
    if kind != "scale":
        if arg is not None:
            raise BadInput(f"--attack {item!r}: {kind} takes no argument (only scale:FACTOR does)")
        return Attack(node, kind)
    try:
        factor = float(arg) if arg is not None else math.nan
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and abs(factor) <= MAX_FACTOR):
        raise BadInput(f"bad --attack factor in {item!r}: write scale:FACTOR with |FACTOR| <= {MAX_FACTOR:g}")
    return Attack(node, kind, factor)


def alie_z(nodes: int, attackers: int) -> float:
    """Baruch et al.'s z_max: the largest shift, in standard deviations, that a majority still backs."""
    supporters = math.floor(nodes / 2 + 1) - attackers
    p = min(max((nodes - supporters) / nodes, 0.5), 0.999)
    return NormalDist().inv_cdf(p)


class Poisoner:
    """The simulator's `deliver` hook: rewrites what Byzantine nodes send, lets everything through.

    It sees every message, so it keeps the latest tensor each honest node sent in each kind of
    message (for `alie`) and the first one each attacker sent on each link (for `stale`)."""

    def __init__(self, attacks: Sequence[Attack], net: InMemoryNetwork, codec: str, seed: int) -> None:
        self.attacks = {a.node: a for a in attacks}
        self.net = net
        self.codec: Codec | None = None if codec == "none" else get_codec(codec)
        self.generator = torch.Generator().manual_seed(seed)
        self.z = alie_z(len(net.nodes), len(self.attacks))
        self.honest: dict[tuple[str, str, str], dict[int, torch.Tensor]] = {}
        self.first: dict[tuple, torch.Tensor] = {}

    def __call__(self, m: Message) -> bool:
        node = self.net.members[m.src]
        attack = self.attacks.get(node)
        if attack is None:
            for name, t in m.tensors.items():
                self.honest.setdefault((m.phase, m.kind, name), {})[node] = as_tensor(t).clone()
        else:
            m.tensors = {name: self._poison(attack, m, name, t) for name, t in m.tensors.items()}
        return True

    def _poison(self, attack: Attack, m: Message, name: str, payload: Payload) -> Payload:
        x = as_tensor(payload)
        if x.numel() <= 1:
            return payload
        bad = self._value(attack, m, name, x).to(x.dtype)
        return self.codec.encode(bad) if isinstance(payload, Encoded) and self.codec is not None else bad

    def _value(self, attack: Attack, m: Message, name: str, x: torch.Tensor) -> torch.Tensor:
        if attack.kind == "signflip":
            return -x
        if attack.kind == "scale":
            return attack.factor * x
        if attack.kind == "noise":
            rms = float(x.float().pow(2).mean().sqrt())
            return x + rms * torch.randn(x.shape, generator=self.generator).to(x.dtype)
        if attack.kind == "stale":
            return self.first.setdefault((attack.node, m.dst, m.phase, m.kind, name), x.clone())
        seen = [t for t in self.honest.get((m.phase, m.kind, name), {}).values() if t.shape == x.shape]
        if len(seen) < 2:  # alie before the honest spread is known: behave
            return x
        stacked = torch.stack(seen).to(x.dtype)
        return stacked.mean(0) - self.z * stacked.std(0)
