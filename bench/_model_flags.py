"""`--model` and `--lr` for the bench scripts that train: the simulator's defaults, and the former default
digits model that the README's older tables ran (`--model vit_digits_4px --lr 0.005`)."""

from __future__ import annotations

import argparse

from p2pnode.node.settings import SimulateSettings

FORMER_MODEL, FORMER_LR = "vit_digits_4px", 0.005


def add_model_flags(parser: argparse.ArgumentParser, lr: bool = True) -> None:
    parser.add_argument("--model", default=SimulateSettings.model, help=f"the former default: {FORMER_MODEL}")
    if lr:
        parser.add_argument("--lr", type=float, default=SimulateSettings.lr, help=f"the former default: {FORMER_LR}")
