"""What pushed mass that arrives a round late costs: P2P-FT in the simulator with `--late-mass P`.

    .venv/bin/python bench/late_mass.py [--seeds 0,1,2,3,4] [--late 0,0.5,1] [--paced-late 0,0.5]
        [--epochs 40] [--jobs 2] [--json PATH] [--model M] [--lr LR]

The daemons' asynchronous rounds wait for their in-neighbours' values of the round, but once a member
is slow they take pushed mass as it comes, often a round late (README: slow volunteers). The
simulator delivers every message in its round unless `--late-mass P` holds each pushed-mass message
back a round with probability P. Per seed this runs the clean run (`--sync async`, no slow node: in
the simulator the same as `wait`) at each P of `--late`, and the run with node 3 five times slower
and `--pace-batch` at each P of `--paced-late`, and prints every node's final accuracy (they agree:
consensus) with the mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ProcessPoolExecutor

import torch
from _model_flags import add_model_flags

from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation

SLOW = "3:5"


def run(case: str, late: float, seed: int, epochs: int, model: str, lr: float) -> dict:
    torch.set_num_threads(1)  # one run per worker process
    paced = case == "paced 5x"
    settings = SimulateSettings(
        epochs=epochs,
        seed=seed,
        sync="async",
        late_mass=late,
        slow=[SLOW] if paced else [],
        pace_batch=paced,
        model=model,
        lr=lr,
    ).validate()
    result = Simulation(settings).run("p2pft")
    return {"case": case, "late_mass": late, "seed": seed, "accuracy": result.accuracy}


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--late", type=floats, default=[0.0, 0.5, 1.0], help="--late-mass values of the clean run")
    ap.add_argument("--paced-late", type=floats, default=[0.0, 0.5], help="--late-mass values of the paced 5x run")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--jobs", type=int, default=2, help="runs at once (one torch thread each)")
    ap.add_argument("--json", help="write every run's accuracies here")
    add_model_flags(ap)
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [("clean", p, s) for p in args.late for s in seeds] + [
        ("paced 5x", p, s) for p in args.paced_late for s in seeds
    ]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run, c, p, s, args.epochs, args.model, args.lr) for c, p, s in jobs]
        runs = []
        for f in futures:
            r = f.result()
            runs.append(r)
            accs = ", ".join(f"{100 * a:.1f}" for a in r["accuracy"])
            print(f"{r['case']:9} late mass {r['late_mass']:.2f} seed {r['seed']}: {accs}", flush=True)
    print(f"\n| case | late mass | {' | '.join(f'seed {s}' for s in seeds)} | mean |")
    print(f"|---|---|{'---|' * len(seeds)}---|")
    for case, late in dict.fromkeys((c, p) for c, p, _ in jobs):
        accs = [100 * min(r["accuracy"]) for r in runs if (r["case"], r["late_mass"]) == (case, late)]
        print(f"| {case} | {late:.2f} | {' | '.join(f'{a:.1f}' for a in accs)} | {statistics.mean(accs):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
