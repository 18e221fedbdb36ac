"""The P2P-FT papers' Fig. 2 claim, measured: P2P-FT's attention is closer to central fine-tuning's than
Local-FT's is, most of all on images of classes a node never trained on.

    .venv/bin/python bench/attention_similarity.py [--seeds 0,1,2] [--epochs 40] [--images 40] [--grid PATH]
        [--model vit_digits] [--optimizer sgd] [--lr LR]

Per seed: the simulator's digits run (4 nodes, the paper's split 0-1,2-3,4-6,7-9) on the default
`vit_digits` (4x4 maps) at the simulator's defaults unless the flags say otherwise (the README's
earlier figures: `--model vit_digits_p2 --optimizer adam --lr 0.001`; the former default
`vit_digits_4px` gives 2x2 maps, all four patches weighted within 0.25 +- 0.01, so every similarity
is about 0.9999 and says nothing), trains Local-FT, P2P-FT and central, saves the models
(`node/saved_models.py`, what `simulate --save` writes) and `p2pnode attention`'s report
(`node/attention.py`) is taken for every node on `--images` test images, half of classes that node
never saw. For each node, algorithm and image group (never seen / seen) the mean cosine similarity
of the last block's attention map to the central model's map on the same image; then the mean over
the 4 nodes, per seed, and mean ± std over seeds.
`--grid` keeps the PNG grid of seed 0's node 0, every one of its `--images` (the README's 8-image picture comes
from `p2pnode attention --images 8` on the same seed's saved models).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from p2pnode.node.attention import attention_report, cosine_similarity
from p2pnode.node.saved_models import save_simulation_run
from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation

ALGORITHMS = ("local", "p2pft", "central")


def similarities(report: dict) -> dict[tuple[str, bool], float]:
    """(algorithm, seen by the node) -> mean cosine similarity of its maps to central's, over the images."""
    out: dict[tuple[str, bool], list[float]] = {}
    for row in report["images"]:
        central = torch.tensor(row["maps"]["central"])
        for algo in ("local", "p2pft"):
            key = (algo, row["seen_by_node"])
            out.setdefault(key, []).append(cosine_similarity(torch.tensor(row["maps"][algo]), central))
    return {key: float(np.mean(v)) for key, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--grid", type=Path, default=None)
    parser.add_argument("--model", default="vit_digits")
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--lr", type=float, default=SimulateSettings.lr, help="default: the simulator's")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    per_seed: dict[tuple[str, bool], list[float]] = {}
    accuracy: dict[str, list[float]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="p2pnode-attention-"))
    try:
        for seed in seeds:
            settings = SimulateSettings(
                model=args.model, optimizer=args.optimizer, lr=args.lr, epochs=args.epochs, seed=seed
            )
            sim = Simulation(settings)
            saved = workdir / f"seed{seed}"
            for algo in ALGORITHMS:
                result = sim.run(algo)
                accuracy.setdefault(algo, []).append(100 * float(np.mean(result.accuracy)))
                save_simulation_run(saved, sim, algo)
            nodes = []
            for node in range(sim.settings.nodes):
                png = workdir / f"seed{seed}-node{node}.png"
                report = attention_report(saved, png, images=args.images, node=node)
                nodes.append(similarities(report))
                if seed == seeds[0] and node == 0 and args.grid is not None:
                    args.grid.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(png, args.grid)
                    print(f"grid {report['grid'][0]}x{report['grid'][1]} maps, written to {args.grid}")
            means = {key: float(np.mean([n[key] for n in nodes])) for key in nodes[0]}
            for key, value in means.items():
                per_seed.setdefault(key, []).append(value)
            shown = ", ".join(f"{a} {'seen' if s else 'unseen'} {v:.3f}" for (a, s), v in sorted(means.items()))
            print(f"seed {seed}: {shown}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def cell(values: list[float]) -> str:
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}"

    print(
        f"\ndigits, {args.model}, {args.optimizer} lr {args.lr}, 4 nodes, split 0-1,2-3,4-6,7-9, {args.epochs} epochs,"
    )
    print(f"{args.images} test images per node")
    print(f"(half of classes the node never saw), mean over nodes, mean ± std over seeds {args.seeds}\n")
    print("| model | test accuracy (%) | similarity to central, unseen classes | similarity to central, seen classes |")
    print("|---|---|---|---|")
    for algo, label in (("local", "Local-FT"), ("p2pft", "P2P-FT")):
        acc = f"{statistics.mean(accuracy[algo]):.1f}"
        print(f"| {label} | {acc} | {cell(per_seed[(algo, False)])} | {cell(per_seed[(algo, True)])} |")
    print(f"| central | {statistics.mean(accuracy['central']):.1f} | 1 | 1 |")
    gaps = [p - q for p, q in zip(per_seed[("p2pft", False)], per_seed[("local", False)], strict=True)]
    print(f"\nP2P-FT minus Local-FT on unseen classes, per seed: {', '.join(f'{g:+.3f}' for g in gaps)}")
    print(f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
