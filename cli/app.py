"""`p2pnode`: the command line. Each command parses flags into library objects and calls them."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from p2pnode.node.errors import BadInput, RunFailed
from p2pnode.node.settings import NodeSettings, SimulateSettings, TestnetSettings, check_run_id
from p2pnode.protocol.errors import one_line

from .attention_command import attention
from .options import with_settings

if TYPE_CHECKING:
    from p2pnode.node.simulator import SimulationResult

try:  # typer >= 0.26 vendors its own click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer with the click package
    from click.exceptions import NoArgsIsHelpError, UsageError

# importing hivemind makes torch warn that torch.jit.script is deprecated: not the user's concern
warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

app = typer.Typer(
    name="p2pnode",
    help="Fine-tune one vision transformer together, peer to peer, without sharing data.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


def _stdout() -> Console:
    """Tables for stdout: full width when piped or captured, so no cell is cut short."""
    return Console() if sys.stdout.isatty() else Console(width=200)


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[str, int, int, str], None]]:
    """Progress bars on stderr, started lazily so that early errors print on a clean line."""
    columns = (
        TextColumn("{task.description:<22}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    progress = Progress(*columns, console=console)
    tasks: dict[str, int] = {}

    def update(key: str, total: int, done: int, info: str) -> None:
        if not progress.live.is_started:
            progress.start()
        if key not in tasks:
            tasks[key] = progress.add_task(key, total=total, info="")
        progress.update(tasks[key], total=total, completed=done, info=info)

    try:
        yield update
    finally:
        if progress.live.is_started:
            progress.stop()


SaveDir = Annotated[
    Path | None,
    typer.Option(
        help="write each node's final trainable parameters per algorithm here (read by `p2pnode attention`); "
        "an earlier run's models there move to DIR/set-aside-TIME/"
    ),
]
JsonPath = Annotated[Path | None, typer.Option("--json", help="write results and settings as JSON")]
PlotPath = Annotated[Path | None, typer.Option(help="write accuracy against epoch as an image")]


def _check_outputs(json_path: Path | None, plot: Path | None, save: Path | None) -> None:
    from p2pnode.node.report import check_output, check_plot_format

    for flag, path in (("--json", json_path), ("--plot", plot)):
        if path is not None:
            check_output(flag, path)
    if plot is not None:
        check_plot_format(plot)
    if save is not None:
        check_output("--save", save, directory=True)


def _report(result: SimulationResult, json_path: Path | None, plot: Path | None) -> None:
    """The per-node table on stdout, then the JSON and the plot if asked for."""
    from p2pnode.node.report import results_table, write_json, write_plot

    _stdout().print(results_table(result))
    if json_path:
        write_json(result, json_path)
        console.print(f"wrote {json_path}")
    if plot:
        write_plot(result, plot)
        console.print(f"wrote {plot}")


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        print(f"p2pnode {version('p2pnode')} (hivemind {version('hivemind')}, torch {version('torch')})")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the versions and exit"),
    ] = False,
) -> None:
    """Fine-tune one vision transformer together, peer to peer, without sharing data."""


@app.command()
@with_settings(SimulateSettings)
def simulate(
    settings: SimulateSettings,
    json_path: JsonPath = None,
    plot: PlotPath = None,
    save: SaveDir = None,
) -> None:
    """Run NODES nodes in one process over in-memory links and print a per-node accuracy table."""
    from p2pnode.node.simulator import simulate as run_simulation

    _check_outputs(json_path, plot, save)
    with _progress() as task:

        def on_cache(done: int, total: int) -> None:
            task("caching trunk features", total, done, "")

        def on_epoch(name: str, epoch: int, total: int, acc: float) -> None:
            task(name, total, epoch, f"mean acc {100 * acc:5.1f}%")

        result = run_simulation(settings, on_epoch, on_cache, save=save)
    _report(result, json_path, plot)


def _log_to_stderr(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@app.command()
@with_settings(NodeSettings)
def start(settings: NodeSettings) -> None:
    """Run this machine's node: join the run through the DHT, train with its peers, write result.json."""
    import asyncio

    from p2pnode.node.daemon import run_node

    _log_to_stderr()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - Windows
        pass
    result = asyncio.run(run_node(settings))
    if result is not None:
        ending = "done" if result["outcome"] == "done" else f"{result['outcome']} (left out)"
        console.print(
            f"{ending}: test accuracy {100 * result['accuracy']:.1f}% after {result['rounds']} rounds, "
            f"sent {result['bytes_sent'] / 1e6:.1f} MB; wrote {settings.state_dir}/result.json"
        )


Maddrs = Annotated[list[str] | None, typer.Option(help="multiaddrs (repeat or separate with commas)")]


def _split_addrs(values: list[str] | None, flag: str, peer_id: bool = False) -> list[str]:
    from p2pnode.node.settings import check_multiaddrs

    return check_multiaddrs(flag, [a for v in values or [] for a in v.split(",") if a], peer_id)


Owner = Annotated[
    str | None, typer.Option(help="a closed run's owner public key (public-key line of `p2pnode keygen`)")
]
RunId = Annotated[str, typer.Option(help="name of the run")]


def _validators(run_id: str, owner: str | None) -> list:
    from p2pnode.protocol.admission import AdmissionError
    from p2pnode.protocol.membership import run_validators

    try:
        return run_validators(run_id, owner=owner)
    except AdmissionError as e:
        raise BadInput(str(e)) from None


@app.command()
def keygen(
    file: Annotated[
        Path, typer.Argument(help="where to write the private key (an existing file is never overwritten)")
    ],
) -> None:
    """Write a new private key (a node's --identity or an owner's key); print its peer id and public key.

    The file is never overwritten. Both printed lines are one token each: `peer-id: ...` (what an
    invitation names) and `public-key: ...` (what a closed run's --owner takes)."""
    from p2pnode.protocol.admission import AdmissionError, generate_key_file, peer_id_of, public_key_token

    try:
        key = generate_key_file(file)
    except (AdmissionError, OSError) as e:
        raise BadInput(str(e) if isinstance(e, AdmissionError) else f"cannot write {file}: {e.strerror}") from None
    print(f"peer-id: {peer_id_of(key.public_key())}")
    print(f"public-key: {public_key_token(key.public_key())}")


@app.command()
def invite(
    owner_key: Annotated[Path, typer.Option(help="the run owner's key file (from `p2pnode keygen`)")],
    peer: Annotated[str, typer.Option(help="peer id of the invited node (the peer-id line of its keygen)")],
    run_id: RunId = "default",
    expires: Annotated[str, typer.Option(help="how long it is valid: a number and s, m, h, d or w")] = "30d",
    out: Annotated[Path | None, typer.Option(help="write the invitation here (default: stdout)")] = None,
) -> None:
    """Write an invitation to a closed run, signed by the owner and bound to one peer id.

    The serial it prints on stderr is what `p2pnode revoke` takes."""
    import time

    from p2pnode.protocol.admission import AdmissionError, load_private_key, make_invitation, parse_duration

    check_run_id(run_id)
    try:
        invitation = make_invitation(load_private_key(owner_key), run_id, peer, time.time() + parse_duration(expires))
    except AdmissionError as e:
        raise BadInput(str(e)) from None
    if out is None:
        print(invitation.to_json())
    else:
        try:
            out.write_text(invitation.to_json() + "\n")
        except OSError as e:
            raise BadInput(f"cannot write {out}: {e.strerror}") from None
    until = time.strftime("%Y-%m-%d %H:%M", time.gmtime(invitation.expires))
    console.print(
        f"invitation {invitation.serial} for {peer} in run {run_id!r}, valid until {until} UTC", soft_wrap=True
    )


@app.command()
def revoke(
    serial: Annotated[str, typer.Argument(help="the invitation's serial (printed by `p2pnode invite`)")],
    owner_key: Annotated[Path, typer.Option(help="the run owner's key file")],
    peers: Maddrs = None,
    run_id: RunId = "default",
    keep: Annotated[str, typer.Option(help="how long the DHT keeps the revocation (s, m, h, d or w)")] = "365d",
) -> None:
    """Publish the owner's revocation of an invitation in the run's DHT.

    Every member drops that peer at its next membership read; its records and streams are refused
    from then on."""
    from p2pnode.node.access import publish_revocation
    from p2pnode.protocol.admission import AdmissionError, parse_duration

    check_run_id(run_id)
    addrs = _split_addrs(peers, "--peers", peer_id=True)
    if not addrs:
        raise BadInput("revoke needs --peers: the multiaddr of any peer of the run (e.g. the bootstrap peer)")
    try:
        seconds = parse_duration(keep)
    except AdmissionError as e:
        raise BadInput(str(e)) from None
    publish_revocation(addrs, run_id, str(owner_key), serial, seconds)
    console.print(f"revoked invitation {serial} in run {run_id!r}")


@app.command()
def bootstrap(
    listen: Maddrs = None,
    announce: Maddrs = None,
    identity: Annotated[Path | None, typer.Option(help="private key file (keeps the peer id)")] = None,
    run_id: Annotated[str, typer.Option(help="run whose records this peer validates")] = "default",
    owner: Owner = None,
) -> None:
    """Start a DHT-only peer, print its full multiaddrs one per line, and keep running until stopped."""
    import signal
    import threading

    from p2pnode.node.access import check_identity_file
    from p2pnode.node.dht_process import start_dht, stop_dht

    host_maddrs = _split_addrs(listen, "--listen") or ["/ip4/0.0.0.0/tcp/0"]
    announce_maddrs = _split_addrs(announce, "--announce") or None
    check_identity_file(str(identity) if identity else None)
    validators = _validators(check_run_id(run_id), owner)
    _log_to_stderr(logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        dht = start_dht(
            host_maddrs=host_maddrs,
            announce_maddrs=announce_maddrs,
            identity_path=str(identity) if identity else None,
            record_validators=validators,
        )
    except Exception as e:  # p2pd's own reason (address in use, no such interface, ...)
        raise BadInput(f"could not start the DHT ({type(e).__name__}: {e})") from None
    try:
        for addr in dht.get_visible_maddrs():
            print(addr, flush=True)
        stop.wait()
    finally:
        stop_dht(dht)


@app.command()
def status(
    peers: Maddrs = None,
    run_id: Annotated[str, typer.Option(help="the run to list")] = "default",
    owner: Owner = None,
) -> None:
    """List a run's epoch, coordinator and members (joined / leaving / gone) with their progress.

    Exits 1 when the DHT holds no record of the run (none of its members is up, or a wrong --run-id),
    so that a script can wait for a run to appear."""
    from p2pnode.node.run_status import read_run_status, status_tables

    check_run_id(run_id)
    addrs = _split_addrs(peers, "--peers", peer_id=True)
    if not addrs:
        raise BadInput("status needs --peers: the multiaddr of any peer of the run (e.g. the bootstrap peer)")
    run = read_run_status(addrs, run_id, owner)
    if run.record is None and not run.infos:
        console.print(
            f"no records of run {run_id!r} in the DHT: none of its members is up, or check --run-id"
            + ("" if owner else " (a closed run is read with its --owner)"),
            soft_wrap=True,
        )
        raise typer.Exit(NOT_FOUND)
    for table in status_tables(run):
        _stdout().print(table)


@app.command()
@with_settings(TestnetSettings)
def testnet(
    settings: TestnetSettings,
    json_path: JsonPath = None,
    plot: PlotPath = None,
    save: SaveDir = None,
) -> None:
    """Start a bootstrap peer and NODES `p2pnode start` processes, run, and tear down.

    They run on 127.0.0.1, or with `--hosts netns` (root, Linux) each on its own namespaced host of an
    emulated internet: `--rate 50mbit` links, `--loss 2` percent packet loss, `--nat 1` node behind a
    home router. Everything the network lab creates is removed however the run ends."""
    from p2pnode.node.testnet import run_testnet

    _check_outputs(json_path, plot, save)
    with _progress() as task:

        def on_progress(node: int, done: int, total: int, acc: float | None) -> None:
            info = f"acc {100 * acc:5.1f}%" if acc is not None else ""
            task(f"node {node}", total, done, info)

        result = run_testnet(settings, on_progress, save=save)
    _report(result, json_path, plot)


app.command()(attention)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: bad input is one line on stderr and exit code 2, never a traceback."""
    command = typer.main.get_command(app)
    try:
        # typer returns (not raises) an exit code here, and turns Ctrl-C into code 130
        code = command.main(args=argv, prog_name="p2pnode", standalone_mode=False)
    except (BadInput, RunFailed) as e:  # bad input: 2; a run that failed after good input: 1
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2 if isinstance(e, BadInput) else 1
    except NoArgsIsHelpError as e:
        print(e.ctx.get_help() if e.ctx is not None else str(e))
        return 2
    except UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        print(f"error: {one_line(e.format_message())}{hint}", file=sys.stderr)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = ABORTED
    if code == ABORTED:
        print("aborted", file=sys.stderr)
    return code if isinstance(code, int) else 0


ABORTED = 130  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)
NOT_FOUND = 1  # `status`: the DHT holds no record of the run (2 stays for bad input)


if __name__ == "__main__":  # `python -m p2pnode.cli.app`, as testnets start their daemons; the script: cli.run
    sys.exit(main())
