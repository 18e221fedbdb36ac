"""`p2pnode testnet`: a bootstrap peer and N `p2pnode start` processes, on 127.0.0.1 or each on its
own namespaced host of an emulated internet (`--hosts netns`, with `--rate`, `--loss` and `--nat`).

It shows each node's progress, prints the same per-node table as `simulate`, writes the same JSON
schema, and tears every process down however the run ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from .churn import ChurnEvent, initial_members, parse_churn
from .data import parse_split
from .errors import BadInput, RunFailed
from .netlab import exited_unreaped
from .saved_models import save_simulation_run, save_state_dirs, set_aside_saved_models
from .settings import RunSettings, TestnetSettings, parse_slow, to_flags
from .simulator import AlgorithmResult, SimulationResult
from .state_store import RUN_FILES, set_aside_run_files

if TYPE_CHECKING:
    from types import FrameType

    from .netlab import Host

logger = logging.getLogger(__name__)

# (node, round, rounds, accuracy or None)
ProgressCallback = Callable[[int, int, int, float | None], None]
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
NODE_FILES = (*RUN_FILES, "events.jsonl")  # what one testnet leaves in a node's folder (its log sits beside it)


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "p2pnode.cli.app", *args]


class Hosts:
    """Where a testnet's peers run: every one on 127.0.0.1 (this class), or each on its own host
    (`NamespacedHosts`). `name` is "boot" for the bootstrap peer and "n<i>" for node i."""

    def listen(self, name: str) -> str:
        return LOOPBACK

    def popen(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(argv, **kw)

    def close(self) -> None:
        pass


class NamespacedHosts(Hosts):
    """Each peer on its own network-namespace host of a `NetLab` (DESIGN §11): links shaped to `rate`,
    `loss` percent of arriving packets dropped, and nodes 0..nat-1 each behind its own masquerading
    router, so that nobody can dial them. Hosts are made on first use; `close` removes everything."""

    def __init__(self, rate: str | None = None, loss: float = 0.0, nat: int = 0) -> None:
        from .netlab import NetLab, netlab_available

        ok, why = netlab_available(nft=loss > 0 or nat > 0, tc=rate is not None)
        if not ok:
            raise BadInput(f"--hosts netns cannot build the emulated network here: {why}; use --hosts loopback")
        self.nat = nat
        self.lab = NetLab(prefix="testnet", rate=rate, loss=loss)
        self.lab.start()
        self.hosts: dict = {}

    def host(self, name: str) -> Host:
        if name not in self.hosts:
            node = int(name[1:]) if name.startswith("n") else None
            router = self.lab.add_nat_router(f"r{node}") if node is not None and node < self.nat else None
            self.hosts[name] = self.lab.add_host(name, behind=router)
        return self.hosts[name]

    def listen(self, name: str) -> str:
        return f"/ip4/{self.host(name).address}/tcp/0"

    def popen(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        kw.pop("start_new_session", None)  # a host always starts its commands in their own session
        return self.host(name).popen(argv, **kw)

    def close(self) -> None:
        self.lab.close()


def make_hosts(settings: TestnetSettings) -> Hosts:
    if settings.hosts == "netns":
        return NamespacedHosts(settings.rate, settings.loss, settings.nat)
    return Hosts()


def start_bootstrap(
    run_id: str, log: Path, timeout: float = 60.0, owner: str | None = None, hosts: Hosts | None = None
) -> tuple[subprocess.Popen, list[str]]:
    """Start `p2pnode bootstrap` (on loopback, or on `hosts`' host "boot"; for a closed run: with its
    `owner` key); return the process and the multiaddrs it printed."""
    hosts = hosts or Hosts()
    argv = cli_command("bootstrap", "--listen", hosts.listen("boot"), "--run-id", run_id)
    proc = hosts.popen(
        "boot",
        [*argv, *(["--owner", owner] if owner else [])],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        start_new_session=True,  # its own group, which `stop_processes` can end with its p2pd
    )
    try:
        addr = read_bootstrap_address(proc, timeout)
    except BaseException:  # Ctrl-C or SIGTERM while it starts: its own session does not get the signal
        stop_processes([proc])
        raise
    if addr is None:
        stop_processes([proc])
        raise RunFailed(f"the bootstrap peer printed no address within {timeout:.0f} s; see {log}")
    return proc, [addr]


def read_bootstrap_address(proc: subprocess.Popen, timeout: float) -> str | None:
    """The first full multiaddr (with /p2p/) that a starting `bootstrap` prints on its stdout, or None
    if it prints none within `timeout` seconds or exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline().strip()
            if "/p2p/" in line:
                return line
    return None


def format_class_set(classes: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2+5' (what --classes parses)."""
    runs: list[list[int]] = []
    for c in sorted(classes):
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return "+".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


def node_command(
    settings: TestnetSettings,
    index: int,
    peers: list[str],
    state_dir: Path,
    members_to_start: int | None = None,
    joiner: bool = False,
    owner: str | None = None,
    listen: str = LOOPBACK,
) -> list[str]:
    """The `p2pnode start` command of node `index` (also what docker-compose.yml runs).

    A joiner (a node that enters a run in progress) gets no --index: it is appended to the members.
    Nodes past the --split's class sets take them again from the start (node 4 of a 4-set split: set 0).
    In a closed run (`owner`), the node's key and invitation are `node.key` and `invite.json` in its
    state directory (see `invite_nodes`)."""
    split = parse_split(settings.split)
    data_flags = ["--classes", format_class_set(split[index % len(split)])] if isinstance(split, list) else []
    shared = to_flags(settings, RunSettings)
    slow = parse_slow(settings.slow, settings.nodes)
    if members_to_start is not None:
        at = shared.index("--nodes")
        shared[at + 1] = str(members_to_start)
    return cli_command(
        "start",
        *shared,
        "--run-id",
        settings.run_id,
        *([] if joiner else ["--index", str(index)]),
        *data_flags,
        "--peers",
        ",".join(peers),
        "--listen",
        listen,
        "--state-dir",
        str(state_dir),
        "--identity",
        str(state_dir / "node.key"),
        "--round-timeout",
        str(settings.round_timeout),
        "--checkpoint-every",
        "5",
        "--heartbeat",
        "2",
        *(["--owner", owner, "--invite", str(state_dir / "invite.json")] if owner else []),
        *(["--slowdown", str(slow[index])] if index in slow else []),
    )


def invite_nodes(workdir: Path, state_dirs: list[Path], run_id: str) -> str:
    """Close a testnet's run: an owner key in `workdir` (kept between runs), and for each node a key
    and an invitation in its state directory. Returns the owner's public key."""
    from ..protocol.admission import generate_key_file, load_private_key, make_invitation, peer_id_of, public_key_token

    owner_path = workdir / "owner.key"
    owner = load_private_key(owner_path) if owner_path.exists() else generate_key_file(owner_path)
    for state in state_dirs:
        state.mkdir(parents=True, exist_ok=True)
        key_path = state / "node.key"
        key = load_private_key(key_path) if key_path.exists() else generate_key_file(key_path)
        invitation = make_invitation(owner, run_id, peer_id_of(key.public_key()), time.time() + 7 * 86400)
        (state / "invite.json").write_text(invitation.to_json() + "\n")
    return public_key_token(owner.public_key())


def stop_processes(procs: list[subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM each process, give them `grace` seconds in all, then SIGKILL the process group of each one
    still running: a node killed alone would leave its p2pd and DHT process running. A process that
    exited in time is left to its children's own shutdown (p2pd removes its socket as it exits)."""
    for p in procs:
        if p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        while not exited_unreaped(p) and time.monotonic() < deadline:
            time.sleep(0.05)
    for p in procs:
        if not exited_unreaped(p):  # unreaped, its pid is still ours: its group cannot be someone else's
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)  # not a group leader (no new session): nothing to kill here
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        p.wait(5)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _events(state_dir: Path) -> list[dict]:
    from .events import read_events

    path = state_dir / "events.jsonl"
    return read_events(path) if path.is_file() else []


def _eval_history(state_dir: Path) -> list[dict]:
    """The `eval` events a node wrote (one per pass over the data), also for nodes that crashed."""
    return [e for e in _events(state_dir) if e.get("kind") == "eval"]


class _Fleet:
    """The testnet's node processes, with the churn actions applied to them."""

    def __init__(
        self, s: TestnetSettings, workdir: Path, addrs: list[str], total: int, initial: list[int], hosts: Hosts
    ) -> None:
        self.s, self.workdir, self.addrs, self.hosts = s, workdir, addrs, hosts
        threads = max(1, (os.cpu_count() or 1) // max(1, len(initial)))  # one torch pool each would oversubscribe
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.procs: dict[int, subprocess.Popen] = {}
        self.retired: list[subprocess.Popen] = []
        self.initial = initial
        self.total = total
        self.status = dict.fromkeys(range(total), "out")  # out, in, left, crashed
        self.log_files: list = []
        self.applied: list[tuple[ChurnEvent, float]] = []  # (event, seconds after training started)
        self.owner: str | None = None  # a closed run's owner key

    def state(self, i: int) -> Path:
        return self.workdir / f"node{i}"

    def launch(self, i: int, joiner: bool, fresh: bool) -> None:
        state = self.state(i)
        state.mkdir(exist_ok=True)
        if fresh:  # a new member (a join of a node that left earlier in this run): nothing of its own to resume
            for stale in NODE_FILES:
                (state / stale).unlink(missing_ok=True)
        log = (self.workdir / f"node{i}.log").open("a")
        self.log_files.append(log)
        name = f"n{i}"
        command = node_command(
            self.s,
            i,
            self.addrs,
            state,
            members_to_start=len(self.initial),
            joiner=joiner,
            owner=self.owner,
            listen=self.hosts.listen(name),
        )
        self.procs[i] = self.hosts.popen(
            name, command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        self.status[i] = "in"

    def apply(self, event: ChurnEvent) -> None:
        i, proc = event.node, self.procs.get(event.node)
        logger.info("churn: %s", event)
        if event.action == "crash" and proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the machine is gone, p2pd with it
            self.retired.append(self.procs.pop(i))
            self.status[i] = "crashed"
        elif event.action == "leave" and proc is not None:
            proc.send_signal(signal.SIGTERM)
            self.retired.append(self.procs.pop(i))
            self.status[i] = "left"
        elif event.action == "join":
            self.launch(i, joiner=True, fresh=True)
        elif event.action == "rejoin":
            self.launch(i, joiner=True, fresh=False)  # same identity and state dir: its checkpoint

    def all_processes(self) -> list[subprocess.Popen]:
        return [*self.procs.values(), *self.retired]

    def close(self) -> None:
        for f in self.log_files:
            f.close()


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Within the block, SIGTERM raises SystemExit (as Ctrl-C raises KeyboardInterrupt), so that `finally`
    blocks tear down what they built (processes, namespaces) however the run is ended. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_testnet(
    settings: TestnetSettings, on_progress: ProgressCallback | None = None, save: str | Path | None = None
) -> SimulationResult:
    """Run the testnet; with `save`, write each node's final parameters there (`p2pnode attention` reads them)."""
    with sigterm_as_exit():
        return _run_testnet(settings, on_progress, save)


def _run_testnet(
    settings: TestnetSettings, on_progress: ProgressCallback | None, save: str | Path | None
) -> SimulationResult:
    s = settings
    if s.algorithm == "central":
        raise BadInput("central is the single-node reference: compare against it with `p2pnode simulate`")
    events = parse_churn(s.churn, s.nodes + MAX_EXTRA_JOINERS, seconds=True)
    total = max([s.nodes - 1, *(e.node for e in events)]) + 1
    firsts: dict[int, ChurnEvent] = {}
    for e in events:
        firsts.setdefault(e.node, e)
    for node, e in firsts.items():
        if node >= s.nodes and e.action != "join":
            raise BadInput(f"--churn event {e}: node {node} is past --nodes {s.nodes}, so its first event must be join")
    initial = [i for i in initial_members(events, total) if i < s.nodes]
    workdir = make_workdir(s.workdir, total)
    boot = None
    fleet: _Fleet | None = None
    hosts = make_hosts(s)
    stopped = False  # by Ctrl-C or SIGTERM
    try:
        owner = invite_nodes(workdir, [workdir / f"node{i}" for i in range(total)], s.run_id) if s.closed else None
        boot, addrs = start_bootstrap(s.run_id, workdir / "bootstrap.log", owner=owner, hosts=hosts)
        fleet = _Fleet(s, workdir, addrs, total, initial, hosts)
        fleet.owner = owner
        for i in range(total):  # a reused --workdir: the last testnet's files are kept, out of this run's way
            set_aside_run_files(fleet.state(i), "a new testnet starts afresh", NODE_FILES)
        for i in initial:
            fleet.launch(i, joiner=False, fresh=True)
        results = _watch(s, fleet, events, on_progress)
    except (KeyboardInterrupt, SystemExit):
        stopped = True
        raise
    finally:
        procs = [boot] if boot is not None else []
        try:
            stop_processes(procs + (fleet.all_processes() if fleet else []))
            if fleet is not None:
                fleet.close()
        finally:
            hosts.close()
            if stopped and s.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    result = _collect(s, workdir, fleet, results, events, save)
    if s.workdir is None:  # nobody asked to keep the run's files: the result has what it found there
        shutil.rmtree(workdir, ignore_errors=True)
        result.settings["workdir"] = None
    return result


def make_workdir(workdir: str | None, nodes: int) -> Path:
    """The testnet's folder with a `nodeI` state directory for each node: `workdir`, created if missing
    (BadInput if it cannot be), or a new temporary one, deleted once the run has succeeded or was
    stopped (a failed run's logs stay there, and its error names the folder)."""
    path = Path(tempfile.mkdtemp(prefix="p2pnode-testnet-")) if workdir is None else Path(workdir)
    try:
        for i in range(nodes):
            (path / f"node{i}").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        candidates = [*reversed(path.parents), path, *(path / f"node{i}" for i in range(nodes))]
        blocking = next((p for p in candidates if p.exists() and not p.is_dir()), None)
        where = f" ({blocking} is a file)" if blocking else ""
        raise BadInput(
            f"cannot use --workdir {path}: {e.strerror or e}{where}; give a directory (created if missing)"
        ) from None
    return path


MAX_EXTRA_JOINERS = 16  # node ids past --nodes that --churn may introduce with `join`


def _training_started(fleet: _Fleet) -> bool:
    return any((fleet.state(i) / "progress.json").exists() or _entered(fleet.state(i)) for i in fleet.initial)


def _entered(state: Path) -> bool:
    path = state / "events.jsonl"
    return path.is_file() and b'"epoch_change"' in path.read_bytes()


def _watch(
    s: TestnetSettings, fleet: _Fleet, events: list[ChurnEvent], on_progress: ProgressCallback | None
) -> dict[int, dict]:
    """Apply churn on time and wait until every node still in the run has written result.json."""
    deadline = time.monotonic() + s.timeout
    t0: float | None = None
    todo = list(events)
    results: dict[int, dict] = {}
    while True:
        now = time.monotonic()
        if now > deadline:
            raise RunFailed(
                f"the testnet did not finish within {s.timeout:.0f} s ({_standing(fleet)}); logs in {fleet.workdir}"
            )
        if t0 is None and _training_started(fleet):
            t0 = now  # churn is timed from the start of training, not of the processes
        while t0 is not None and todo and now - t0 >= todo[0].when:
            event = todo.pop(0)
            fleet.apply(event)
            fleet.applied.append((event, now - t0))
        running = [i for i, st in fleet.status.items() if st == "in"]
        for i in running:
            if i in results:
                continue
            found = _read_json(fleet.state(i) / "result.json")
            if found is not None:
                results[i] = found
                continue
            p = fleet.procs[i]
            if p.poll() is not None:
                tail = (fleet.workdir / f"node{i}.log").read_text().strip().splitlines()[-3:]
                if "has finished" in " ".join(tail):  # a churn joiner that came after the run's end
                    logger.warning("node %d came too late: the run had finished", i)
                    fleet.status[i] = "late"
                    continue
                if p.returncode == 2 and tail and tail[-1].startswith("error: "):  # its own one-line error
                    log = fleet.workdir / f"node{i}.log"
                    raise BadInput(f"node {i} stopped: {tail[-1].removeprefix('error: ')} (log: {log})")
                raise RunFailed(f"node {i} exited with code {p.returncode}: {' | '.join(tail)}")
            progress = _read_json(fleet.state(i) / "progress.json")
            if progress and on_progress:
                on_progress(i, progress["round"], progress["rounds"], progress["accuracy"])
        running = [i for i, st in fleet.status.items() if st == "in"]
        if running and all(i in results for i in running):
            if todo:  # timed after the run's end: nobody is left to crash, leave or join
                logger.warning("the run finished before --churn %s: not applied", ",".join(map(str, todo)))
            break
        time.sleep(0.5)
    for i, r in results.items():
        if on_progress:
            on_progress(i, r["rounds"], r["rounds"], r["accuracy"])
    return results


def _standing(fleet: _Fleet) -> str:
    """Where each node stands, for the timeout error: its status, its last evaluated round and epoch."""
    parts = []
    for i, status in fleet.status.items():
        progress = _read_json(fleet.state(i) / "progress.json") or {}
        epochs = [e for e in _events(fleet.state(i)) if e.get("kind") == "epoch_change"]
        where = f"round {progress['round']}/{progress['rounds']}" if "round" in progress else "no pass done"
        epoch = f"epoch {epochs[-1]['epoch']} of {len(epochs[-1]['members'])}" if epochs else "no epoch"
        parts.append(f"node {i} {status}, {where}, {epoch}")
    return "; ".join(parts)


def _collect(
    s: TestnetSettings,
    workdir: Path,
    fleet: _Fleet,
    results: dict[int, dict],
    events: list[ChurnEvent],
    save: str | Path | None = None,
) -> SimulationResult:
    total = fleet.total
    evals = {i: _eval_history(fleet.state(i)) for i in range(total)}
    took_part = [i for i in range(total) if evals[i] or i in results]
    epochs_seen = sorted({e["epoch"] for i in took_part for e in evals[i]})
    by_epoch = {i: {e["epoch"]: e for e in evals[i]} for i in took_part}
    accuracy_rows = [
        [by_epoch[i][ep]["accuracy"] if ep in by_epoch[i] else None for i in range(total) if i in took_part]
        for ep in epochs_seen
    ]
    loss_rows = [
        [by_epoch[i][ep]["loss"] if ep in by_epoch[i] else None for i in range(total) if i in took_part]
        for ep in epochs_seen
    ]
    final = []
    for i in took_part:
        if i in results:
            final.append(results[i]["accuracy"])
        else:
            final.append(evals[i][-1]["accuracy"] if evals[i] else None)
    reference = next(iter(results.values()))
    history = {"epoch": epochs_seen, "accuracy": accuracy_rows, "loss": loss_rows}
    if events:
        history["membership"], history["presence"] = _membership(fleet, epoch_changes(results), took_part)
        history["churn"] = [{"event": str(e), "at_seconds": round(t, 1)} for e, t in fleet.applied]
        history["round_seconds"] = _round_seconds(evals, results)
    sent = [results[i]["bytes_sent"] if i in results else 0 for i in took_part]
    algo = AlgorithmResult(
        accuracy=final,
        bytes_sent=sent,
        messages_sent=[results[i]["messages_sent"] if i in results else 0 for i in took_part],
        iterations=reference["rounds"],
        seconds=max(r["seconds"] for r in results.values()),
        history=history,
        bytes_per_epoch=[b / s.epochs for b in sent],
        messages_per_epoch=[(results[i]["messages_sent"] if i in results else 0) / s.epochs for i in took_part],
        steps=_gradients(results, took_part),
        seconds_per_round=[_seconds_per_round(results.get(i)) for i in took_part],
    )
    shared = {f.name: getattr(s, f.name) for f in fields(TestnetSettings)}
    if events:
        shared["nodes"], shared["node_ids"] = len(took_part), took_part
    out = {s.algorithm: algo}
    if save is not None:
        set_aside_saved_models(save)
        save_state_dirs(save, {i: fleet.state(i) for i in took_part})  # the daemons, named by node
    if s.compare:  # references the daemons cannot run (central) or that are not the point: in-process
        from .simulator import Simulation

        sim = Simulation(s)
        for name in s.compare:
            if name != s.algorithm:
                out[name] = sim.run(name)
                if save is not None:
                    save_simulation_run(save, sim, name)
    sources = {name: "daemons" if name == s.algorithm else "simulated" for name in out}
    return SimulationResult({**shared, "workdir": str(workdir), "sources": sources}, out, reference["fingerprint"])


def epoch_changes(results: dict[int, dict]) -> list[dict]:
    """The run's epoch changes from the finishing nodes' results, in epoch order. A node that joined
    or came back late saw only the epochs after its entry, and its own entry without itself as a
    joiner: merge what all saw, preferring the nodes that saw the most."""
    seen: dict[int, dict] = {}
    for r in sorted(results.values(), key=lambda r: -len(r.get("epochs", []))):
        for change in r.get("epochs", []):
            seen.setdefault(change["epoch"], change)
    return [seen[k] for k in sorted(seen)]


def _membership(fleet: _Fleet, changes: list[dict], took_part: list[int]) -> tuple[list[dict], dict]:
    """The epoch changes a finishing node saw, in node ids (as the simulator reports them), and when
    each node was in the run: {node: [[from_round, to_round or None], ...]}."""
    from .events import read_events

    runs: dict[int, list[tuple[str, int]]] = {}  # node -> (peer id, round it entered) per process it ran
    for i in took_part:
        path = fleet.state(i) / "events.jsonl"
        peer, entered = None, False
        for e in read_events(path) if path.is_file() else []:
            if e["kind"] == "start":
                peer, entered = e.get("peer_id"), False
            elif e["kind"] == "epoch_change" and not entered and peer is not None:
                runs.setdefault(i, []).append((peer, e["start_round"]))
                entered = True
    node_of = {peer: i for i, entries in runs.items() for peer, _ in entries}
    crashed = {e.node for e, _ in fleet.applied if e.action == "crash"}
    membership, presence = [], {str(i): [] for i in took_part}
    for change in changes:
        members = [node_of.get(p, -1) for p in change["members"]]
        left = [node_of.get(p, -1) for p in change["left"]]
        joined = [node_of.get(p, -1) for p in change["joined"]]
        membership.append(
            {
                "round": change["round"],
                "epoch": change["epoch"],
                "members": members,
                "joined": [i for i in joined if i not in crashed],
                "rejoined": [i for i in joined if i in crashed],
                "left": [i for i in left if i not in crashed],
                "crashed": [i for i in left if i in crashed],
            }
        )
    for i, entries in runs.items():
        for peer, start in entries:
            end = next((c["round"] for c in changes if c["round"] > start and peer in c["left"]), None)
            presence[str(i)].append([start, end])
    return membership, presence


def _gradients(results: dict[int, dict], took_part: list[int]) -> list[int]:
    """Each node's gradients computed (0 for one that did not finish), where every finished node counted
    them (every daemon does; a result without the count, from an older release, leaves them all out)."""
    if not all("gradients" in r for r in results.values()):
        return []
    return [results[i]["gradients"] if i in results else 0 for i in took_part]


def _seconds_per_round(result: dict | None) -> float | None:
    """A finished node's time in rounds over its rounds; None for a node that did not finish."""
    if not result or not result.get("rounds") or "round_seconds" not in result:
        return None
    return result["round_seconds"] / result["rounds"]


def _round_seconds(evals: dict[int, list[dict]], results: dict[int, dict]) -> list[dict]:
    """Seconds per round between consecutive evaluations of the nodes that finished (median over
    them): shows how a crash or a join changed the pace of the run."""
    import statistics

    spans: dict[int, list[float]] = {}
    for i in results:
        for a, b in zip(evals[i], evals[i][1:], strict=False):
            if b["round"] > a["round"]:
                spans.setdefault(b["round"], []).append((b["t"] - a["t"]) / (b["round"] - a["round"]))
    return [{"round": r, "seconds_per_round": statistics.median(v)} for r, v in sorted(spans.items())]
