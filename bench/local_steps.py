"""Tracker-corrected local steps (`--local-steps K`, K-GT) against a K times larger batch, at equal bytes.

    .venv/bin/python bench/local_steps.py [--seeds 0,1,2] [--ks 2,4] [--epochs 40] [--json PATH] [--model M] [--lr LR]

The default digits run (simulator, int8). Both ways of cutting rounds per pass over the data by K cut
the bytes by K: K steps on 16 samples between two exchanges, or one step on 16 K samples. For each K
the local steps run at the default step size and at 1/K of it (K steps between two mixings move as far
as one step K times the size; the least-squares test needs the smaller one), the larger batch at the
default step size. Prints mean accuracy over the nodes and seeds (every node ends in consensus),
rounds and MB sent per node. The default step size is `--lr`. The README's figures were measured on
the former default model: `--model vit_digits_4px --lr 0.005`.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from _model_flags import add_model_flags

from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation


def measure(label: str, seeds: list[int], **overrides) -> dict:
    accuracies, sent, rounds = [], [], []
    for seed in seeds:
        result = Simulation(SimulateSettings(seed=seed, **overrides).validate()).run("p2pft")
        accuracies.append(100 * float(np.mean(result.accuracy)))
        sent.append(float(np.mean(result.bytes_sent)) / 1e6)
        rounds.append(result.iterations)
    row = {
        "run": label,
        "settings": overrides,
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_per_seed": accuracies,
        "rounds": rounds[0],
        "mb_per_node": float(np.mean(sent)),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ks", default="2,4")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--json", default=None)
    add_model_flags(parser)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    base = SimulateSettings()
    started = time.perf_counter()
    common = {"epochs": args.epochs, "model": args.model, "lr": args.lr}
    rows = [measure("one step per exchange (default)", seeds, **common)]
    for k in (int(x) for x in args.ks.split(",")):
        rows.append(measure(f"{k} local steps, lr {args.lr:g}", seeds, **common, local_steps=k))
        smaller = common | {"lr": args.lr / k}  # 1/K of the default step size
        rows.append(measure(f"{k} local steps, lr {args.lr / k:g}", seeds, **smaller, local_steps=k))
        rows.append(measure(f"batch {k * base.batch_size}", seeds, **common, batch_size=k * base.batch_size))
    print(f"\nseeds {args.seeds}, {args.epochs} epochs, {time.perf_counter() - started:.0f} s")
    print("| run | rounds | MB sent per node | accuracy, mean over seeds (%) | per seed |")
    print("|---|---|---|---|---|")
    for r in rows:
        per_seed = ", ".join(f"{a:.1f}" for a in r["accuracy_per_seed"])
        print(f"| {r['run']} | {r['rounds']} | {r['mb_per_node']:.1f} | {r['accuracy_mean']:.1f} | {per_seed} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
