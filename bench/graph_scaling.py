"""How many volunteers each graph carries: P2P-FT's final accuracy against the node count, simulator.

    .venv/bin/python bench/graph_scaling.py [--nodes 3,4,5,6,8,12,16] [--seeds 0]
        [--topologies directed-ring,exponential,one-peer-exponential,ring] [--jobs 2] [--json PATH]

Each case is one `p2pnode simulate` process (`OMP_NUM_THREADS=1`, the defaults otherwise: vit_digits,
lr 0.01 cosine, momentum 0.9, batch 16, 40 epochs), `--jobs` at a time. Up to 8 nodes the split gives
each node whole classes (SPLITS); past 10 nodes, where ten classes cannot go round, `iid`.

Beside the measured accuracy it prints what a linear model predicts: the largest curvature h for
which the disagreement between nodes does not grow, for P2P-FT's heavy ball on the tracker
(m = beta m + tau, theta = A(theta - alpha m), tau = B(tau + g' - g)) with every node's Hessian h I.
Each graph here is circulant, so the disagreement splits into the Fourier modes of the cycle and each
mode is a 3x3 linear system per round (theta, m, tau); a one-peer graph's rounds are multiplied over
its period. The ring's bound falls fast with n (its second eigenvalue is cos(pi / n) in modulus);
where a model's sharp directions exceed the bound, the run diverges in them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from p2pnode.node.topology import make_topology

SPLITS = {
    3: "0-3,4-6,7-9",
    4: "0-1,2-3,4-6,7-9",
    5: "0-1,2-3,4-5,6-7,8-9",
    6: "0-1,2-3,4,5,6-7,8-9",
    8: "0-1,2,3,4,5,6,7,8-9",
}
LR, MOMENTUM = 0.01, 0.9  # the defaults of `p2pnode simulate`


def split_for(n: int) -> str:
    if n in SPLITS:
        return SPLITS[n]
    if n > 10:
        return "iid"
    raise SystemExit(f"no class split for {n} nodes: use one of {sorted(SPLITS)} or more than 10")


def round_matrix(lam: complex, alpha: float, h: float, beta: float) -> np.ndarray:
    """One round of one disagreement mode, state (theta, m, tau), mixing eigenvalue lam."""
    m_row = np.array([0, beta, 1], complex)
    theta_row = lam * (np.array([1, 0, 0], complex) - alpha * m_row)
    tau_row = lam * np.array([0, 0, 1], complex) + lam * h * (theta_row - np.array([1, 0, 0]))
    return np.vstack([theta_row, m_row, tau_row])


def round_shifts(topology: str, n: int) -> list[list[int]] | None:
    """Each round's shifts s (node i hears i - s), one list per round of the graph's period; None if the
    graph is not circulant (its nodes' links differ by more than a relabelling)."""
    topo = make_topology(topology, n)
    if topo.hops:
        return [[hop] for hop in topo.hops]
    shifts = sorted(d % n for d in topo.out_neighbours(0))
    if any(sorted((d - i) % n for d in topo.out_neighbours(i)) != shifts for i in range(n)):
        return None
    return [shifts]


def growth_per_round(rounds: list[list[int]], n: int, h: float, alpha: float = LR, beta: float = MOMENTUM) -> float:
    """Largest modulus of the disagreement's growth per round, over the graph's modes (`round_shifts`)."""
    worst = 0.0
    for f in range(1, n):
        product = np.eye(3, dtype=complex)
        for shifts in rounds:
            # weight 1 / (in-degree + 1) on each in-neighbour and on itself
            lam = (1 + sum(np.exp(-2j * math.pi * f * s / n) for s in shifts)) / (len(shifts) + 1)
            product = round_matrix(lam, alpha, h, beta) @ product
        worst = max(worst, max(abs(np.linalg.eigvals(product))) ** (1 / len(rounds)))
    return worst


def largest_stable_curvature(topology: str, n: int) -> float | None:
    """The largest h (on a log grid, 0.1 to 10^4) whose disagreement does not grow; None if not circulant."""
    rounds = round_shifts(topology, n)
    if rounds is None:
        return None
    stable = 0.0
    for h in np.logspace(-1, 4, 201):
        if growth_per_round(rounds, n, float(h)) >= 1:
            break
        stable = float(h)
    return stable


def simulate(topology: str, n: int, seed: int, out: Path) -> dict:
    path = out / f"{topology}_{n}_{seed}.json"
    command = [
        str(Path(sys.executable).parent / "p2pnode"),
        "simulate",
        *("--nodes", str(n), "--split", split_for(n), "--topology", topology, "--seed", str(seed)),
        *("--json", str(path)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads(path.read_text())["results"]["p2pft"]
    curve = [100 * statistics.mean(acc) for acc in result["history"]["accuracy"]]
    return {
        "topology": topology,
        "nodes": n,
        "seed": seed,
        "split": split_for(n),
        "accuracy": curve[-1],
        "after_5_epochs": curve[4],
        "curve": curve,
        "mb_per_node": statistics.mean(result["bytes_sent"]) / 1e6,
        "command": " ".join(["OMP_NUM_THREADS=1 p2pnode", *command[1:-2]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", default="3,4,5,6,8,12,16")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--topologies", default="directed-ring,exponential,one-peer-exponential,ring")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--json", help="write every run and the linear model's bounds here")
    args = parser.parse_args()
    sizes = [int(x) for x in args.nodes.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    topologies = args.topologies.split(",")
    cases = [(t, n, s) for t in topologies for n in sizes for s in seeds]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
        runs = list(pool.map(lambda c: simulate(*c, Path(tmp)), cases))
    bounds = {f"{t}_{n}": largest_stable_curvature(t, n) for t in topologies for n in sizes}
    print("final accuracy, mean over nodes (%); per seed when several; [linear model: largest stable curvature]")
    print("| graph | " + " | ".join(f"{n} nodes" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for t in topologies:
        cells = []
        for n in sizes:
            accs = [r["accuracy"] for r in runs if r["topology"] == t and r["nodes"] == n]
            bound = bounds[f"{t}_{n}"]
            shown = " / ".join(f"{a:.1f}" for a in accs)
            cells.append(f"{shown} [{bound:.0f}]" if bound is not None else shown)
        print(f"| `{t}` | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "largest_stable_curvature": bounds}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
