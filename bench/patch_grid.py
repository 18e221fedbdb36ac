"""How the default digits model got its 4x4 attention map: what each 4x4 variant costs P2P-FT against central.

    .venv/bin/python bench/patch_grid.py [--seed 0] [--json PATH] [--runs "overlap;overlap, lr 0.02"]

The former default `vit_digits_4px` cuts an 8x8 digit into four 4-pixel patches (a 2x2 map). Each
variant below gives a 4x4 map (16 patch tokens) and runs the digits settings (simulator, 4 nodes, the
paper's split, directed ring, SGD momentum 0.9, batch 16, 40 epochs) at the former default lr 0.005
unless it says otherwise; P2P-FT's mean over the nodes against central fine-tuning. The default
`vit_digits` is `5px, sin-cos` (its own random draw), at lr 0.01. Variants:
- `p2`: 2-pixel patches (`vit_digits_p2` without its sin-cos position embedding);
- `overlap`: 4-pixel patches at stride 2 (a 4x4 convolution, stride 2, padding 1), so each token
  sees as many pixels as the default's;
- `overlap-avg`: the same, its head reading the mean of the patch tokens (no class-token readout);
- `5px`: 5-pixel patches at stride 1 (no padding), each token sees 25 of the 64 pixels;
- `6px`: 6-pixel patches at stride 2 (padding 2), each token sees up to 36 pixels;
- `5px, sin-cos` and `6px, sin-cos`: the same with `vit_digits_p2`'s fixed 2-D sin-cos position
  embedding in place of the random one.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from timm.models import register_model
from torch import nn

from p2pnode.node.models import vit_digits_4px, vit_digits_p2
from p2pnode.node.settings import SimulateSettings
from p2pnode.node.simulator import Simulation


def _overlapping(model, kernel: int = 4, stride: int = 2, padding: int = 1):
    """Patches of `kernel` pixels at `stride` (each of these keeps the 4x4 grid of 2-pixel patches)."""
    model.patch_embed.proj = nn.Conv2d(1, model.embed_dim, kernel_size=kernel, stride=stride, padding=padding)
    return model


@register_model
def bench_vit_digits_p2_plain(pretrained: bool = False, **kwargs):
    return vit_digits_4px(pretrained, **{"patch_size": 2, **kwargs})


@register_model
def bench_vit_digits_overlap(pretrained: bool = False, **kwargs):
    return _overlapping(vit_digits_4px(pretrained, **{"patch_size": 2, **kwargs}))


@register_model
def bench_vit_digits_overlap_avg(pretrained: bool = False, **kwargs):
    return _overlapping(vit_digits_4px(pretrained, **{"patch_size": 2, "global_pool": "avg", **kwargs}))


@register_model
def bench_vit_digits_5px(pretrained: bool = False, **kwargs):
    return _overlapping(vit_digits_4px(pretrained, **{"patch_size": 2, **kwargs}), kernel=5, stride=1, padding=0)


@register_model
def bench_vit_digits_6px(pretrained: bool = False, **kwargs):
    return _overlapping(vit_digits_4px(pretrained, **{"patch_size": 2, **kwargs}), kernel=6, stride=2, padding=2)


@register_model
def bench_vit_digits_5px_sincos(pretrained: bool = False, **kwargs):
    return _overlapping(vit_digits_p2(pretrained, **kwargs), kernel=5, stride=1, padding=0)


@register_model
def bench_vit_digits_6px_sincos(pretrained: bool = False, **kwargs):
    return _overlapping(vit_digits_p2(pretrained, **kwargs), kernel=6, stride=2, padding=2)


RUNS = [
    ("default vit_digits (5px, sin-cos)", {}),
    ("vit_digits, lr 0.005", {"lr": 0.005}),
    ("former default vit_digits_4px (2x2)", {"model": "vit_digits_4px", "lr": 0.005}),
    ("p2", {"model": "bench_vit_digits_p2_plain", "lr": 0.005}),
    ("overlap", {"model": "bench_vit_digits_overlap", "lr": 0.005}),
    ("overlap, lr 0.01", {"model": "bench_vit_digits_overlap", "lr": 0.01}),
    ("overlap, lr 0.02", {"model": "bench_vit_digits_overlap", "lr": 0.02}),
    ("overlap, lr 0.04", {"model": "bench_vit_digits_overlap", "lr": 0.04}),
    ("overlap, batch 8 (twice the rounds)", {"model": "bench_vit_digits_overlap", "batch_size": 8, "lr": 0.005}),
    ("overlap, 80 epochs (twice the rounds)", {"model": "bench_vit_digits_overlap", "epochs": 80, "lr": 0.005}),
    ("overlap, adam lr 0.001", {"model": "bench_vit_digits_overlap", "optimizer": "adam", "lr": 0.001}),
    ("overlap-avg", {"model": "bench_vit_digits_overlap_avg", "lr": 0.005}),
    (
        "overlap-avg, complete graph, iid",
        {"model": "bench_vit_digits_overlap_avg", "topology": "complete", "split": "iid", "lr": 0.005},
    ),
    ("5px", {"model": "bench_vit_digits_5px", "lr": 0.005}),
    ("6px", {"model": "bench_vit_digits_6px", "lr": 0.005}),
    ("6px, lr 0.01", {"model": "bench_vit_digits_6px", "lr": 0.01}),
    ("5px, sin-cos", {"model": "bench_vit_digits_5px_sincos", "lr": 0.005}),
    ("5px, sin-cos, lr 0.0075", {"model": "bench_vit_digits_5px_sincos", "lr": 0.0075}),
    ("5px, sin-cos, lr 0.01", {"model": "bench_vit_digits_5px_sincos", "lr": 0.01}),
    ("6px, sin-cos", {"model": "bench_vit_digits_6px_sincos", "lr": 0.005}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--runs", default=None, help="semicolon-separated labels to run (default: every run)")
    args = parser.parse_args()
    wanted = None if args.runs is None else set(args.runs.split(";"))
    unknown = (wanted or set()) - {label for label, _ in RUNS}
    if unknown:
        parser.error(f"unknown runs {sorted(unknown)}; choose from {[label for label, _ in RUNS]}")
    started = time.perf_counter()
    rows = []
    for label, overrides in RUNS:
        if wanted is not None and label not in wanted:
            continue
        settings = SimulateSettings(seed=args.seed, compare=["central"], **overrides).validate()
        run_started = time.perf_counter()
        sim = Simulation(settings)
        p2p, central = sim.run("p2pft"), sim.run("central")
        row = {
            "run": label,
            "settings": overrides,
            "p2pft": 100 * float(np.mean(p2p.accuracy)),
            "central": 100 * float(np.mean(central.accuracy)),
            "rounds": p2p.iterations,
            "seconds": time.perf_counter() - run_started,  # both algorithms
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nseed {args.seed}, {time.perf_counter() - started:.0f} s")
    print("| model (4x4 map unless said) | rounds | P2P-FT (%) | central (%) | P2P-FT - central |")
    print("|---|---|---|---|---|")
    for r in rows:
        gap = r["p2pft"] - r["central"]
        print(f"| {r['run']} | {r['rounds']} | {r['p2pft']:.1f} | {r['central']:.1f} | {gap:+.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
