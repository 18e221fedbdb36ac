"""Presenting results: the Table I-style per-node table, the JSON file and the accuracy plot.

Nodes are shown by their id, 0-based as in every flag, log and `nodeI` folder ("node 3" is the node of
`--churn leave:3@200` and `--slow 3:5`). With churn, a node that was not in the run the whole time gets
a note in the table's `membership` row (rounds: "left @200, joined @400"), a `*` on its accuracy if it
was out at the end (the accuracy it had when it left), and in the plot a line only over the epochs it
was a member, with membership changes marked by vertical lines. A Byzantine node (`--attack`) is marked
"(B)" in the header, and the mean is then over the honest nodes only.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from rich.table import Table

from .algorithms import label_of
from .errors import BadInput
from .saved_models import write_atomically
from .simulator import AlgorithmResult, SimulationResult
from .topology import AUTO, make_topology


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{1000 * seconds:.1f}"


def presence(result: AlgorithmResult) -> dict[int, list[list[int | None]]]:
    """{node id: [[from_round, to_round or None], ...]} (keys may be strings after a JSON round trip)."""
    return {int(i): spans for i, spans in result.history.get("presence", {}).items()}


def out_at_end(result: AlgorithmResult) -> set[int]:
    """Ids of the nodes that were not running when the run ended (their accuracy is from when they left)."""
    return {i for i, spans in presence(result).items() if spans and spans[-1][1] is not None}


def _events(result: AlgorithmResult) -> dict[int, list[tuple[str, int]]]:
    """Per node id, in order, what happened to it and at which round: joined, back, left or crashed."""
    records = result.history.get("membership", [])
    left = {(i, r["round"]) for r in records for i in r["left"]}
    rejoined = {(i, r["round"]) for r in records for i in r.get("rejoined", [])}
    events: dict[int, list[tuple[str, int]]] = {}
    for i, spans in sorted(presence(result).items()):
        for start, end in spans:
            if start > 0:
                events.setdefault(i, []).append(("back" if (i, start) in rejoined else "joined", start))
            if end is not None:
                events.setdefault(i, []).append(("left" if (i, end) in left else "crashed", end))
    return events


def membership_notes(result: AlgorithmResult) -> dict[int, str]:
    """For each node that was not in the run the whole time, what happened when: 'crashed @300, back @350'."""
    return {i: ", ".join(f"{what} @{when}" for what, when in events) for i, events in _events(result).items()}


def node_ids(result: SimulationResult) -> list[int]:
    """The id of each node column: 0..nodes-1, except in a testnet where a node never took part."""
    return list(result.settings.get("node_ids") or range(result.settings["nodes"]))


def results_table(result: SimulationResult) -> Table:
    n = result.settings["nodes"]
    ids = node_ids(result)
    topology = result.settings["topology"]
    if topology == AUTO:  # name the graph it built
        topology = f"{AUTO} ({make_topology(AUTO, n).name})"
    title = (
        f"Test accuracy (%) per node — {result.settings['data']}, {n} nodes, split "
        f"{result.settings['split']}, topology {topology}"
    )
    table = Table(title=title)
    table.add_column("method")
    attackers = {i for r in result.results.values() for i in r.attackers}
    for i in ids:
        table.add_column(f"node {i}" + (" (B)" if i in attackers else ""), justify="right")
    table.add_column("honest mean" if attackers else "mean", justify="right")
    table.add_column("sent / node", justify="right")
    notes: dict[tuple, list[str]] = {}  # distinct membership notes -> the methods they belong to
    starred = False
    for name, r in result.results.items():
        out = out_at_end(r)
        starred |= bool(out)
        accs = [f"{100 * a:.1f}" + ("*" if i in out else "") for i, a in zip(ids, r.accuracy, strict=False)]
        cells = accs if len(accs) == n else [accs[0]] + ["" for _ in range(n - 1)]
        mean = 100 * r.honest_mean
        sent = sum(r.bytes_sent) / len(r.bytes_sent)
        source = result.settings.get("sources", {}).get(name)
        label = label_of(name) + (f" ({source})" if source else "")
        table.add_row(label, *cells, f"{mean:.1f}", _fmt_bytes(sent))
        node_notes = membership_notes(r)
        if node_notes:
            notes.setdefault(tuple(sorted(node_notes.items())), []).append(label_of(name))
    for i, (node_notes, names) in enumerate(notes.items()):
        if i == 0:
            table.add_section()
        label = "membership" + (f" ({', '.join(names)})" if len(notes) > 1 else "")
        cells = dict(node_notes)
        table.add_row(label, *[cells.get(j, "") for j in ids], "", "")
    paced = [(name, r) for name, r in result.results.items() if r.seconds_per_round]
    captions = []
    if paced and (result.settings.get("sync") == "async" or result.settings.get("slow")):
        # the daemons' own pace: what --slow and --sync async are about
        table.add_section()
        for name, r in paced:
            label = label_of(name)
            table.add_row(f"ms / round ({label})", *[_ms(x) for x in r.seconds_per_round], "", "")
            if r.steps:  # empty unless every finished daemon counted them (testnet._gradients)
                gradients = [str(g) if t is not None else "" for g, t in zip(r.steps, r.seconds_per_round, strict=True)]
                table.add_row(f"new gradients ({label})", *gradients, "", "")
        captions.append(
            "ms / round: a daemon's time in its rounds over their number; new gradients: the gradients it "
            "computed, its first (tau^0 = g^0, before round 1) included, so rounds + 1 where no round went on "
            "with its latest"
        )
    if notes:
        captions.append("membership: rounds at which a node joined, left, crashed or came back")
        if starred:
            captions.append("* accuracy when the node left (it was out at the end)")
    if attackers:
        attacks = ", ".join(result.settings.get("attack", []))
        captions.append(f"(B) Byzantine node (--attack {attacks}), not counted in the honest mean")
    if captions:
        table.caption = "; ".join(captions)
    return table


def check_output(flag: str, path: str | Path, directory: bool = False) -> Path:
    """Before a run: `path` (a file, or a folder if `directory`) can be written, its parents created;
    else BadInput, so that a long run's results are never lost to a typo in an output path."""
    path = Path(path)
    wanted, found = ("folder", "file") if directory else ("file", "folder")
    if path.exists() and path.is_dir() != directory:
        raise BadInput(f"{flag} {path} is a {found}: give a {wanted} path")
    parent = path if directory else path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot write {flag} {path}: {e.strerror or e}") from None
    try:
        with tempfile.TemporaryFile(dir=parent):  # writing is the only test that holds for root too
            pass
    except OSError as e:
        # /proc and the like: the folder exists but takes no new files (ENOENT here would read "no such folder")
        raise BadInput(f"cannot write {flag} {path}: {parent} takes no new files ({e.strerror or e})") from None
    return path


def check_plot_format(path: str | Path, flag: str = "--plot") -> None:
    """The image's suffix names a format matplotlib writes (no suffix: PNG)."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(path).suffix.lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix not in formats:
        raise BadInput(f"{flag} {path}: cannot write .{suffix} images; use one of {', '.join(sorted(formats))}")


def write_json(result: SimulationResult, path: str | Path) -> None:
    path = check_output("--json", path)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(result.to_json(), indent=1)))


def _change_label(record: dict) -> str:
    """What changed at a membership epoch, nodes by id: '3 left', '3 joined', '1 back', '1 dropped (crashed)'."""
    back = set(record.get("rejoined", []))
    words = [f"{i} left" for i in record.get("left", [])]
    words += [f"{i} dropped (crashed)" for i in record.get("crashed", [])]
    words += [f"{i} {'back' if i in back else 'joined'}" for i in record.get("joined", [])]
    return ", ".join(words)


def write_plot(result: SimulationResult, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = check_output("--plot", path)
    names = list(result.results)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        r = result.results[name]
        hist = r.history
        per_node = list(zip(*hist["accuracy"], strict=True))
        changes = [rec for rec in hist.get("membership", []) if rec["round"] > 0]
        for i, accs in zip(node_ids(result), per_node, strict=False):  # central: one node
            # a node outside the run has None: NaN leaves a gap in its line
            ys = [100 * a if a is not None else float("nan") for a in accs]
            style = {"marker": ".", "ms": 3} if changes else {}
            ax.plot(hist["epoch"], ys, label=f"node {i}", lw=1.2, **style)
        rounds_per_epoch = r.iterations / max(len(hist["epoch"]), 1)
        # accuracy of epoch e is measured at round e * rounds_per_epoch; dashed: a new member list takes
        # effect, dotted: a node crashes (its epoch change comes CRASH_DETECTION_ROUNDS later)
        marks = [(rec["round"], _change_label(rec), "--", 0.03, "bottom") for rec in changes]
        crashes = [(i, at) for i, events in _events(r).items() for what, at in events if what == "crashed"]
        marks += [(at, f"{i} crashed", ":", 0.97, "top") for i, at in crashes]
        for at, label, ls, y, va in marks:
            x = at / rounds_per_epoch
            ax.axvline(x, color="grey", ls=ls, lw=0.8)
            ax.text(x, y, label, rotation=90, va=va, ha="right", fontsize=7, transform=ax.get_xaxis_transform())
        ax.set_title(label_of(name))
        ax.set_xlabel("epoch (passes over all data)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as e:  # ValueError: a suffix matplotlib cannot write
        raise BadInput(f"cannot write --plot {path}: {e}") from None
    finally:
        plt.close(fig)
