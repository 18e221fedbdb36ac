"""Where a slow node's late gradients cost accuracy: per-class test accuracy, simulator.

    .venv/bin/python bench/slow_node_classes.py [--factor 5] [--epochs 40] [--seeds 0,1,2] [--json PATH]
        [--model M] [--lr LR]

Runs P2P-FT on digits with the paper's split (node 3 alone holds classes 7-9) once in lockstep
(`--sync wait`: a slow node changes only the time, so this is the clean run) and once with
`--sync async --no-pace-batch --slow 3:FACTOR` (node 3's gradients come FACTOR rounds late), per seed, and prints
node 0's accuracy on the slow node's own classes and on everyone else's, where its errors fall
(another node's class taken for one of node 3's, the reverse, or a mix-up within one group), and
each node's training loss in the last epoch. Every node ends in consensus in both, so node 0
speaks for all. Its figures (docs/slow-volunteers.md) were measured on the former default model:
`--model vit_digits_4px --lr 0.005`.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from _model_flags import add_model_flags

from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation

SLOW = 3


@torch.no_grad()
def predictions(sim: Simulation, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class, true class) of every test image."""
    bank = sim.test_bank
    x, y = bank.get(torch.arange(len(bank.labels)))
    return sim.model.logits(params, x).argmax(1), y


def per_class_accuracy(predicted: torch.Tensor, y: torch.Tensor) -> dict[int, float]:
    return {int(c): float((predicted[y == c] == c).float().mean()) for c in torch.unique(y)}


def error_groups(predicted: torch.Tensor, y: torch.Tensor, slow_classes: list[int]) -> dict[str, int]:
    """Test errors by where they fall: into the slow node's classes, out of them, or within a group."""
    slow = torch.tensor(slow_classes)
    wrong, true_slow, said_slow = predicted != y, torch.isin(y, slow), torch.isin(predicted, slow)
    into = int((wrong & ~true_slow & said_slow).sum())
    out_of = int((wrong & true_slow & ~said_slow).sum())
    return {
        "other_taken_for_slow": into,
        "slow_taken_for_other": out_of,
        "within_group": int(wrong.sum()) - into - out_of,
    }


def run(sync: str, factor: float | None, epochs: int, seed: int, model: str, lr: float) -> dict:
    slow = [f"{SLOW}:{factor}"] if factor else []
    settings = SimulateSettings(epochs=epochs, slow=slow, seed=seed, sync=sync, pace_batch=False, model=model, lr=lr)
    sim = Simulation(settings.validate())
    result = sim.run("p2pft")
    slow_classes = sorted(set(int(c) for c in sim.data.train_labels[sim.parts[SLOW]]))
    predicted, y = predictions(sim, sim.nodes[0].params)
    by_class = per_class_accuracy(predicted, y)
    counts = torch.bincount(sim.test_bank.labels.long())
    mean_over = lambda cs: sum(by_class[c] * int(counts[c]) for c in cs) / sum(int(counts[c]) for c in cs)  # noqa: E731
    others = [c for c in by_class if c not in slow_classes]
    return {
        "sync": sync,
        "factor": factor,
        "seed": seed,
        "accuracy": result.accuracy,
        "slow_node_classes": slow_classes,
        "accuracy_on_slow_node_classes": mean_over(slow_classes),
        "accuracy_on_other_classes": mean_over(others),
        "per_class": by_class,
        "errors": error_groups(predicted, y, slow_classes),
        "last_epoch_loss": result.history["loss"][-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factor", type=float, default=5.0, help="how many times slower node 3 is")
    parser.add_argument("--epochs", type=int, default=40, help="passes over the data of each run")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run per seed and case")
    parser.add_argument("--json", help="also write every run here")
    add_model_flags(parser)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cases = (("wait", None), ("async", args.factor))
    runs = [run(sync, factor, args.epochs, seed, args.model, args.lr) for seed in seeds for sync, factor in cases]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    print(f"P2P-FT, digits, paper split, {args.epochs} epochs; node 3 holds classes {runs[0]['slow_node_classes']}")
    print("| case | seed | every class (%) | node 3's classes (%) | the other classes (%) "
          "| errors: other as node 3's / node 3's as other / within | last epoch's loss, nodes 0-3 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        case = "clean (`wait`)" if r["factor"] is None else f"`async`, node 3 {r['factor']:g}x"
        loss = " / ".join(f"{x:.3f}" for x in r["last_epoch_loss"])
        errors = " / ".join(str(n) for n in r["errors"].values())
        print(f"| {case} | {r['seed']} | {100 * r['accuracy'][0]:.1f} | {100 * r['accuracy_on_slow_node_classes']:.1f} "
              f"| {100 * r['accuracy_on_other_classes']:.1f} "
              f"| {errors} | {loss} |")  # fmt: skip
    for factor in (None, args.factor):
        chosen = [r for r in runs if r["factor"] == factor]
        slow_mean = statistics.mean(r["accuracy_on_slow_node_classes"] for r in chosen)
        other_mean = statistics.mean(r["accuracy_on_other_classes"] for r in chosen)
        print(f"mean over seeds, factor {factor}: node 3's classes {100 * slow_mean:.1f}, "
              f"others {100 * other_mean:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
