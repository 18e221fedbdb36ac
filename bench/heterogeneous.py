"""One slow volunteer: `--sync wait` against `--sync async`, in the daemon testnet and the simulator.

    .venv/bin/python bench/heterogeneous.py [--factors 2,5,10] [--repeats 3] [--epochs 10] [--hosts loopback]
        [--base-slowdown 1] [--sim-epochs 40] [--sim-seeds 0] [--syncs wait,async,async-paced]
        [--clean-syncs wait[,async]] [--seeds 0] [--topology T] [--json PATH] [--model M] [--lr LR]

Testnet (4 daemons, the paper's split, node 3 made FACTOR times slower with `--slow 3:FACTOR`: its
gradients of the full batch sleep FACTOR - 1 times their own duration, smaller ones with
`--pace-batch` their share of that): the fast nodes' seconds per round (median
over nodes 0-2, the median repeat) against the run without a slow node, and every node's final
accuracy (of the median repeat by time). Seconds per round are a round's own time (`round_seconds`:
with `wait` the evaluation after each pass runs between rounds, outside it; with `async` beside the
rounds, inside their time) and the wall time (`seconds`, from the first round to result.json,
evaluations and the run's end included in both) over the rounds, the median of the repeats: the
like-for-like one. The repeats run repeat-major (every case's first run, then every case's second),
so a spell in which the machine runs slower falls on every row alike. Simulator (`simulate --sync
async --slow 3:FACTOR`, deterministic, `--sim-epochs` passes, mean over `--sim-seeds`): each node's
accuracy. With `async` the slow node keeps its batch and gets one gradient per FACTOR rounds, each
computed at the parameters of FACTOR rounds before (`--no-pace-batch`); `async-paced` is
`--pace-batch`, the default of `--sync async` (its batch shrinks to fit a round: 16 // FACTOR
samples in the simulator). `--hosts netns` puts
every daemon on its own namespaced host (root). `--base-slowdown B` makes every node's gradient B
times as long (node 3's B x FACTOR): a heavier model's step, where the default one is a few ms of a
round that the exchange dominates. `--seeds 0,1,2` runs repeat i of every case with the
(i mod 3)-th seed (`--seed`: the mini-batches drawn; the initialisation stays `--model-seed 0`),
the same seeds for every case, so each row compares with the clean row seed by seed.
The README's summary ran the current defaults; of the tables in docs/slow-volunteers.md, the oldest
ran the former default model (`--model vit_digits_4px --lr 0.005`), as each says.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _model_flags import add_model_flags

from p2pnode.node.settings import SimulateSettings, TestnetSettings
from p2pnode.node.simulator import Simulation
from p2pnode.node.testnet import run_testnet

SLOW = 3


def pace(sync: str) -> dict:
    """`async-paced` is `--sync async --pace-batch` (the default of `--sync async`); `async` is `--sync async
    --no-pace-batch`, late gradients."""
    return {"sync": "async" if sync.startswith("async") else sync, "pace_batch": sync == "async-paced"}


def fast_median(per_node: list[float]) -> float:
    """The median over the nodes other than the slow one."""
    return statistics.median(per_node[:SLOW] + per_node[SLOW + 1 :])


def testnet_run(sync: str, factor: float | None, epochs: int, hosts: str, base: float, seed: int, extra: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="p2pnode-hetero-") as workdir:
        slowdown = {i: base for i in range(4) if base > 1} | ({SLOW: base * factor} if factor else {})
        slow = [f"{i}:{f}" for i, f in sorted(slowdown.items())]
        settings = TestnetSettings(
            workdir=workdir,
            run_id="hetero",
            epochs=epochs,
            slow=slow,
            hosts=hosts,
            seed=seed,
            timeout=900,
            **pace(sync),
            **extra,
        ).validate()
        run_testnet(settings)
        nodes = [json.loads(p.read_text()) for p in sorted(Path(workdir).glob("node*/result.json"))]
    per_round = [n["round_seconds"] / n["rounds"] for n in nodes]
    wall = [n["seconds"] / n["rounds"] for n in nodes]
    return {
        "fast_seconds_per_round": fast_median(per_round),
        "fast_wall_seconds_per_round": fast_median(wall),
        "slow_seconds_per_round": per_round[SLOW],
        "accuracy": [n["accuracy"] for n in nodes],
        "training_seconds": max(n["seconds"] for n in nodes),
    }


def median_run(runs: list[dict]) -> dict:
    """The repeat with the median pace, with every repeat's pace and mean accuracy over the nodes
    (asynchronous runs are not deterministic: their accuracy varies from run to run)."""
    ordered = sorted(runs, key=lambda r: r["fast_seconds_per_round"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["fast_seconds_per_round_all"] = [r["fast_seconds_per_round"] for r in runs]
    chosen["fast_wall_seconds_per_round_all"] = [r["fast_wall_seconds_per_round"] for r in runs]
    chosen["median_fast_wall_seconds_per_round"] = statistics.median(chosen["fast_wall_seconds_per_round_all"])
    chosen["accuracy_all"] = [statistics.mean(r["accuracy"]) for r in runs]
    chosen["median_accuracy"] = statistics.median(chosen["accuracy_all"])
    return chosen


def simulated(sync: str, factor: float | None, epochs: int, seeds: list[int], shared: dict) -> list[float]:
    """Each node's accuracy, mean over `seeds` (`shared`: the model and lr)."""
    slow = [f"{SLOW}:{factor}"] if factor else []
    runs = [
        Simulation(SimulateSettings(epochs=epochs, slow=slow, seed=seed, **shared, **pace(sync)).validate()).run(
            "p2pft"
        )
        for seed in seeds
    ]
    return [statistics.mean(r.accuracy[i] for r in runs) for i in range(len(runs[0].accuracy))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factors", default="2,5,10", help="how many times slower node 3 is, one case each")
    parser.add_argument("--repeats", type=int, default=3, help="testnet runs per case (the median by pace is shown)")
    parser.add_argument("--epochs", type=int, default=10, help="passes over the data of each testnet run")
    parser.add_argument("--sim-epochs", type=int, default=40, help="passes of each simulator run (0: no simulator)")
    parser.add_argument("--hosts", default="loopback", choices=["loopback", "netns"], help="where the daemons run")
    parser.add_argument("--rate", default=None, help="with --hosts netns: every host's upload rate")
    parser.add_argument("--base-slowdown", type=float, default=1.0, help="every gradient B times as long")
    parser.add_argument("--sim-seeds", default="0", help="simulator seeds (comma-separated; the mean is shown)")
    parser.add_argument("--seeds", default="0", help="testnet seeds, repeat i uses the i-th (cyclically)")
    parser.add_argument("--syncs", default="wait,async,async-paced", help="wait, async, async-paced: with a slow node")
    parser.add_argument("--clean-syncs", default="wait", help="runs without a slow node (the first is the baseline)")
    parser.add_argument("--topology", default=None, help="every run's --topology (default: the run default)")
    parser.add_argument("--json", default=None, help="also write every row here")
    add_model_flags(parser)
    args = parser.parse_args()
    shared = {"model": args.model, "lr": args.lr} | ({"topology": args.topology} if args.topology else {})
    extra = shared | ({"rate": args.rate} if args.rate else {})
    factors = [float(f) for f in args.factors.split(",")]
    seeds = [int(x) for x in args.sim_seeds.split(",")]
    testnet_seeds = [int(x) for x in args.seeds.split(",")]
    clean = [(sync, None) for sync in args.clean_syncs.split(",")]
    cases = clean + [(sync, f) for f in factors for sync in args.syncs.split(",")]
    # repeat-major: every case's i-th run comes before any case's (i+1)-th, so a machine that slows
    # down for a few minutes slows every row alike instead of one row's three runs
    runs: dict[tuple[str, float | None], list[dict]] = {case: [] for case in cases}
    for i in range(args.repeats):
        for sync, factor in cases:
            seed = testnet_seeds[i % len(testnet_seeds)]
            run = testnet_run(sync, factor, args.epochs, args.hosts, args.base_slowdown, seed, extra)
            runs[sync, factor].append(run)
            print(json.dumps({"sync": sync, "factor": factor, "repeat": i, **run}), flush=True)
    rows: list[dict] = []
    for sync, factor in cases:
        row = {"sync": sync, "factor": factor, **median_run(runs[sync, factor])}
        if args.sim_epochs and (sync != "wait" or not rows):
            row["simulated_accuracy"] = simulated(sync, factor, args.sim_epochs, seeds, shared)
        elif args.sim_epochs:  # in lockstep a slow node changes the time, not the arithmetic
            row["simulated_accuracy"] = rows[0]["simulated_accuracy"]
        rows.append(row)
    base = rows[0]["fast_seconds_per_round"]
    wall_base = rows[0]["median_fast_wall_seconds_per_round"]
    topology = args.topology or TestnetSettings.topology
    print(f"\n{args.hosts}, {topology}, {args.epochs} epochs, base slowdown {args.base_slowdown:g}, ", end="")
    print(f"medians of {args.repeats};")
    print(f"simulator: {args.sim_epochs} epochs, mean over seeds {args.sim_seeds}")
    print("| slow node | sync | fast nodes' s/round | vs no slow node | wall s/round | vs no slow node | "
          "testnet accuracy (nodes 0-3) | every repeat (mean of nodes) | simulator |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        acc = ", ".join(f"{100 * a:.1f}" for a in r["accuracy"])
        repeats = ", ".join(f"{100 * a:.1f}" for a in r["accuracy_all"])
        sim = ", ".join(f"{100 * a:.1f}" for a in r.get("simulated_accuracy", []))
        name = f"{r['factor']:g}x" if r["factor"] else "none"
        pace = f"{r['fast_seconds_per_round']:.4f} | {r['fast_seconds_per_round'] / base:.2f}x"
        wall = r["median_fast_wall_seconds_per_round"]
        pace += f" | {wall:.4f} | {wall / wall_base:.2f}x"
        print(f"| {name} | {r['sync']} | {pace} | {acc} | {repeats} | {sim} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
