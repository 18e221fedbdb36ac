"""A slow node's compute spent on fresh small batches or on larger late ones (simulator, P2P-FT).

    .venv/bin/python bench/paced_or_late.py [--cases 5:3,5:6,10:1,10:2,10:3] [--seeds 0,1,2] [--json PATH]

Case FACTOR:B: node 3 of the paper's split is FACTOR times slower per sample and computes gradients
of B samples, each taking FACTOR * B / 16 of the others' rounds: B = 16 // FACTOR is what
`--pace-batch` does (a fresh gradient every round), a larger B buys more samples per gradient at the
price of gradients that come late and are reused until the next (as `--no-pace-batch` does with
B = 16). Every run is `simulate --sync async --slow 3:FACTOR` with that batch, 40 epochs, one torch
thread per run (the thread count alone moves a run's last digit: docs/slow-volunteers.md, "A slow node's batch").
"""

from __future__ import annotations

import statistics

import torch
from _slow_node import run_factor_cases, slow_node_as

from p2pnode.node import simulator
from p2pnode.node.algorithms.base import Objective
from p2pnode.node.pace import StaleGradients
from p2pnode.node.settings import SimulateSettings

FULL_BATCH = 16  # --batch-size


def run(case: tuple[float, int, int, int]) -> dict:
    factor, batch, seed, epochs = case
    torch.set_num_threads(1)

    def slowed(objective: Objective, factor_: float, pace_batch: bool) -> Objective:
        objective.batch_size = batch
        rounds = factor_ * batch / FULL_BATCH
        return StaleGradients(objective, rounds) if rounds > 1 else objective

    settings = SimulateSettings(
        epochs=epochs, seed=seed, sync="async", slow=[f"3:{factor:g}"], batch_size=FULL_BATCH, pace_batch=False
    )
    with slow_node_as(slowed):
        result = simulator.Simulation(settings.validate()).run("p2pft")
    return {"factor": factor, "batch": batch, "seed": seed, "accuracy": result.accuracy, "samples": result.samples}


def main() -> None:
    pairs, runs = run_factor_cases(__doc__.splitlines()[0], "5:3,5:6,10:1,10:2,10:3", "BATCH", run)
    print("| slow node | batch | a gradient per (rounds) | node 3's samples | seeds (%) | mean |")
    print("|---|---|---|---|---|---|")
    for f, b in pairs:
        mine = [r for r in runs if r["factor"] == f and r["batch"] == b]
        acc = [100 * statistics.mean(r["accuracy"]) for r in mine]
        per = max(1.0, f * b / FULL_BATCH)
        print(
            f"| {f:g}x | {b} | {per:.3g} | {mine[0]['samples'][3]} | {' / '.join(f'{a:.1f}' for a in acc)} | "
            f"{statistics.mean(acc):.1f} |"
        )


if __name__ == "__main__":
    main()
