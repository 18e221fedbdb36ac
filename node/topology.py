"""Directed communication graphs and the mixing weights each node derives locally.

Weights follow DESIGN §2 with w_ij = 1 on every link and self-loop, so node i needs only
its own in- and out-degree: a_ij = 1 / (in_degree(i) + 1) (row-stochastic, applied by the
receiver) and b_li = 1 / (out_degree(i) + 1) (column-stochastic, applied by the sender).

One graph changes from round to round: `one-peer-exponential` (Ying et al. 2021, "Exponential
graph is provably efficient for decentralized deep training"). Its links are the exponential
graph's, i -> i + 2^m (mod n), but round k uses one hop only, 2^(k mod log2 n) in turn: each node
sends to one peer and hears from one (the directed ring's messages), with weights 1/2 and 1/2 on
that round's links, so A_k and B_k stay row- and column-stochastic every round. With n a power of
two the product of log2 n rounds' matrices is the exact average (J): it mixes like the complete
graph over those rounds.

The default, `auto`, is the directed ring up to RING_MEMBERS_MAX members and the exponential graph
above. Gradient tracking with momentum is stable only while the step is small against the graph's
mixing, and the directed ring mixes ever more slowly as it grows (its second eigenvalue is
cos(pi / n) in modulus): at the default step P2P-FT on digits ends at 96.7% on a ring of 4, 91.4% of
5, 18.6% of 6 and 27.2% of 8, and on the exponential graph at 94.4-97.8% from 3 to 16 nodes (README,
"How many volunteers: the graph"). An elastic run rebuilds its graph at every epoch from the member
count, so `auto` switches as volunteers come and go.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BadInput

if TYPE_CHECKING:
    import torch

AUTO = "auto"
TOPOLOGIES = (AUTO, "directed-ring", "exponential", "one-peer-exponential", "complete", "ring", "random:K", "FILE")
BUILT_IN = TOPOLOGIES[:6]  # by name; random:K is built too, from its K
RING_MEMBERS_MAX = 4  # `auto` builds the directed ring up to this many members, the exponential graph above


@dataclass(frozen=True)
class Neighbourhood:
    """What one node knows of the graph: its neighbours and its own mixing weights."""

    node: int
    in_neighbours: tuple[int, ...]
    out_neighbours: tuple[int, ...]
    # in-degree of each in-neighbour: lets a node of an undirected graph compute Metropolis weights
    neighbour_degrees: tuple[tuple[int, int], ...] = ()
    hops: tuple[int, ...] = ()  # a one-peer graph's hops, one a round in turn (empty: every link every round)
    size: int = 0  # the graph's node count, where hops are used

    @property
    def time_varying(self) -> bool:
        return bool(self.hops)

    def senders(self, k: int) -> tuple[int, ...]:
        """The in-neighbours whose links round k uses (all of them on a fixed graph)."""
        if not self.hops:
            return self.in_neighbours
        return ((self.node - self.hops[k % len(self.hops)]) % self.size,)

    def receivers(self, k: int) -> tuple[int, ...]:
        """The out-neighbours round k sends to (all of them on a fixed graph)."""
        if not self.hops:
            return self.out_neighbours
        return ((self.node + self.hops[k % len(self.hops)]) % self.size,)

    def row_weight_at(self, k: int) -> float:
        """a_ij of round k, for i itself and each of that round's senders."""
        return 1.0 / (len(self.senders(k)) + 1)

    def col_weight_at(self, k: int) -> float:
        """b_li of round k, for this node itself and each of that round's receivers."""
        return 1.0 / (len(self.receivers(k)) + 1)

    @property
    def self_row_weight(self) -> float:
        return 1.0 / (len(self.in_neighbours) + 1)

    def row_weight(self, src: int) -> float:
        """a_ij for an in-neighbour j (or i itself)."""
        return self.self_row_weight

    @property
    def self_col_weight(self) -> float:
        return 1.0 / (len(self.out_neighbours) + 1)

    def col_weight(self, dst: int) -> float:
        """b_li: the share of this node's push mass that goes to out-neighbour l."""
        return self.self_col_weight

    def metropolis_weight(self, j: int) -> float:
        """pi_ij = 1 / (1 + max(d_i, d_j)) on an undirected graph: symmetric, so doubly stochastic."""
        return 1.0 / (1 + max(len(self.in_neighbours), dict(self.neighbour_degrees)[j]))

    @property
    def self_metropolis_weight(self) -> float:
        return 1.0 - sum(self.metropolis_weight(j) for j in self.in_neighbours)


@dataclass(frozen=True)
class Topology:
    n: int
    edges: frozenset[tuple[int, int]]  # (src, dst): src sends to dst
    name: str = "custom"
    hops: tuple[int, ...] = ()  # one-peer graphs: the hop each round uses, in turn (Neighbourhood.senders)
    _in: dict[int, tuple[int, ...]] = field(init=False, repr=False, compare=False)
    _out: dict[int, tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ins: dict[int, list[int]] = {i: [] for i in range(self.n)}
        outs: dict[int, list[int]] = {i: [] for i in range(self.n)}
        for s, d in sorted(self.edges):
            if not (0 <= s < self.n and 0 <= d < self.n):
                raise BadInput(f"topology edge {s}->{d} names a node outside 0..{self.n - 1}")
            if s != d:
                outs[s].append(d)
                ins[d].append(s)
        object.__setattr__(self, "_in", {i: tuple(v) for i, v in ins.items()})
        object.__setattr__(self, "_out", {i: tuple(v) for i, v in outs.items()})

    def in_neighbours(self, i: int) -> tuple[int, ...]:
        return self._in[i]

    def out_neighbours(self, i: int) -> tuple[int, ...]:
        return self._out[i]

    def neighbourhood(self, i: int) -> Neighbourhood:
        degrees = tuple((j, len(self._in[j])) for j in self._in[i])
        return Neighbourhood(i, self._in[i], self._out[i], degrees, self.hops, self.n if self.hops else 0)

    @property
    def time_varying(self) -> bool:
        return bool(self.hops)

    @property
    def is_undirected(self) -> bool:
        return all((d, s) in self.edges for s, d in self.edges)

    def unreachable_pair(self) -> tuple[int, int] | None:
        """A pair (a, b) such that b cannot be reached from a, or None if strongly connected."""
        for start, nbrs in ((0, self._out), (0, self._in)):
            seen = {start}
            stack = [start]
            while stack:
                for j in nbrs[stack.pop()]:
                    if j not in seen:
                        seen.add(j)
                        stack.append(j)
            missing = sorted(set(range(self.n)) - seen)
            if missing:
                return (start, missing[0]) if nbrs is self._out else (missing[0], start)
        return None

    def check_strongly_connected(self) -> Topology:
        pair = self.unreachable_pair()
        if pair is not None:
            raise BadInput(
                f"topology {self.name!r} is not strongly connected: node {pair[1]} cannot be reached "
                f"from node {pair[0]}; add links so every node reaches every other"
            )
        return self

    def row_stochastic(self, k: int = 0) -> torch.Tensor:
        """The full matrix A of round k (for tests and analysis; nodes never build it)."""
        import torch

        a = torch.zeros(self.n, self.n, dtype=torch.float64)
        for i in range(self.n):
            h = self.neighbourhood(i)
            a[i, i] = h.row_weight_at(k)
            for j in h.senders(k):
                a[i, j] = h.row_weight_at(k)
        return a

    def column_stochastic(self, k: int = 0) -> torch.Tensor:
        """The full matrix B of round k."""
        import torch

        b = torch.zeros(self.n, self.n, dtype=torch.float64)
        for j in range(self.n):
            h = self.neighbourhood(j)
            b[j, j] = h.col_weight_at(k)
            for l in h.receivers(k):  # noqa: E741
                b[l, j] = h.col_weight_at(k)
        return b


def _edges(pairs: Iterable[tuple[int, int]]) -> frozenset[tuple[int, int]]:
    return frozenset((s, d) for s, d in pairs if s != d)


def directed_ring(n: int) -> Topology:
    return Topology(n, _edges((i, (i + 1) % n) for i in range(n)), "directed-ring")


def _exponential_hops(n: int) -> tuple[int, ...]:
    return tuple(2**k for k in range(n.bit_length()) if 2**k < n)


def exponential(n: int) -> Topology:
    """Directed exponential graph: i sends to i + 2^k (mod n) for every 2^k < n."""
    hops = _exponential_hops(n)
    return Topology(n, _edges((i, (i + h) % n) for i in range(n) for h in hops), "exponential")


def one_peer_exponential(n: int) -> Topology:
    """The exponential graph's links, one hop a round in turn (module docstring)."""
    return Topology(n, exponential(n).edges, "one-peer-exponential", _exponential_hops(n))


def auto(n: int) -> Topology:
    """The directed ring up to RING_MEMBERS_MAX nodes, the exponential graph above (module docstring)."""
    return directed_ring(n) if n <= RING_MEMBERS_MAX else exponential(n)


def slow_mixing_warning(spec: str, n: int, grown_from: int | None = None) -> str | None:
    """What to tell a user who chose the directed ring for more nodes than it mixes fast enough for; with
    `grown_from` (an elastic run's previous member count), only if that count did not need it already."""
    if spec != "directed-ring" or n <= RING_MEMBERS_MAX:
        return None
    if grown_from is not None and grown_from > RING_MEMBERS_MAX:
        return None
    return (
        f"--topology directed-ring over {n} nodes mixes too slowly for gradient tracking at the usual step "
        'sizes and can fail to converge (README, "How many volunteers: the graph"); --topology auto or '
        "exponential does not"
    )


def complete(n: int) -> Topology:
    return Topology(n, _edges((i, j) for i in range(n) for j in range(n)), "complete")


def ring(n: int) -> Topology:
    pairs = [(i, (i + 1) % n) for i in range(n)] + [((i + 1) % n, i) for i in range(n)]
    return Topology(n, _edges(pairs), "ring")


def random_graph(n: int, k: int, seed: int) -> Topology:
    """K out-neighbours per node, strongly connected by construction: a random Hamiltonian
    cycle supplies one out-link of every node, the other K-1 are drawn uniformly."""
    if not 1 <= k < max(n, 2):
        raise BadInput(f"random:K needs 1 <= K <= nodes-1 (got K={k} with {n} nodes)")
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    outs = {order[i]: {order[(i + 1) % n]} for i in range(n)}
    for i in range(n):
        others = [j for j in range(n) if j != i and j not in outs[i]]
        outs[i].update(rng.sample(others, k - len(outs[i])))
    return Topology(n, _edges((i, j) for i in outs for j in outs[i]), f"random:{k}")


def read_edge_list(path: str | Path, n: int | None = None) -> Topology:
    """Edge-list file: one link per line, `SRC DST` or `SRC -> DST` (directed) or `A <-> B`
    (both directions); `#` starts a comment. Nodes are integers 0..n-1."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        names = ", ".join((*BUILT_IN, "random:K"))
        raise BadInput(f"topology file {p} {what}; pass an edge-list file or a built-in name ({names})")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise BadInput(f"topology file {p} is not text: write one link per line, 'SRC DST' or 'A <-> B'") from None
    except OSError as e:
        raise BadInput(f"cannot read topology file {p}: {e.strerror or e}") from None
    pairs: list[tuple[int, int]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        both = "<->" in line
        parts = line.replace("<->", " ").replace("->", " ").split()
        try:
            s, d = (int(x) for x in parts)
        except ValueError:
            raise BadInput(f"{p}:{lineno}: expected 'SRC DST', 'SRC -> DST' or 'A <-> B', got {raw!r}") from None
        if s < 0 or d < 0:
            raise BadInput(f"{p}:{lineno}: node numbers must be >= 0, got {raw!r}")
        pairs.append((s, d))
        if both:
            pairs.append((d, s))
    if not pairs:
        raise BadInput(f"topology file {p} lists no links")
    size = max(max(e) for e in pairs) + 1
    if n is not None and size > n:
        raise BadInput(f"topology file {p} names node {size - 1} but the run has {n} nodes (0..{n - 1})")
    return Topology(n or size, _edges(pairs), p.name)


def make_topology(spec: str, n: int, seed: int = 0) -> Topology:
    """Build a named topology (see TOPOLOGIES) or read an edge-list file, checked strongly connected."""
    if n < 1:
        raise BadInput(f"a run needs at least one node (got {n})")
    builders = {
        AUTO: auto,
        "directed-ring": directed_ring,
        "exponential": exponential,
        "one-peer-exponential": one_peer_exponential,
        "complete": complete,
        "ring": ring,
    }
    if spec in builders:
        topo = builders[spec](n)
    elif spec.startswith("random:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            raise BadInput(f"bad topology {spec!r}: write random:K with K an integer, e.g. random:2") from None
        topo = random_graph(n, k, seed)
    elif Path(spec).suffix or Path(spec).exists():
        topo = read_edge_list(spec, n)
    else:
        raise BadInput(f"unknown topology {spec!r}: use one of {', '.join(BUILT_IN)}, random:K or an edge-list file")
    return topo.check_strongly_connected()
