"""The shape of the DIMAT paper's Tables 2 and 3 on scikit-learn's digits (simulator).

    .venv/bin/python bench/reproduce_dimat.py [--seeds 0,1,2] [--epochs 20] [--algorithms LIST] [--json PATH]
        [--plot PATH] [--model vit_digits] [--lr LR]

5 agents; IID and non-IID (two classes per agent: 0-1,2-3,4-5,6-7,8-9); `complete` and `ring`;
SGP, CDSGD, WA, WM and DIMAT, each seed. Prints mean and standard deviation over seeds of the final
test accuracy (mean over agents), bytes and messages per agent per epoch, and draws mean accuracy
against epoch for every algorithm and setting. The README's table was measured on the former default
model: `--model vit_digits_4px --lr 0.005`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from _model_flags import add_model_flags

from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation

ALGORITHMS = ("sgp", "cdsgd", "wa", "wm", "dimat")
SPLITS = {"IID": "iid", "non-IID": "0-1,2-3,4-5,6-7,8-9"}
TOPOLOGIES = ("complete", "ring")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS), help="a subset of " + ",".join(ALGORITHMS))
    parser.add_argument("--splits", default=",".join(SPLITS), help="a subset of " + ",".join(SPLITS))
    add_model_flags(parser)
    args = parser.parse_args()
    algorithms = [a for a in args.algorithms.split(",") if a]
    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown:
        parser.error(f"unknown algorithm {unknown[0]!r}: choose from {', '.join(ALGORITHMS)}")
    splits = {name: SPLITS[name] for name in args.splits.split(",") if name}
    if not splits or set(args.splits.split(",")) - set(SPLITS):
        parser.error(f"--splits takes a subset of {','.join(SPLITS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, dict] = {}
    for split_name, split in splits.items():
        for topology in TOPOLOGIES:
            for seed in seeds:
                settings = SimulateSettings(
                    nodes=5, split=split, topology=topology, epochs=args.epochs, seed=seed, model=args.model, lr=args.lr
                )
                sim = Simulation(settings)
                for name in algorithms:
                    start = time.perf_counter()
                    r = sim.run(name)
                    key = f"{split_name}|{topology}|{name}|{seed}"
                    runs[key] = {
                        "accuracy": r.accuracy,
                        "curve": [float(np.mean(a)) for a in r.history["accuracy"]],
                        "bytes_per_epoch": float(np.mean(r.bytes_sent)) / args.epochs,
                        "messages_per_epoch": float(np.mean(r.messages_sent)) / args.epochs,
                        "seconds": time.perf_counter() - start,
                    }
                    print(f"{key}: {100 * np.mean(r.accuracy):.1f}% ({runs[key]['seconds']:.0f} s)", flush=True)
    print(f"\nFinal test accuracy (%), mean over 5 agents; mean ± std over seeds {seeds}; {args.epochs} epochs\n")
    header = " | ".join(f"{s} {t}" for s in splits for t in TOPOLOGIES)
    print(f"| algorithm | {header} | bytes / agent / epoch (ring) | messages / agent / epoch (ring) |")
    print("|---|" + "---|" * (len(splits) * len(TOPOLOGIES) + 2))
    for name in algorithms:
        cells = []
        for split_name in splits:
            for topology in TOPOLOGIES:
                accs = [100 * np.mean(runs[f"{split_name}|{topology}|{name}|{s}"]["accuracy"]) for s in seeds]
                cells.append(f"{np.mean(accs):.1f} ± {np.std(accs):.1f}")
        ring = runs[f"{list(splits)[-1]}|ring|{name}|{seeds[0]}"]
        print(
            f"| {name} | {' | '.join(cells)} | {ring['bytes_per_epoch'] / 1e6:.2f} MB | "
            f"{ring['messages_per_epoch']:.1f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(runs, indent=1))
    if args.plot and len(splits) == len(SPLITS):
        plot(runs, seeds, algorithms, args.plot)


def plot(runs: dict, seeds: list[int], algorithms: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), sharey=True)
    for ax, (split_name, topology) in zip(axes, [(s, t) for s in SPLITS for t in TOPOLOGIES], strict=True):
        for name in algorithms:
            curves = np.array([runs[f"{split_name}|{topology}|{name}|{s}"]["curve"] for s in seeds]) * 100
            ax.plot(range(1, curves.shape[1] + 1), curves.mean(0), label=name)
        ax.set_title(f"{split_name}, {topology}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean test accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
