"""Why activation matching made DIMAT lose to plain averaging on non-IID data, and what the identity bias does.

    .venv/bin/python bench/dimat_alignment.py [--seeds 0] [--epochs 20] [--margins 0,0.1] [--model M] [--lr LR]

Digits, 5 agents, non-IID (two classes each: 0-1,2-3,4-5,6-7,8-9), `complete`, on the former default
model: the setting where DIMAT was 3.6 points below WA. During a DIMAT run, at every merge and for every pair
(i, j), neighbour j is aligned to node i on i's own 256 samples (what DIMAT does), in a DIMAT run
that uses the given margin (`node/alignment.py: IDENTITY_MARGIN`, with LAYER_GAIN for any margin
above 0; 0 is the plain maximum-correlation assignment), and the mean correlation of the matched
units is measured per part (MLP units, q/k dimensions, v dimensions):
- on i's own samples: the objective the matching maximises;
- on 256 samples drawn from every agent's shard: what the merged model has to serve;
each for the identity and for the permutation, with the fraction of units the permutation moves.
Prints medians over merges and pairs, the MLP figures merge by merge, then the final accuracy (mean
over agents) of WA and of DIMAT run with each margin, per seed. The README's figures were measured
on the former default model: `--model vit_digits_4px --lr 0.005`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from _model_flags import add_model_flags

from p2pnode.node import alignment
from p2pnode.node.algorithms.dimat import FEATURE_SAMPLES
from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation

PARTS = ("mlp", "qk", "v")


def moved(perm: alignment.BlockPermutation) -> dict[str, float]:
    """Fraction of units a permutation moves, per part."""
    qk, v = (i.numpy() for i in alignment._attention_indices(perm))
    same = np.arange(len(qk))
    return {
        "mlp": float((perm.mlp.numpy() != np.arange(len(perm.mlp))).mean()),
        "qk": float((qk != same).mean()),
        "v": float((v != same).mean()),
    }


class Probe:
    """Called before every round of a DIMAT run; at merge rounds, measures the matching of every pair."""

    def __init__(self, sim: Simulation, margin: float) -> None:
        self.sim, self.margin = sim, margin
        self.merges = 0
        everyone = np.concatenate([p[: FEATURE_SAMPLES // len(sim.parts) + 1] for p in sim.parts])
        self.all_features, _ = sim.train_bank.get(everyone)
        # rows: (merge, data, part, "identity" | "permuted" | "moved") -> values over pairs
        self.rows: dict[tuple, list[float]] = {}

    def add(self, key: tuple, value: float) -> None:
        self.rows.setdefault(key, []).append(value)

    def __call__(self, k: int, net) -> None:
        nodes = net.nodes
        if not nodes[0].is_merge(k):
            return
        self.merges += 1
        model = self.sim.model
        for node in nodes:
            own = alignment.to_params(model, node.params)
            own_features, _ = node.objective.bank.get(node.objective.indices[:FEATURE_SAMPLES])
            for j in node.hood.in_neighbours:
                other = alignment.to_params(model, nodes[j].params)
                on_own = alignment.activation_correlations(model, own, other, own_features)
                on_all = alignment.activation_correlations(model, own, other, self.all_features)
                perms = alignment.match_activations(model, own, other, own_features, margin=self.margin)
                for perm, c_own, c_all in zip(perms, on_own, on_all, strict=True):
                    ident = alignment.BlockPermutation.identity(len(perm.mlp), len(perm.heads), perm.qk.shape[1])
                    for data, corr in (("own", c_own), ("all", c_all)):
                        before = alignment.matched_correlation(corr, ident)
                        after = alignment.matched_correlation(corr, perm)
                        for part in PARTS:
                            self.add((self.merges, data, part, "identity"), before[part])
                            self.add((self.merges, data, part, "permuted"), after[part])
                    for part, fraction in moved(perm).items():
                        self.add((self.merges, "-", part, "moved"), fraction)

    def median(self, data: str, part: str, what: str, merges: range | None = None) -> float:
        merges = merges or range(1, self.merges + 1)
        return statistics.median(v for m in merges for v in self.rows[(m, data, part, what)])

    def table(self) -> None:
        print("| margin | part | units moved | own data: identity → permuted | all agents' data: identity → permuted |")
        for part in PARTS:
            own = f"{self.median('own', part, 'identity'):.3f} → {self.median('own', part, 'permuted'):.3f}"
            every = f"{self.median('all', part, 'identity'):.3f} → {self.median('all', part, 'permuted'):.3f}"
            print(f"| {self.margin:g} | {part} | {100 * self.median('-', part, 'moved'):.0f}% | {own} | {every} |")
        print("\nMLP units, merge by merge (median over pairs): moved, identity → permuted on own data")
        for m in range(1, self.merges + 1):
            one = range(m, m + 1)
            ident, perm = self.median("own", "mlp", "identity", one), self.median("own", "mlp", "permuted", one)
            print(f"  merge {m}: {100 * self.median('-', 'mlp', 'moved', one):.0f}%, {ident:.3f} → {perm:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--margins", default="0,0.1")
    add_model_flags(parser)
    args = parser.parse_args()
    margins = [float(m) for m in args.margins.split(",")]
    started = time.perf_counter()
    finals: dict[str, list[float]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        settings = SimulateSettings(
            nodes=5,
            split="0-1,2-3,4-5,6-7,8-9",
            topology="complete",
            epochs=args.epochs,
            seed=seed,
            model=args.model,
            lr=args.lr,
        )
        sim = Simulation(settings)
        finals.setdefault("wa", []).append(100 * float(np.mean(sim.run("wa").accuracy)))
        default = alignment.IDENTITY_MARGIN
        try:
            for margin in margins:
                alignment.IDENTITY_MARGIN = margin
                probe = Probe(sim, margin)
                result = sim.run("dimat", on_round=probe)
                finals.setdefault(f"dimat, margin {margin:g}", []).append(100 * float(np.mean(result.accuracy)))
                print(f"\nseed {seed}: matching at every merge of the DIMAT run with margin {margin:g}")
                print("(median over merges and pairs of the mean correlation of matched units)\n")
                probe.table()
        finally:
            alignment.IDENTITY_MARGIN = default
    print(f"\nfinal test accuracy (%), mean over agents, per seed {args.seeds}, {args.epochs} epochs\n")
    for name, values in finals.items():
        print(f"- {name}: {', '.join(f'{v:.1f}' for v in values)} (mean {statistics.mean(values):.1f})")
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
