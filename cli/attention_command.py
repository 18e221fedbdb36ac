"""`p2pnode attention`: last-block attention maps of saved models, as one PNG grid (and JSON).

Registered in `cli/app.py` with `app.command()(attention)`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)


def attention(
    directory: Annotated[
        list[Path],
        typer.Argument(
            help="a `--save` directory of simulate or testnet, or daemon --state-dir folders (any mix, one trunk)"
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="the image grid to write, a row per image and a column per model: PNG, or the format its suffix "
            "names (.pdf, .svg, .jpg, ...)",
        ),
    ],
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="also write every map and each model's similarity to the central model's maps"),
    ] = None,
    images: Annotated[int, typer.Option(help="test images, one row each")] = 8,
    classes: Annotated[
        str | None,
        typer.Option(help="take the images from these classes, e.g. 2-3 or 0,7 (default: half never seen by --node)"),
    ] = None,
    node: Annotated[
        int, typer.Option(help="the node whose models are compared (node<N> of --save, a daemon's --index; from 0)")
    ] = 0,
) -> None:
    """Overlay the last block's attention on test images, one row per image, one column per model.

    Columns: the original, then Local-FT, P2P-FT, central and any other algorithm saved; one colour
    scale per row. By default half the images are of classes the node never saw."""
    from p2pnode.node.algorithms import label_of
    from p2pnode.node.attention import attention_report

    report = attention_report(directory, out, json_path, images=images, classes=classes, node=node)
    rows, cols = report["grid"]
    console.print(f"wrote {out} ({len(report['images'])} images, {rows}x{cols} maps)")
    if rows * cols < 16:
        console.print(
            f"note: {rows}x{cols} maps have too few patches to show much; a model with smaller patches gives finer "
            "ones (digits: the default --model vit_digits gives 4x4, README 'Attention maps')"
        )
    similarity = report["similarity_to_central"]
    if similarity:
        shown = ", ".join(f"{label_of(a)} {v:.4f}" for a, v in similarity.items() if a != "central")
        if shown:
            console.print(f"mean cosine similarity to the central model's maps: {shown}")
    if json_path is not None:
        console.print(f"wrote {json_path}")
