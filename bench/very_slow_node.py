"""A node 10x to 200x slower than the others (simulator, P2P-FT, `--sync async`, its batch paced):
its late gradients counted in full, as before node/algorithms/late.py, against with their weight.

    .venv/bin/python bench/very_slow_node.py [--factors 10,20,50,100,200] [--seeds 0,1,2,3,4] [--json PATH]

Each run is `p2pnode simulate --sync async --slow 3:FACTOR --seed S` (40 epochs, the paper's split, one
torch thread); "in full" sets LATE_ROUNDS out of reach, so every gradient keeps weight 1. A paced node
computes max(1, 16 // FACTOR) samples, and one sample takes FACTOR / 16 rounds: from 20x on, its
gradients serve more than one round each. Prints each node's mean accuracy per seed, and the clean run.
"""

from __future__ import annotations

import argparse
import statistics

from _slow_node import run_in_pairs

from p2pnode.node.algorithms.late import LATE_ROUNDS as KEPT_LATE_ROUNDS


def run(case: tuple[float | None, bool, int, int]) -> dict:
    factor, weighted, seed, epochs = case
    import torch

    import p2pnode.node.algorithms.late as late
    from p2pnode.node.settings import SimulateSettings
    from p2pnode.node.simulator import Simulation

    torch.set_num_threads(1)
    late.LATE_ROUNDS = KEPT_LATE_ROUNDS if weighted else 10**9  # a worker process runs several cases
    slow = {} if factor is None else {"sync": "async", "slow": [f"3:{factor:g}"]}
    settings = SimulateSettings(epochs=epochs, seed=seed, **slow).validate()
    result = Simulation(settings).run("p2pft")
    return {
        "factor": factor,
        "weighted": weighted,
        "seed": seed,
        "accuracy": result.accuracy,
        "steps": result.steps,
        "samples": result.samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", default="10,20,50,100,200")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--json", help="also write every run here")
    args = parser.parse_args()
    factors = [float(f) for f in args.factors.split(",") if f]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    cases = [(None, True, s, args.epochs) for s in seeds]
    cases += [(f, w, s, args.epochs) for f in factors for w in (False, True) for s in seeds]
    runs = run_in_pairs(run, cases, args.json)
    print("| slow node | late gradients | seeds (%) | mean | node 3's new gradients |")
    print("|---|---|---|---|---|")
    for factor, weighted in [(None, True)] + [(f, w) for f in factors for w in (False, True)]:
        rows = [r for r in runs if r["factor"] == factor and r["weighted"] == weighted]
        acc = [100 * statistics.mean(r["accuracy"]) for r in rows]
        name = "none" if factor is None else f"{factor:g}x"
        how = "" if factor is None else ("with their weight" if weighted else "in full")
        steps = statistics.median(r["steps"][3] for r in rows) if rows[0]["steps"] else ""
        print(f"| {name} | {how} | {' / '.join(f'{a:.1f}' for a in acc)} | {statistics.mean(acc):.1f} | {steps} |")


if __name__ == "__main__":
    main()
