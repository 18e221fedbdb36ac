"""Byzantine robustness on digits: one attacker among 5 nodes, `--robust none` against `--robust clip`.

    .venv/bin/python bench/robustness.py [--epochs 10] [--batch-size 32] [--lr 0.02] [--seeds 0,1,2]

5 nodes on the `exponential` topology (in-degree 3 at 5 nodes, what clipping with b = 1 needs),
P2P-FT, the `iid` split so that the 4 honest nodes alone are a fair reference: they keep exactly
the data shares they have in the 5-node run (node 4, the attacker, joins only at the last round
there, so the honest nodes train and mix among themselves all run long). Each cell is the mean test
accuracy of the 4 honest nodes, median over the seeds. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation, iterations_per_epoch

KINDS = ("signflip", "scale:100", "noise", "alie", "stale")
ATTACKER = 4


def honest_accuracy(robust: str, attack: str | None, seed: int, args, honest_only: bool = False) -> float:
    common = dict(nodes=5, split="iid", topology="exponential", algorithm="p2pft", seed=seed)
    common |= dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, robust=robust)
    if honest_only:
        last = iterations_per_epoch(1437, 5, args.batch_size) * args.epochs - 1
        common["churn"] = f"join:{ATTACKER}@{last}"
    settings = SimulateSettings(attack=[f"{ATTACKER}:{attack}"] if attack else [], **common).validate()
    result = Simulation(settings).run("p2pft")
    return statistics.mean(a for i, a in enumerate(result.accuracy) if i != ATTACKER)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()

    def cell(robust: str, attack: str | None, honest_only: bool = False) -> float:
        return 100 * statistics.median(honest_accuracy(robust, attack, s, args, honest_only) for s in seeds)

    reference = cell("none", None, honest_only=True)
    print(
        f"digits, 5 nodes, exponential, iid, P2P-FT, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
        f"seeds {args.seeds} (median); honest nodes' mean accuracy (%)\n"
    )
    print(f"4 honest nodes alone: {reference:.1f}\n")
    print("| attacker (node 5) | --robust none | --robust clip | clip vs honest-only |")
    print("|---|---|---|---|")
    for kind in (None, *KINDS):
        none, clip = cell("none", kind), cell("clip", kind)
        print(f"| {kind or 'benign (no attack)'} | {none:.1f} | {clip:.1f} | {clip - reference:+.1f} |", flush=True)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
