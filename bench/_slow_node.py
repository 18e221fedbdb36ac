"""Shared by the simulator benches that give node 3 a slow objective of their own."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor

import p2pnode.node.simulator as simulator
from p2pnode.node.algorithms.base import Objective


@contextlib.contextmanager
def slow_node_as(make: Callable[[Objective, float, bool], Objective]) -> Iterator[None]:
    """Let the simulator build its slow nodes' objectives with `make` while the block runs."""
    original = simulator.slow_objective
    simulator.slow_objective = make
    try:
        yield
    finally:
        simulator.slow_objective = original


def run_factor_cases(
    description: str, default_cases: str, second_name: str, run: Callable[[tuple[float, int, int, int]], dict]
) -> tuple[list[tuple[float, int]], list[dict]]:
    """Parse `--cases FACTOR:N,... --seeds --epochs --json`, run `run((factor, n, seed, epochs))` for every
    case and seed in two processes, write the runs to `--json` if given; the (factor, n) pairs and the runs."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cases", default=default_cases, help=f"FACTOR:{second_name}, comma-separated")
    parser.add_argument("--seeds", default="0,1,2", help="simulator seeds (mini-batches drawn)")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--json", help="also write every run here")
    args = parser.parse_args()
    pairs = [(float(c.split(":")[0]), int(c.split(":")[1])) for c in args.cases.split(",") if c]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    return pairs, run_in_pairs(run, [(f, n, seed, args.epochs) for f, n in pairs for seed in seeds], args.json)


def run_in_pairs(run: Callable, cases: list, json_path: str | None) -> list[dict]:
    """`run(case)` for every case, two processes at a time; the runs, also written to `json_path` if given."""
    with ProcessPoolExecutor(2) as pool:
        runs = list(pool.map(run, cases))
    if json_path:
        with open(json_path, "w") as out:
            json.dump(runs, out, indent=1)
    return runs


def paced_node_accuracy(make: Callable[[Objective], Objective], factor: float, seed: int, epochs: int) -> list[float]:
    """Each node's accuracy after a P2P-FT `simulate --sync async --slow 3:FACTOR` run (one torch thread)
    whose node 3 is paced (`--pace-batch`) and then wrapped by `make`."""
    import torch

    from p2pnode.node.pace import slow_objective
    from p2pnode.node.settings import SimulateSettings

    torch.set_num_threads(1)

    def paced(objective: Objective, factor_: float, pace_batch: bool) -> Objective:
        return make(slow_objective(objective, factor_, pace_batch=True))

    settings = SimulateSettings(epochs=epochs, seed=seed, sync="async", slow=[f"3:{factor:g}"])
    with slow_node_as(paced):
        return simulator.Simulation(settings.validate()).run("p2pft").accuracy


def print_case_table(pairs: list[tuple[float, int]], runs: list[dict], name: str, header: str) -> None:
    """A markdown row per (factor, runs[name]) case: each seed's mean accuracy and their mean."""
    print(f"| slow node | {header} | seeds (%) | mean |")
    print("|---|---|---|---|")
    for f, n in pairs:
        acc = [100 * statistics.mean(r["accuracy"]) for r in runs if r["factor"] == f and r[name] == n]
        print(f"| {f:g}x | {n} | {' / '.join(f'{a:.1f}' for a in acc)} | {statistics.mean(acc):.1f} |")


def _wrapped_case(make: Callable[[Objective, int], Objective], name: str, case: tuple[float, int, int, int]) -> dict:
    factor, n, seed, epochs = case
    accuracy = paced_node_accuracy(lambda objective: make(objective, n), factor, seed, epochs)
    return {"factor": factor, name: n, "seed": seed, "accuracy": accuracy}


def compare_paced_wrappers(
    description: str, default_cases: str, make: Callable[[Objective, int], Objective], name: str, header: str
) -> None:
    """The command line of a bench whose case FACTOR:N wraps the paced node 3's objective in `make(objective, N)`
    (a module-level callable: the cases run in worker processes): every case and seed, then the table."""
    run = functools.partial(_wrapped_case, make, name)
    pairs, runs = run_factor_cases(description, default_cases, name.upper(), run)
    print_case_table(pairs, runs, name, header)
