"""Presenting results: the Table I-style per-node table, the JSON file and the accuracy plot."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from .simulator import SimulationResult

LABELS = {"p2pft": "P2P-FT", "local": "Local-FT", "central": "Central FT", "dsgd": "D-PSGD"}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def results_table(result: SimulationResult) -> Table:
    n = result.settings["nodes"]
    title = (
        f"Test accuracy (%) per node — {result.settings['data']}, {n} nodes, split "
        f"{result.settings['split']}, topology {result.settings['topology']}"
    )
    table = Table(title=title)
    table.add_column("method")
    for i in range(n):
        table.add_column(f"node {i + 1}", justify="right")
    table.add_column("mean", justify="right")
    table.add_column("sent / node", justify="right")
    for name, r in result.results.items():
        accs = [f"{100 * a:.1f}" for a in r.accuracy]
        cells = accs if len(accs) == n else [accs[0]] + ["" for _ in range(n - 1)]
        mean = 100 * sum(r.accuracy) / len(r.accuracy)
        sent = sum(r.bytes_sent) / len(r.bytes_sent)
        source = result.settings.get("sources", {}).get(name)
        label = LABELS.get(name, name) + (f" ({source})" if source else "")
        table.add_row(label, *cells, f"{mean:.1f}", _fmt_bytes(sent))
    return table


def write_json(result: SimulationResult, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=1))
    tmp.replace(path)


def write_plot(result: SimulationResult, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(result.results)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        hist = result.results[name].history
        per_node = list(zip(*hist["accuracy"], strict=True))
        for i, accs in enumerate(per_node):
            ax.plot(hist["epoch"], [100 * a for a in accs], label=f"node {i + 1}", lw=1.2)
        ax.set_title(LABELS.get(name, name))
        ax.set_xlabel("epoch (passes over all data)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
