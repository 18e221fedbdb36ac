"""Time to accuracy over an emulated internet: P2P-FT (each codec) against hivemind.Optimizer.

Needs root (network namespaces, tc, nftables; DESIGN §11). For each link rate, a bootstrap peer and 4
peers each on its own namespaced host, every host's upload shaped to the rate (tbf). Every run uses
the same model, data, --split, batch size and step budget:

- P2P-FT: `p2pnode start` daemons (what `p2pnode testnet --hosts netns` runs), directed ring, one
  exchange per local step, --epochs passes over the data (rounds = epochs x 23 on digits).
- hivemind: bench/hivemind_peer.py, `hivemind.Optimizer` over a hivemind DHT through the same
  bootstrap, one swarm step per 4 x batch-size samples (gradients averaged by all-reduce), the same
  number of samples in all. Tuned as a user would (DESIGN §11): matchmaking_time 1 s, not the 15 s
  default; gradients in fp16 (hivemind's usual choice; `--hivemind-compression`), the parameters
  re-averaged only every 50 steps. The same local optimizer (Adam, lr 0.001 by default: tuned on the
  simulator, P2P-FT with SGD stayed 5 points below central on this model) and the same cosine step size.

Target: 95% of central fine-tuning's final accuracy (the simulator's `central`, same settings). Time to
target: from the start of training (P2P-FT: the first node entering epoch 0; hivemind: all peers
ready) until every node's test accuracy, evaluated after each pass over the data, has reached it.
Bytes per node: what the host's interface sent (everything: DHT, protocol overhead, retransmissions).
Start-up (model build, feature cache, DHT join) is not counted for either.

    .venv/bin/python bench/wan.py --rates 50mbit,10mbit --codecs none,int8 --epochs 10 [--syncs wait,async]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from p2pnode.node.events import read_events
from p2pnode.node.settings import TestnetSettings
from p2pnode.node.simulator import Simulation
from p2pnode.node.testnet import (
    NamespacedHosts,
    node_command,
    read_bootstrap_address,
    sigterm_as_exit,
    start_bootstrap,
    stop_processes,
)

HERE = Path(__file__).resolve().parent


def tx_bytes(host) -> int:
    """Bytes the host's interface has sent (from the namespace's /proc/net/dev)."""
    for line in host.run(["cat", "/proc/net/dev"], timeout=10).stdout.splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == host.interface:
            return int(counters.split()[8])
    raise RuntimeError(f"no {host.interface} on {host.name}")


def time_to(points: list[list[tuple[float, float]]], target: float) -> float | None:
    """Seconds until every node's accuracy has reached `target` (points: per node, (t, accuracy))."""
    firsts = [next((t for t, acc in node if acc >= target), None) for node in points]
    return None if any(t is None for t in firsts) else max(firsts)


def wait_all(procs: list, timeout: float, what: str, reached: Callable[[], bool] | None = None) -> None:
    """Until every process has exited (or, with `reached`, until it returns True)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            print(f"{what}: stopped after --timeout {timeout:.0f} s; reporting what it measured until then")
            return
        if reached is not None and reached():
            return
        time.sleep(2.0)
    if any(p.returncode != 0 for p in procs):
        raise RuntimeError(f"{what}: a peer exited with code {[p.returncode for p in procs]}")


Points = list[list[tuple[float, float]]]  # per node: (seconds since training started, accuracy)


def run_swarm(
    rate: str,
    workdir: Path,
    nodes: int,
    start_boot: Callable[[NamespacedHosts], tuple[subprocess.Popen, str]],
    peer_argv: Callable[[int, str, str], list[str]],
    read_points: Callable[[Path, int], tuple[Points, int]],
    timeout: float,
    target: float | None,
    what: str,
) -> dict:
    """A bootstrap and `nodes` peers on namespaced hosts shaped to `rate`, until they exit (or, with
    `target`, until every node reached it); what they measured and what each host's interface sent.
    `peer_argv(i, bootstrap address, listen address)` is peer i's command; it logs to peer<i>.log."""
    workdir.mkdir(parents=True, exist_ok=True)
    hosts = NamespacedHosts(rate=rate)
    procs = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        boot, addr = start_boot(hosts)
        procs.append(boot)
        for i in range(nodes):
            log = (workdir / f"peer{i}.log").open("w")
            argv = peer_argv(i, addr, hosts.listen(f"n{i}"))
            procs.append(hosts.popen(f"n{i}", argv, stdout=log, stderr=subprocess.STDOUT, env=env))
        reached = (lambda: time_to(read_points(workdir, nodes)[0], target) is not None) if target else None
        wait_all(procs[1:], timeout, what, reached)
        sent = [tx_bytes(hosts.host(f"n{i}")) for i in range(nodes)]
    finally:
        stop_processes(procs)
        hosts.close()
    points, done = read_points(workdir, nodes)
    return {"points": points, "sent": sent, "rounds": done, "final": [node[-1][1] for node in points]}


def run_p2pft(settings: TestnetSettings, rate: str, workdir: Path, timeout: float, target: float | None) -> dict:
    def start_boot(hosts: NamespacedHosts) -> tuple[subprocess.Popen, str]:
        boot, addrs = start_bootstrap(settings.run_id, workdir / "bootstrap.log", hosts=hosts)
        return boot, addrs[0]

    def peer_argv(i: int, addr: str, listen: str) -> list[str]:
        state = workdir / f"node{i}"
        state.mkdir(parents=True, exist_ok=True)
        return node_command(settings, i, [addr], state, listen=listen)

    return run_swarm(
        rate, workdir, settings.nodes, start_boot, peer_argv, _p2pft_points, timeout, target, "the P2P-FT run"
    )


def _p2pft_points(workdir: Path, nodes: int) -> tuple[Points, int]:
    """Each node's (seconds since training started, accuracy) after each pass, and the rounds done."""
    paths = [workdir / f"node{i}" / "events.jsonl" for i in range(nodes)]
    events = [read_events(path) if path.is_file() else [] for path in paths]
    starts = [e["t"] for node in events for e in node if e["kind"] == "epoch_change"]
    if not starts:
        return [[] for _ in range(nodes)], 0
    t0 = min(starts)
    evals = [[e for e in node if e["kind"] == "eval"] for node in events]
    rounds = min((node[-1]["round"] if node else 0) for node in evals)
    return [[(e["t"] - t0, e["accuracy"]) for e in node] for node in evals], rounds


def run_hivemind(
    settings: TestnetSettings,
    rate: str,
    workdir: Path,
    steps: int,
    compression: str,
    timeout: float,
    target: float | None,
) -> dict:
    peer = [sys.executable, str(HERE / "hivemind_peer.py")]

    def start_boot(hosts: NamespacedHosts) -> tuple[subprocess.Popen, str]:
        argv = [*peer, "--bootstrap", "--listen", hosts.listen("boot")]
        boot_log = (workdir / "bootstrap.log").open("w")
        boot = hosts.popen("boot", argv, stdout=subprocess.PIPE, stderr=boot_log, text=True)
        addr = read_bootstrap_address(boot, 60)
        if addr is None:
            stop_processes([boot])
            raise RuntimeError(f"the hivemind bootstrap printed no address; see {workdir / 'bootstrap.log'}")
        return boot, addr

    def peer_argv(i: int, addr: str, listen: str) -> list[str]:
        return [
            *peer, "--index", str(i), "--peers", addr, "--listen", listen,
            "--workdir", str(workdir), "--out", str(workdir / f"peer{i}.jsonl"),
            "--model", settings.model, "--split", settings.split, "--batch-size", str(settings.batch_size),
            "--target-batch-size", str(settings.batch_size * settings.nodes), "--steps", str(steps),
            "--lr", str(settings.lr), "--momentum", str(settings.momentum), "--optimizer", settings.optimizer,
            "--compression", compression,
        ]  # fmt: skip

    return run_swarm(
        rate, workdir, settings.nodes, start_boot, peer_argv, _hivemind_points, timeout, target, "the hivemind run"
    )


def _hivemind_points(workdir: Path, nodes: int) -> tuple[Points, int]:
    rows = []
    for i in range(nodes):
        path = workdir / f"peer{i}.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        rows.append([json.loads(x) for x in lines if x.endswith("}")])
    done = min((node[-1]["step"] if node else 0) for node in rows)
    return [[(r["t"], r["accuracy"]) for r in node] for node in rows], done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="50mbit,10mbit")
    ap.add_argument("--codecs", default="none,int8", help="P2P-FT codecs to run")
    ap.add_argument(
        "--syncs",
        default="wait",
        help="P2P-FT paces to run with each codec: wait (lockstep), async (--sync async: a round mixes the "
        "pushed mass that has arrived instead of waiting for it)",
    )
    ap.add_argument("--hivemind-compression", default="fp16", help="none or fp16; empty to skip hivemind")
    ap.add_argument("--model", default="vit_digits_s")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.001)
    ap.add_argument("--optimizer", default="adam", help="sgd or adam, for both sides")
    ap.add_argument("--round-timeout", type=float, default=30.0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per run")
    ap.add_argument("--workdir", default="/tmp/p2pnode-wan")
    ap.add_argument("--json", default=None)
    ap.add_argument("--stop-at-target", action="store_true", help="end each run once every node reached the target")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    base = TestnetSettings(
        model=args.model,
        epochs=args.epochs,
        lr=args.lr,
        optimizer=args.optimizer,
        round_timeout=args.round_timeout,
        run_id="wan",
    ).validate()
    sim = Simulation(base)
    central = sim.run("central")
    per_pass = math.ceil(sum(len(part) for part in sim.parts) / (base.batch_size * base.nodes))
    target = 0.95 * central.accuracy[0]
    print(f"central fine-tuning: {100 * central.accuracy[0]:.1f}%; target {100 * target:.1f}%", flush=True)
    stop = target if args.stop_at_target else None
    rows = []
    for rate in args.rates.split(","):
        runs: list[tuple[str, dict]] = []
        for codec in [c for c in args.codecs.split(",") if c]:
            for sync in args.syncs.split(","):
                chosen = {"codec": codec, "sync": sync, "pace_batch": None}  # pacing: the default of each --sync
                settings = TestnetSettings(**{**base.__dict__, **chosen}).validate()
                workdir = Path(args.workdir) / f"{rate}-p2pft-{codec.replace(':', '')}-{sync}"
                name = f"P2P-FT {codec}" + (f" {sync}" if sync != "wait" else "")
                runs.append((name, run_p2pft(settings, rate, workdir, args.timeout, stop)))
                _print(rate, *runs[-1], target)
        if args.hivemind_compression:
            steps = args.epochs * per_pass  # P2P-FT's rounds: the same samples, 4 x batch-size a step
            workdir = Path(args.workdir) / f"{rate}-hivemind"
            name = f"hivemind {args.hivemind_compression}"
            compression = args.hivemind_compression
            runs.append((name, run_hivemind(base, rate, workdir, steps, compression, args.timeout, stop)))
            _print(rate, *runs[-1], target)
        for name, r in runs:
            rows.append(
                {
                    "rate": rate,
                    "method": name,
                    "seconds_to_target": time_to(r["points"], target),
                    "rounds": r["rounds"],
                    "seconds_per_round": seconds_per_round(r),
                    "mb_sent_per_node": statistics.median(r["sent"]) / 1e6,
                    "final_accuracy": r["final"],
                    "points": r["points"],
                }
            )
    if args.json:
        Path(args.json).write_text(json.dumps({"target": target, "central": central.accuracy[0], "rows": rows}))


def _print(rate: str, name: str, r: dict, target: float) -> None:
    t = time_to(r["points"], target)
    took = f"{t:.0f} s" if t is not None else "not reached"
    final = " ".join(f"{100 * a:.1f}" for a in r["final"])
    mb = statistics.median(r["sent"]) / 1e6
    per_round = seconds_per_round(r)
    print(
        f"{rate:>8} {name:<24} to target: {took:>12}  rounds {r['rounds']}  {per_round:.2f} s/round  "
        f"{mb:.0f} MB/node  final {final}"
    )


def seconds_per_round(r: dict) -> float:
    """Training seconds per round (or swarm step) up to the last evaluation every node made."""
    last = max((node[-1][0] for node in r["points"] if node), default=math.nan)
    return last / r["rounds"] if r["rounds"] else math.nan


if __name__ == "__main__":
    with sigterm_as_exit():  # a killed bench still removes its namespaces
        main()
