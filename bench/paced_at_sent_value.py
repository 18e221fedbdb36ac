"""A paced node's gradient at the value it sends, before mixing, against at its mixed parameters (simulator).

    .venv/bin/python bench/paced_at_sent_value.py [--cases mixed:1,sent:1,sent:2,sent:3,mixed:3]
        [--seeds 0,1,2] [--json PATH]

Case WHERE:B: node 3 of the paper's split is `simulate --sync async --slow 3:10` with a fresh gradient of
B samples every round, taken at its mixed parameters (`mixed`, what the simulator does) or at the value it
sent in the pull phase (`sent`, what a paced daemon does since it starts its gradient there: node/pace.py,
`BackgroundGradients.start`). The daemons' 10x node paced to 1 sample after mixing, and to about 3 with the
head start that computing at the sent value gives it; this says what the point of evaluation costs apart
from the batch. 40 epochs, one torch thread per run, two runs at a time.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _slow_node import run_in_pairs, slow_node_as

import p2pnode.node.simulator as simulator
from p2pnode.node.algorithms.base import Objective
from p2pnode.node.pace import ObjectiveWrapper, unwrapped
from p2pnode.node.settings import SimulateSettings

FACTOR = 10


class AtSentValue(ObjectiveWrapper):
    """P2P-FT calls `start(v)` when it sends v; the round's gradient is then taken at v."""

    def __init__(self, objective: Objective) -> None:
        super().__init__(objective)
        self.sent: torch.Tensor | None = None

    def start(self, params: torch.Tensor) -> None:
        self.sent = params.clone()

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        at, self.sent = (params if self.sent is None else self.sent), None
        return self.objective.gradient(at)


def run(case: tuple[str, int, int, int]) -> dict:
    where, batch, seed, epochs = case
    torch.set_num_threads(1)

    def slow(objective: Objective, factor: float, pace_batch: bool) -> Objective:
        unwrapped(objective).batch_size = batch
        return AtSentValue(objective) if where == "sent" else objective

    settings = SimulateSettings(epochs=epochs, seed=seed, sync="async", slow=[f"3:{FACTOR}"])
    with slow_node_as(slow):
        accuracy = simulator.Simulation(settings.validate()).run("p2pft").accuracy
    return {"where": where, "batch": batch, "seed": seed, "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="mixed:1,sent:1,sent:2,sent:3,mixed:3", help="WHERE:BATCH, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="simulator seeds (mini-batches drawn)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--json", help="also write every run here")
    args = parser.parse_args()
    cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",") if c]
    if any(where not in ("mixed", "sent") for where, _ in cases):
        parser.error("WHERE is mixed or sent")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs = run_in_pairs(run, [(w, b, s, args.epochs) for w, b in cases for s in seeds], args.json)
    print(f"| node 3 ({FACTOR}x) | gradient at | batch | seeds (%) | mean |")
    print("|---|---|---|---|---|")
    for where, batch in cases:
        acc = [100 * statistics.mean(r["accuracy"]) for r in runs if r["where"] == where and r["batch"] == batch]
        print(f"| {FACTOR}x | {where} | {batch} | {' / '.join(f'{a:.1f}' for a in acc)} | {statistics.mean(acc):.1f} |")


if __name__ == "__main__":
    main()
