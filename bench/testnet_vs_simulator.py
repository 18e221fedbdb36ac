"""Wall time of the same run in the daemon testnet and in the simulator.

    .venv/bin/python bench/testnet_vs_simulator.py [--epochs N] [--batch-size B] [--nodes N] [--split S] [--codec C]
        [--model M] [--lr LR]

Runs `p2pnode simulate --algorithm p2pft` and `p2pnode testnet` with the same settings (default: the
built-in 4-node digits job), and prints both wall times, their ratio, and the agreement of the
per-node accuracies. The testnet figure is reported twice: the whole command (process start-up,
model build, DHT join included) and the training part alone (first round to last, the longest node).
Target in the issue: the testnet at most 1.3x the simulator. All processes share this machine's cores.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from p2pnode.node.settings import SimulateSettings, TestnetSettings
from p2pnode.node.simulator import Simulation
from p2pnode.node.testnet import run_testnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--split")
    parser.add_argument("--topology")
    parser.add_argument("--codec")
    parser.add_argument("--model")
    parser.add_argument("--trainable-blocks", type=int)
    parser.add_argument("--lr", type=float)
    args = parser.parse_args()
    shared = {k: v for k, v in vars(args).items() if v is not None}
    overrides = dict(shared)

    start = time.perf_counter()
    sim = Simulation(SimulateSettings(**shared))
    setup = time.perf_counter() - start
    reference = sim.run("p2pft")
    sim_wall = time.perf_counter() - start

    start = time.perf_counter()
    result = run_testnet(TestnetSettings(**overrides).validate())
    net_wall = time.perf_counter() - start
    daemons = result.results["p2pft"]

    gap = 100 * np.max(np.abs(np.array(daemons.accuracy) - np.array(reference.accuracy)))
    print(f"rounds: {reference.iterations} (simulator) / {daemons.iterations} (testnet)")
    print("| run | wall (s) | training only (s) | ratio to simulator (wall / training) |")
    print("|---|---|---|---|")
    print(f"| simulate | {sim_wall:.1f} | {reference.seconds:.1f} (setup {setup:.1f}) | 1.00 / 1.00 |")
    print(
        f"| testnet | {net_wall:.1f} | {daemons.seconds:.1f} | {net_wall / sim_wall:.2f} / "
        f"{daemons.seconds / reference.seconds:.2f} |"
    )
    print(f"per-node accuracy, simulator: {np.round(100 * np.array(reference.accuracy), 1).tolist()}")
    print(f"per-node accuracy, testnet:   {np.round(100 * np.array(daemons.accuracy), 1).tolist()}")
    print(f"largest per-node difference: {gap:.2f} points (issue target: at most 0.5)")


if __name__ == "__main__":
    main()
