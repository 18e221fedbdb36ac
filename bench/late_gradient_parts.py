"""What a slow node's late gradients cost is made of: lateness, reuse, or both (simulator).

    .venv/bin/python bench/late_gradient_parts.py [--factor 5] [--epochs 40] [--seeds 0,1,2] [--cases LIST]
        [--json PATH] [--model M] [--lr LR]

`simulate --sync async --slow 3:FACTOR` gives node 3 one gradient per FACTOR rounds, taken at the
parameters of FACTOR rounds before and reused until the next one arrives: it is both late and
reused. Each case below keeps one of the two (P2P-FT, digits, the paper's split, 40 epochs):

- `clean`: no slow node (lockstep; a slow node would change only the time);
- `late`: what `--slow 3:FACTOR` does;
- `delayed`: node 3 takes a gradient on a new mini-batch every round, at the parameters of FACTOR
  rounds before (late, never reused);
- `reused`: node 3 takes one gradient per FACTOR rounds at the parameters of that round and reuses
  it until the next (reused, 0 to FACTOR-1 rounds old);
- `paced`: `--pace-batch`, a fresh gradient every round on a batch FACTOR times smaller;
- `matched`: every node's gradient is FACTOR rounds late (node 3 as in `delayed`);
- `plain-clean`, `plain-late`: `clean` and `late` with plain SGD (`--momentum 0 --lr 0.05`);
- `adam-clean`, `adam-late`: `clean` and `late` with `--optimizer adam --lr 0.001`.

The `delayed`, `reused` and `matched` objectives exist only here: the simulator's own slow node is
swapped for them while a case runs. Its figures (docs/slow-volunteers.md) were measured on the former default model:
`--model vit_digits_4px --lr 0.005`.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
from collections.abc import Callable

import torch
from _model_flags import add_model_flags
from _slow_node import slow_node_as

import p2pnode.node.simulator as simulator
from p2pnode.node.algorithms.base import Objective
from p2pnode.node.pace import ObjectiveWrapper
from p2pnode.node.settings import SimulateSettings

SLOW = 3
NODES = 4
CASES = ("clean", "late", "delayed", "reused", "paced", "matched")
CASES += ("plain-clean", "plain-late", "adam-clean", "adam-late")
STEPS = {"plain": {"momentum": 0.0, "lr": 0.05}, "adam": {"optimizer": "adam", "lr": 0.001}}  # else --lr


class DelayedGradients(ObjectiveWrapper):
    """A gradient on a new mini-batch every round, at the parameters of `delay` rounds before."""

    def __init__(self, objective: Objective, delay: int) -> None:
        super().__init__(objective)
        self.history: collections.deque[torch.Tensor] = collections.deque(maxlen=delay + 1)

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        self.history.append(params.clone())
        self.gradients += 1
        return self.objective.gradient(self.history[0])


class ReusedGradients(ObjectiveWrapper):
    """One gradient per `every` rounds at that round's parameters, reused until the next."""

    def __init__(self, objective: Objective, every: int) -> None:
        super().__init__(objective)
        self.every, self.rounds = every, 0
        self.latest: tuple[torch.Tensor, float] | None = None

    def gradient(self, params: torch.Tensor) -> tuple[torch.Tensor, float]:
        self.fresh = self.rounds % self.every == 0
        if self.fresh:
            self.latest = self.objective.gradient(params)
            self.gradients += 1
        self.rounds += 1
        assert self.latest is not None
        return self.latest


def run_case(case: str, factor: int, epochs: int, seed: int, model: str, lr: float) -> list[float]:
    step, _, case = case.rpartition("-")
    slow, pace_batch = [f"{SLOW}:{factor}"], False
    make: Callable[[Objective, float, bool], Objective] = simulator.slow_objective
    if case == "clean":
        slow = []
    elif case == "paced":
        pace_batch = True
    elif case == "delayed":
        make = lambda objective, f, _: DelayedGradients(objective, int(f))  # noqa: E731
    elif case == "reused":
        make = lambda objective, f, _: ReusedGradients(objective, int(f))  # noqa: E731
    elif case == "matched":  # the fast nodes are named slow with factor 1: late by `factor`, not slower
        slow = [f"{i}:1" for i in range(NODES) if i != SLOW] + slow
        make = lambda objective, f, _: DelayedGradients(objective, factor)  # noqa: E731
    steps = {"lr": lr} | STEPS.get(step, {})  # the plain and adam rows keep their own lr
    settings = SimulateSettings(
        epochs=epochs, slow=slow, seed=seed, sync="async", pace_batch=pace_batch, model=model, **steps
    )
    with slow_node_as(make):
        return simulator.Simulation(settings.validate()).run("p2pft").accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factor", type=int, default=5, help="how many rounds node 3's gradient takes")
    parser.add_argument("--epochs", type=int, default=40, help="passes over the data of each run")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run per seed and case")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--json", help="also write every run here")
    add_model_flags(parser)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cases = args.cases.split(",")
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}: use {', '.join(CASES)}")
    runs = [
        {"case": c, "seed": s, "accuracy": run_case(c, args.factor, args.epochs, s, args.model, args.lr)}
        for c in cases
        for s in seeds
    ]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"factor": args.factor, "epochs": args.epochs, "runs": runs}, f, indent=1)
    print(f"P2P-FT, digits, paper split, {args.epochs} epochs, node 3's gradient takes {args.factor} rounds")
    print("| case | " + " | ".join(f"seed {s} (%)" for s in seeds) + " | mean (%) | nodes agree |")
    print("|---|" + "---|" * (len(seeds) + 2))
    for case in cases:
        accs = [r["accuracy"] for r in runs if r["case"] == case]
        agree = all(max(a) - min(a) < 1e-9 for a in accs)
        cells = " | ".join(f"{100 * a[0]:.1f}" for a in accs)
        print(f"| {case} | {cells} | {100 * statistics.mean(a[0] for a in accs):.1f} | {'yes' if agree else 'no'} |")


if __name__ == "__main__":
    main()
