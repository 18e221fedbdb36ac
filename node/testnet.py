"""`p2pnode testnet`: a bootstrap peer and N `p2pnode start` processes on 127.0.0.1.

It shows each node's progress, prints the same per-node table as `simulate`, writes the same JSON
schema, and tears every process down however the run ends.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from .data import parse_split
from .errors import BadInput
from .settings import RunSettings, TestnetSettings, to_flags
from .simulator import AlgorithmResult, SimulationResult

logger = logging.getLogger(__name__)

# (node, round, rounds, accuracy or None)
ProgressCallback = Callable[[int, int, int, float | None], None]
LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2pnode.cli.app", *args]


def start_bootstrap(run_id: str, log: Path, timeout: float = 60.0) -> tuple[subprocess.Popen, list[str]]:
    """Start `p2pnode bootstrap` on loopback; return the process and the multiaddrs it printed."""
    proc = subprocess.Popen(
        cli_command("bootstrap", "--listen", LOOPBACK, "--run-id", run_id),
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    addrs: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline().strip()
            if "/p2p/" in line:
                addrs.append(line)
                break
    if not addrs:
        stop_processes([proc])
        raise RuntimeError(f"the bootstrap peer printed no address within {timeout:.0f} s; see {log}")
    return proc, addrs


def format_class_set(classes: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2+5' (what --classes parses)."""
    runs: list[list[int]] = []
    for c in sorted(classes):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return "+".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


def node_command(settings: TestnetSettings, index: int, peers: list[str], state_dir: Path) -> list[str]:
    """The `p2pnode start` command of node `index` (also what docker-compose.yml runs)."""
    split = parse_split(settings.split)
    data_flags = ["--classes", format_class_set(split[index])] if isinstance(split, list) else []
    return cli_command(
        "start",
        *to_flags(settings, RunSettings),
        "--run-id",
        settings.run_id,
        "--index",
        str(index),
        *data_flags,
        "--peers",
        ",".join(peers),
        "--listen",
        LOOPBACK,
        "--state-dir",
        str(state_dir),
        "--identity",
        str(state_dir / "node.key"),
        "--round-timeout",
        str(settings.round_timeout),
        "--checkpoint-every",
        "5",
    )


def stop_processes(procs: list[subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM, wait up to `grace` seconds in all, then SIGKILL whatever is left."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_testnet(settings: TestnetSettings, on_progress: ProgressCallback | None = None) -> SimulationResult:
    s = settings
    if s.algorithm == "central":
        raise BadInput("central is the single-node reference: compare against it with `p2pnode simulate`")
    workdir = Path(s.workdir or tempfile.mkdtemp(prefix="p2pnode-testnet-"))
    workdir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    try:
        boot, addrs = start_bootstrap(s.run_id, workdir / "bootstrap.log")
        procs.append(boot)
        # N daemons share this machine's cores: one torch thread pool each would oversubscribe them
        threads = max(1, (os.cpu_count() or 1) // s.nodes)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        nodes = []
        for i in range(s.nodes):
            state = workdir / f"node{i}"
            state.mkdir(exist_ok=True)
            for stale in ("result.json", "progress.json", "state.json", "state.safetensors"):
                (state / stale).unlink(missing_ok=True)
            log = (workdir / f"node{i}.log").open("w")
            nodes.append(
                subprocess.Popen(node_command(s, i, addrs, state), stdout=log, stderr=subprocess.STDOUT, env=env)
            )
        procs += nodes
        deadline = time.monotonic() + s.timeout
        results: dict[int, dict] = {}
        while len(results) < s.nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the testnet did not finish within {s.timeout:.0f} s; logs in {workdir}")
            for i, p in enumerate(nodes):
                if i in results:
                    continue
                found = _read_json(workdir / f"node{i}" / "result.json")
                if found is not None:
                    results[i] = found
                    continue
                if p.poll() is not None:
                    tail = (workdir / f"node{i}.log").read_text().strip().splitlines()[-3:]
                    raise RuntimeError(f"node {i} exited with code {p.returncode}: {' | '.join(tail)}")
                progress = _read_json(workdir / f"node{i}" / "progress.json")
                if progress and on_progress:
                    on_progress(i, progress["round"], progress["rounds"], progress["accuracy"])
            time.sleep(0.5)
        for i, r in results.items():
            if on_progress:
                on_progress(i, r["rounds"], r["rounds"], r["accuracy"])
    finally:
        stop_processes(procs)
    ordered = [results[i] for i in range(s.nodes)]
    history = {
        "epoch": ordered[0]["history"]["epoch"],
        "accuracy": [list(a) for a in zip(*(r["history"]["accuracy"] for r in ordered), strict=True)],
        "loss": [list(a) for a in zip(*(r["history"]["loss"] for r in ordered), strict=True)],
    }
    algo = AlgorithmResult(
        accuracy=[r["accuracy"] for r in ordered],
        bytes_sent=[r["bytes_sent"] for r in ordered],
        messages_sent=[r["messages_sent"] for r in ordered],
        iterations=ordered[0]["rounds"],
        seconds=max(r["seconds"] for r in ordered),
        history=history,
        bytes_per_epoch=[r["bytes_per_epoch"] for r in ordered],
        messages_per_epoch=[r["messages_per_epoch"] for r in ordered],
    )
    shared = {f.name: getattr(s, f.name) for f in fields(TestnetSettings)}
    results = {s.algorithm: algo}
    if s.compare:  # references the daemons cannot run (central) or that are not the point: in-process
        from .simulator import Simulation

        sim = Simulation(s)
        results.update({name: sim.run(name) for name in s.compare if name != s.algorithm})
    sources = {name: "daemons" if name == s.algorithm else "simulated" for name in results}
    return SimulationResult({**shared, "workdir": str(workdir), "sources": sources}, results, ordered[0]["fingerprint"])
