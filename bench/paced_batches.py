"""The mini-batches a paced daemon used, from its log: how long it held each and their time-weighted mean.

    .venv/bin/p2pnode testnet --sync async --pace-batch --slow 3:5 --epochs 40 --workdir W
    .venv/bin/python bench/paced_batches.py W/node3.log [W/node0.log ...]

A node with `--pace-batch` logs "... mini-batch N" each time it changes its batch, and "... back to
--batch-size N" when it gives pacing up (node/pace.py); each batch is held from that line to the next
one, the last one to the log's last timestamped line. The simulator's paced node keeps one batch for
the whole run (16 // FACTOR samples: 3 at 5x).
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from datetime import datetime

STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
# a pacing step ("... mini-batch N") or giving pacing up ("... back to --batch-size N, ...")
BATCH = re.compile(r"(?:mini-batch|back to --batch-size) (\d+)")


def held_batches(lines: list[str]) -> dict[int, float]:
    """Seconds spent at each mini-batch, from the first pacing line to the log's last timestamp."""
    changes: list[tuple[float, int]] = []
    last = None
    for line in lines:
        stamp = STAMP.match(line)
        if stamp is None:
            continue
        last = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        batch = BATCH.search(line)
        if batch is not None:
            changes.append((last, int(batch.group(1))))
    if not changes:
        return {}
    held: dict[int, float] = defaultdict(float)
    for (start, batch), (end, _) in zip(changes, [*changes[1:], (last, 0)], strict=True):
        held[batch] += end - start
    return dict(held)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="node logs of a testnet's workdir")
    for path in ap.parse_args().logs:
        with open(path) as f:
            held = held_batches(f.read().splitlines())
        total = sum(held.values())
        if not total:
            print(f"{path}: never paced its batch")
            continue
        mean = sum(b * s for b, s in held.items()) / total
        shares = ", ".join(f"{b}: {100 * s / total:.0f}%" for b, s in sorted(held.items()))
        print(f"{path}: time-weighted mini-batch {mean:.2f} over {total:.1f} s ({shares})")


if __name__ == "__main__":
    main()
