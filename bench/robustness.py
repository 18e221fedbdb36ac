"""Byzantine robustness on digits: one attacker among 5 nodes, `--robust none` against `--robust clip`.

    nice .venv/bin/python bench/robustness.py [--algorithms p2pft,dsgd] [--epochs 40] [--seeds 0,1,2] [--model M]

5 nodes on the `exponential` topology (in-degree 3 at 5 nodes: the 2b + 1 that clipping with b = 1
needs), node 4 the attacker (it sends to nodes 0, 1 and 3). The split is `iid`, so that the 4
honest nodes alone are a fair reference: they keep exactly the data shares they have in the 5-node
run and lose only a fifth of the data, which at iid costs little; with a label-skewed split the
attacker's shard would hold classes the honest nodes never see, and "honest-only" would measure the
missing classes instead of the attack. The honest-only run is the same 5-node run with node 4 outside
it until the last round (`--churn join:4@LAST`), so the honest nodes train and mix among themselves,
on the same rounds and schedule. 40 epochs (the default run length) brings the plain run to its
plateau: a shorter run mostly measures how fast each variant learns. Each cell is the mean test
accuracy of the 4 honest nodes, median over the seeds. Prints a markdown table per algorithm.
The README's figures were measured on the former default model: `--model vit_digits_4px` (at this
script's own default `--lr 0.02`).
"""

from __future__ import annotations

import argparse
import statistics
import time

from _model_flags import add_model_flags

from p2pnode.node.attacks import parse_attacks
from p2pnode.node.churn import parse_churn
from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation, iterations_per_epoch

KINDS = ("signflip", "scale:100", "noise", "alie", "stale")
ATTACKER = 4
NODES = 5


def simulation(algorithm: str, seed: int, args) -> Simulation:
    """One per seed: model, data, shares and feature cache are built once and every cell reuses them."""
    s = SimulateSettings(
        nodes=NODES,
        split="iid",
        topology="exponential",
        algorithm=algorithm,
        seed=seed,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        model=args.model,
        device="cpu",
    )
    return Simulation(s.validate())


def honest_accuracy(sim: Simulation, robust: str, attack: str | None, alone: bool = False) -> float:
    s = sim.settings
    s.robust = robust
    sim.attacks = parse_attacks([f"{ATTACKER}:{attack}"] if attack else [], NODES)
    sim.churn = []
    if alone:  # node 4 outside the run until its last round
        last = iterations_per_epoch(sum(len(p) for p in sim.parts), NODES, s.batch_size) * s.epochs - 1
        sim.churn = parse_churn(f"join:{ATTACKER}@{last}", NODES)
    result = sim.run(s.algorithm)
    return statistics.mean(a for i, a in enumerate(result.accuracy) if i != ATTACKER)


def table(algorithm: str, args, seeds: list[int]) -> None:
    sims = [simulation(algorithm, seed, args) for seed in seeds]

    def cell(robust: str, attack: str | None, alone: bool = False) -> float:
        return 100 * statistics.median(honest_accuracy(sim, robust, attack, alone) for sim in sims)

    reference = cell("none", None, alone=True)
    print(f"\n### {algorithm}: 4 honest nodes alone {reference:.1f}\n")
    print("| attacker (node 4) | --robust none | --robust clip | clip - honest alone |")
    print("|---|---|---|---|")
    for kind in (None, *KINDS):
        none, clip = cell("none", kind), cell("clip", kind)
        print(f"| {kind or 'none (benign)'} | {none:.1f} | {clip:.1f} | {clip - reference:+.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", default="p2pft,dsgd")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.02)
    add_model_flags(parser, lr=False)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    print(
        f"digits, {args.model}, 5 nodes, exponential, iid, {args.epochs} epochs, batch {args.batch_size}, "
        f"lr {args.lr}, seeds {args.seeds} (median): mean test accuracy (%) of the 4 honest nodes"
    )
    for algorithm in args.algorithms.split(","):
        table(algorithm, args, seeds)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
