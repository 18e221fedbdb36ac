"""`p2pnode`: the command line. Each command parses flags into library objects and calls them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from p2pnode.node.data import parse_split
from p2pnode.node.errors import BadInput
from p2pnode.node.settings import RunSettings
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

try:  # typer >= 0.26 vendors its own click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer with the click package
    from click.exceptions import NoArgsIsHelpError, UsageError

app = typer.Typer(
    name="p2pnode",
    help="Fine-tune one vision transformer together, peer to peer, without sharing data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
D = RunSettings()


@app.callback()
def _root() -> None:
    """Fine-tune one vision transformer together, peer to peer, without sharing data."""


@app.command()
def simulate(
    algorithm: Annotated[str, typer.Option(help="p2pft, dsgd, local or central")] = D.algorithm,
    nodes: Annotated[
        int | None, typer.Option(help="number of nodes [default: one per --split class set, else 4]")
    ] = None,
    split: Annotated[
        str, typer.Option(help="class sets per node (0-1,2-3,4-6,7-9), iid, or dirichlet:ALPHA")
    ] = D.split,
    topology: Annotated[
        str, typer.Option(help="directed-ring, exponential, complete, ring, random:K, or an edge-list file")
    ] = D.topology,
    epochs: Annotated[int, typer.Option(help="passes over all training data")] = D.epochs,
    lr: Annotated[float, typer.Option(help="step size alpha")] = D.lr,
    schedule: Annotated[str, typer.Option(help="cosine or constant step size")] = D.schedule,
    momentum: Annotated[float, typer.Option(help="heavy-ball momentum, 0 for plain SGD")] = D.momentum,
    weight_decay: Annotated[float, typer.Option(help="L2 penalty on the trainable parameters")] = D.weight_decay,
    batch_size: Annotated[int, typer.Option(help="mini-batch size per node")] = D.batch_size,
    seed: Annotated[int, typer.Option(help="seed for partitions, sampling and random topologies")] = D.seed,
    compare: Annotated[
        str, typer.Option(help="other algorithms to run on the same data, e.g. local,central,dsgd")
    ] = "",
    model: Annotated[str, typer.Option(help="timm model name; the default needs no download")] = D.model,
    trainable_blocks: Annotated[int, typer.Option(help="last blocks to fine-tune (Swin: of the last stage)")] = 1,
    pretrained: Annotated[bool, typer.Option(help="load timm hub weights (needs internet)")] = False,
    checkpoint: Annotated[Path | None, typer.Option(help="local weights (.safetensors or .pt)")] = None,
    model_seed: Annotated[int, typer.Option(help="seed of the random initialisation shared by all nodes")] = 0,
    data: Annotated[str, typer.Option(help="digits, cifar10, cifar100, flowers102, pets, or an image folder")] = D.data,
    data_root: Annotated[Path | None, typer.Option(help="where torchvision datasets are kept")] = None,
    download: Annotated[bool, typer.Option(help="download torchvision datasets into --data-root")] = False,
    augment: Annotated[bool, typer.Option(help="random crops and flips (turns the feature cache off)")] = False,
    cache_features: Annotated[bool, typer.Option(help="compute the frozen trunk once per sample")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N]")] = D.device,
    json_path: Annotated[Path | None, typer.Option("--json", help="write results and settings as JSON")] = None,
    plot: Annotated[Path | None, typer.Option(help="write accuracy against epoch as an image")] = None,
) -> None:
    """Run NODES nodes in one process over in-memory links and print a per-node accuracy table."""
    from p2pnode.node.report import results_table, write_json, write_plot
    from p2pnode.node.simulator import simulate as run_simulation

    if nodes is None:
        parsed = parse_split(split)
        nodes = len(parsed) if isinstance(parsed, list) else 4
    settings = RunSettings(
        model=model,
        trainable_blocks=trainable_blocks,
        pretrained=pretrained,
        checkpoint=str(checkpoint) if checkpoint else None,
        model_seed=model_seed,
        data=data,
        data_root=str(data_root) if data_root else None,
        download=download,
        augment=augment,
        cache_features=cache_features,
        split=split,
        nodes=nodes,
        topology=topology,
        algorithm=algorithm,
        compare=[c.strip() for c in compare.split(",") if c.strip()],
        epochs=epochs,
        lr=lr,
        schedule=schedule,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
        device=device,
    ).validate()
    columns = (
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    progress = Progress(*columns, console=console)
    tasks: dict[str, int] = {}

    def task(key: str, total: int) -> int:
        if not progress.live.is_started:  # started lazily, so early errors print on a clean line
            progress.start()
        if key not in tasks:
            tasks[key] = progress.add_task(key, total=total, info="")
        return tasks[key]

    def on_cache(done: int, total: int) -> None:
        progress.update(task("caching trunk features", total), completed=done)

    def on_epoch(name: str, epoch: int, total: int, acc: float) -> None:
        progress.update(task(name, total), completed=epoch, info=f"mean acc {100 * acc:5.1f}%")

    try:
        result = run_simulation(settings, on_epoch, on_cache)
    finally:
        progress.stop()
    Console().print(results_table(result))
    if json_path:
        write_json(result, json_path)
        console.print(f"wrote {json_path}")
    if plot:
        write_plot(result, plot)
        console.print(f"wrote {plot}")


def main(argv: list[str] | None = None) -> int:
    """Console entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="p2pnode", standalone_mode=False)
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx is not None else str(e))
        return 2
    except UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        print(f"error: {e.format_message()}{hint}", file=sys.stderr)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        return 130
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
