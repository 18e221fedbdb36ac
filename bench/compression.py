"""Accuracy and traffic of P2P-FT per codec, on the default digits run (simulator).

    .venv/bin/python bench/compression.py [--codecs none,fp16,bf16,int8,topk:0.3] [--seeds 0,1,2] [--gamma-topk 1.0]
        [--model M] [--lr LR]

Compressed exchange follows DESIGN §4: pulled values travel as increments against replicated public
copies, pushed mass as increments with error feedback. The claim checked: fp16, bf16 and int8 reach
the accuracy of the uncompressed run at a fraction of its bytes (int8 is the default codec).
The README's figures were measured on the former default model: `--model vit_digits_4px --lr 0.005`.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _model_flags import add_model_flags

from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codecs", default="none,fp16,bf16,int8,topk:0.3,topk:0.1")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; the table shows means over them")
    parser.add_argument("--gamma-topk", type=float, default=1.0, help="consensus step for top-k codecs")
    add_model_flags(parser)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    base = None
    for codec in args.codecs.split(","):
        gamma = args.gamma_topk if codec.startswith("topk") else 1.0
        means, lows, highs, sent, walls = [], [], [], [], []
        for seed in seeds:
            settings = SimulateSettings(codec=codec, gamma=gamma, seed=seed, model=args.model, lr=args.lr)
            start = time.perf_counter()
            result = Simulation(settings).run("p2pft")
            walls.append(time.perf_counter() - start)
            acc = 100 * np.array(result.accuracy)
            means.append(acc.mean())
            lows.append(acc.min())
            highs.append(acc.max())
            sent.append(float(np.mean(result.bytes_sent)))
            accs = np.round(acc, 1).tolist()
            print(f"{codec} seed {seed}: node accuracies {accs}, {sent[-1] / 1e6:.1f} MB", flush=True)
        base = np.mean(sent) if codec == "none" else base
        spread = (np.mean(means), np.std(means), min(lows), max(highs))
        rows.append((codec, gamma, *spread, np.mean(sent), np.median(walls)))
    print(f"\nseeds {seeds}")
    print(
        "| codec | gamma | mean node accuracy (%) ± std over seeds | worst node | best node | sent per node "
        "| vs none | wall (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for codec, gamma, mean, std, lo, hi, sent, wall in rows:
        ratio = f"{sent / base:.2f}" if base else "-"
        accuracy = f"{mean:.1f} ± {std:.1f} | {lo:.1f} | {hi:.1f}"
        print(f"| {codec} | {gamma} | {accuracy} | {sent / 1e6:.1f} MB | {ratio} | {wall:.0f} |")


if __name__ == "__main__":
    main()
