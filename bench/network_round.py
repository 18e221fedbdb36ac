"""One P2P-FT communication round against one hivemind DecentralizedAverager step, on loopback, 4 peers.

How to run
----------
From the repository root::

    .venv/bin/python bench/network_round.py                                  # all codecs, directed-ring
    .venv/bin/python bench/network_round.py --topology directed-ring,exponential --json results/net.json
    .venv/bin/python bench/network_round.py --rounds 3 --codecs none,int8 --mode one-process   # quick

The default run takes about a minute on a 2-core machine; both topologies about two.

What it measures
----------------
The vector is the trainable part of ``vit_small_patch16_224`` as a node fine-tunes it (10 classes, last block,
final norm and head): 1,779,082 float32 values drawn from N(0, 1), a different one per peer.

(a) P2P-FT. Four ``hivemind.P2P`` daemons on 127.0.0.1, each with its own ``protocol.links.Links`` (one libp2p
    stream per frame, a one-byte ack after the receiver has handled it). A round is the two phases of one
    P2P-FT iteration, as the daemon runs them: in the pull phase every node encodes its vector once with the
    codec and packs one ``Envelope`` per out-neighbour; in the push phase it encodes and packs once per
    out-neighbour (push messages are per link). All nodes send to all their out-neighbours concurrently; a
    receiver runs ``unpack`` + ``decode_tensors`` before it acks, so the decode cost is in the round. The next
    phase starts when every node has received and decoded every in-neighbour's message. Encoding, packing
    and decoding run in a 2-thread pool per node, like the daemon's. Round time = start of phase 1 to end of
    phase 2; the median over ``--rounds`` rounds after ``--warmup`` warm-up rounds is reported, per codec and
    topology. ``--mode`` runs the four nodes in this process (one event loop: "1 process"), each in its own
    spawned process driven over a pipe ("1 process per node"; the pipe round trips are inside the timing), or
    both (default). Bytes = what ``Links`` counts on the wire (packed frame + 8-byte length header) per node and
    round; the raw float32 payload is printed for reference.

(b) hivemind. Four ``hivemind.DHT`` on 127.0.0.1 (the first bootstraps the others) and four
    ``DecentralizedAverager`` (``target_group_size=4``, ``min_matchmaking_time=--matchmaking``) averaging the
    same-sized vector. Each round, four threads call ``step(wait=False)`` together and poll the returned
    ``StepControl``; ``began_allreduce`` flips when a peer's group is assembled and its all-reduce starts.
    Full step = first ``step()`` call to the last peer done; all-reduce part = first peer starting its
    all-reduce to the last peer done (matchmaking excluded). Medians over the same number of rounds (after
    the warm-up rounds). Each round checks that all four peers end with the mean of the four vectors and that
    the group had all four peers. Its bytes per node are computed, not measured: hivemind's butterfly
    all-reduce sends (n-1)/n of the vector to the other reducers and returns (n-1)/n of averaged parts.

The ratio columns divide each median round by the averager's median full step and by its median all-reduce
part. The issue's target: a P2P-FT round at most a third of the averager's round time.

Caveats
-------
* Loopback only: every daemon listens on /ip4/127.0.0.1/tcp/0; NAT port mapping, AutoNAT and relays are off.
  No real network latency or bandwidth limit: this compares software overhead and bytes, not WAN time.
* All peers share one machine (2 cores on the reference box): p2pd daemons, encoders and decoders compete for
  CPU, so times depend on the load average (printed before and after). In "1 process" mode the four P2P-FT
  nodes also share one Python process (one GIL), while each hivemind averager and DHT runs in its own process.
* ``min_matchmaking_time`` is not a floor on the step: once ``target_group_size`` peers have joined, the leader
  starts the all-reduce at once, so with four prompt peers a step takes well under ``--matchmaking`` seconds.
* The averager's full step includes matchmaking (DHT lookups, joining the leader); its all-reduce part is the
  exchange of the data itself.
* The script checks that it leaves no p2pd process behind (its daemons carry a marker in their environment).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from hivemind.p2p import P2P, PeerID

from p2pnode.node.topology import Topology, make_topology
from p2pnode.protocol.codecs import Codec, get_codec
from p2pnode.protocol.envelope import MAX_MESSAGE_BYTES, Envelope, ProtocolError, decode_tensors, pack, unpack
from p2pnode.protocol.links import HEADER_LEN, Links

VIT_SMALL_TRAINABLE = (
    1_779_082  # vit_small_patch16_224, 10 classes, trainable_blocks=1 (build_model(...).num_trainable)
)
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
RUN_ID = "bench-network-round"
DEFAULT_CODECS = "none,fp16,bf16,int8,topk:0.1"
TAG_VAR = "P2PNODE_NETWORK_ROUND_TAG"
SEND_ATTEMPTS = 3  # a failed send (e.g. a stream reset before the ack) is retried inside the timed round
# Keep every daemon on loopback: no UPnP/NAT-PMP probing, no AutoNAT dial-backs, no relays.
P2P_KWARGS = dict(host_maddrs=[LOOPBACK], nat_port_map=False, auto_nat=False, use_relay=False)

logger = logging.getLogger("bench.network_round")


# --- bookkeeping ---------------------------------------------------------------------------------


def loadavg() -> tuple[float, float, float]:
    return os.getloadavg()


def p2pd_pids(tag: str | None = None) -> list[int]:
    """p2pd processes on this machine; with `tag`, only those started by this run (marker in their environment)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"hivemind_cli/p2pd" not in (entry / "cmdline").read_bytes():
                continue
            if tag is not None and f"{TAG_VAR}={tag}".encode() not in (entry / "environ").read_bytes().split(b"\0"):
                continue
        except OSError:  # gone, or not ours to read
            continue
        pids.append(int(entry.name))
    return sorted(pids)


def check_loopback(maddrs, who: str) -> None:
    for addr in maddrs:
        if not str(addr).startswith("/ip4/127.0.0.1/"):
            raise RuntimeError(f"{who} listens on {addr}, not on loopback only")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- (a) P2P-FT over Links -------------------------------------------------------------------------


class BenchNode:
    """One P2P-FT node: a P2P daemon, its Links, its vector, and counters of decoded messages per (round, phase)."""

    def __init__(self, index: int, p2p: P2P, vector: torch.Tensor) -> None:
        self.index, self.p2p, self.vector = index, p2p, vector
        self.peer_id = str(p2p.peer_id)
        self.pool = ThreadPoolExecutor(2, thread_name_prefix=f"bench-node{index}")  # like the daemon's _decode pool
        self.links: Links | None = None
        self.in_peers: list[str] = []
        self.out_peers: list[PeerID] = []
        self.heard: dict[tuple[int, str], set[str]] = defaultdict(set)  # senders decoded per (round, phase)
        self.events: dict[tuple[int, str], asyncio.Event] = defaultdict(asyncio.Event)
        self.errors: list[str] = []
        self.failed_sends = 0  # Links.send returned False; the frame was sent again

    async def start(self, send_timeout: float) -> None:
        self.links = await Links.create(
            self.p2p, RUN_ID, self.on_frame, max_bytes=MAX_MESSAGE_BYTES, timeout=send_timeout
        )

    def configure(self, in_peers: list[str], out_peers: list[str]) -> None:
        self.in_peers = list(in_peers)
        self.out_peers = [PeerID.from_base58(p) for p in out_peers]

    async def on_frame(self, data: bytes, peer: PeerID) -> bool:
        sender = str(peer)

        def receive() -> Envelope:
            env = unpack(data, run=RUN_ID, senders=self.in_peers)
            if env.sender != sender:
                raise ProtocolError(f"envelope claims sender {env.sender[-8:]} but came from {sender[-8:]}")
            decode_tensors(env)
            return env

        try:
            env = await asyncio.get_running_loop().run_in_executor(self.pool, receive)
        except ProtocolError as e:
            self.errors.append(str(e))
            return False
        key = (env.round, env.phase)
        self.heard[key].add(sender)  # a set: a frame re-sent after a lost ack is counted once
        if len(self.heard[key]) >= len(self.in_peers):
            self.events[key].set()
        return True

    def frames(self, codec: Codec, round_: int, phase: str) -> list[bytes]:
        """The frames this node sends in one phase, built as the daemon builds them."""

        def envelope(kind: str, name: str) -> Envelope:
            tensors = {name: codec.encode(self.vector)}
            return Envelope(RUN_ID, 0, round_, phase, round_, self.peer_id, kind, tensors)

        if phase == "pull":  # one encode, one envelope packed per out-neighbour
            env = envelope(*(("value", "v") if codec.name == "none" else ("copy", "d")))
            return [pack(env) for _ in self.out_peers]
        # push: running sums are per link, so one encode + pack per out-neighbour
        return [pack(envelope("delta", "delta")) for _ in self.out_peers]

    async def phase(self, codec: Codec, round_: int, phase: str, timeout: float = 120.0) -> None:
        """Send this node's messages of one phase and wait until all its in-neighbours' have been decoded."""
        assert self.links is not None
        frames = await asyncio.get_running_loop().run_in_executor(self.pool, self.frames, codec, round_, phase)

        async def deliver(peer: PeerID, frame: bytes) -> None:
            assert self.links is not None
            for _ in range(SEND_ATTEMPTS):
                if await self.links.send(peer, frame):
                    return
                self.failed_sends += 1
            raise RuntimeError(f"node {self.index}: {SEND_ATTEMPTS} sends failed in round {round_} {phase}")

        await asyncio.gather(*(deliver(p, f) for p, f in zip(self.out_peers, frames, strict=True)))
        key = (round_, phase)
        await asyncio.wait_for(self.events[key].wait(), timeout)
        self.events.pop(key, None)
        self.heard.pop(key, None)

    async def close(self) -> None:
        if self.links is not None:
            await self.links.shutdown()
        self.pool.shutdown(wait=True)
        try:
            await self.p2p.shutdown()
        except Exception as e:
            print(f"warning: P2P shutdown failed: {type(e).__name__}: {e}", file=sys.stderr)


def result_row(
    mode: str, spec: str, topo: Topology, times: list[float], per_node: list[float], failed: int, numel: int
) -> dict:
    raw = [2 * len(topo.out_neighbours(i)) * 4 * numel for i in range(topo.n)]
    row = {
        "method": f"P2P-FT ({mode})",
        "mode": mode,
        "codec": spec,
        "topology": topo.name,
        "round_s": times,
        "median_s": median(times),
        "bytes_per_node_round": statistics.mean(per_node),
        "bytes_per_node_round_each": per_node,
        "raw_float32_bytes_per_node_round": statistics.mean(raw),
        "frame_header_bytes": HEADER_LEN,
        "failed_sends_retried": failed,
    }
    print(
        f"  {row['method']:<24} {spec:>9} {topo.name:>13}: median {median(times):.3f} s "
        f"(min {min(times):.3f}, max {max(times):.3f}), {statistics.mean(per_node):,.0f} B/node/round"
        + (f", {failed} failed sends retried" if failed else ""),
        flush=True,
    )
    return row


async def p2pft_one_process(args: argparse.Namespace, vectors: list[torch.Tensor]) -> list[dict]:
    """All nodes in this process and event loop (one GIL; each node has its own 2-thread pool)."""
    n = len(vectors)
    nodes: list[BenchNode] = []
    results = []
    try:
        p2p = await P2P.create(**P2P_KWARGS)
        nodes.append(BenchNode(0, p2p, vectors[0]))
        bootstrap = await p2p.get_visible_maddrs()
        for i in range(1, n):
            nodes.append(BenchNode(i, await P2P.create(initial_peers=bootstrap, **P2P_KWARGS), vectors[i]))
        for node in nodes:
            check_loopback(await node.p2p.get_visible_maddrs(), f"P2P {node.index}")
            await node.start(args.send_timeout)
        round_ = 0  # unique across configurations, so (round, phase) keys never collide
        for topo_name in args.topology:
            topo = make_topology(topo_name, n)
            for node in nodes:
                node.configure(
                    [nodes[j].peer_id for j in topo.in_neighbours(node.index)],
                    [nodes[j].peer_id for j in topo.out_neighbours(node.index)],
                )
            for spec in args.codecs:
                codec = get_codec(spec)
                times = []
                for r in range(args.warmup + args.rounds):
                    if r == args.warmup:
                        sent_before = [node.links.bytes_sent for node in nodes]
                        failed_before = sum(node.failed_sends for node in nodes)
                    round_ += 1
                    start = time.perf_counter()
                    for phase in ("pull", "push"):
                        await asyncio.gather(*(node.phase(codec, round_, phase) for node in nodes))
                    if r >= args.warmup:
                        times.append(time.perf_counter() - start)
                per_node = [
                    (node.links.bytes_sent - b) / args.rounds for node, b in zip(nodes, sent_before, strict=True)
                ]
                failed = sum(node.failed_sends for node in nodes) - failed_before
                results.append(result_row("1 process", codec.spec, topo, times, per_node, failed, vectors[0].numel()))
        errors = [e for node in nodes for e in node.errors]
        if errors:
            raise RuntimeError(f"{len(errors)} frames were rejected, e.g. {errors[0]}")
        return results
    finally:
        for node in nodes:
            await node.close()


def _node_process(index: int, vector: torch.Tensor, bootstrap: list[str] | None, conn, send_timeout: float) -> None:
    """A child process holding one node; the parent drives it over `conn` (see `p2pft_processes`)."""
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        node = None
        try:
            p2p = await P2P.create(initial_peers=bootstrap, **P2P_KWARGS)
            node = BenchNode(index, p2p, vector)
            maddrs = [str(a) for a in await p2p.get_visible_maddrs()]
            check_loopback(maddrs, f"P2P {index}")
            await node.start(send_timeout)
            conn.send(("ready", node.peer_id, maddrs))
            while True:
                command, *params = await loop.run_in_executor(None, conn.recv)
                if command == "configure":
                    node.configure(*params)
                    conn.send(("ok",))
                elif command == "phase":
                    spec, round_, phase = params
                    await node.phase(get_codec(spec), round_, phase)
                    conn.send(("done", node.links.bytes_sent, node.failed_sends))
                elif command == "stop":
                    break
            if node.errors:
                raise RuntimeError(f"{len(node.errors)} frames were rejected, e.g. {node.errors[0]}")
        except Exception as e:
            conn.send(("error", f"node {index}: {type(e).__name__}: {e}"))
        finally:
            if node is not None:
                await node.close()
            conn.send(("closed",))

    asyncio.run(serve())


def p2pft_processes(args: argparse.Namespace, vectors: list[torch.Tensor]) -> list[dict]:
    """One process per node (spawned, so no forked thread pools), driven over pipes by this process."""
    ctx = mp.get_context("spawn")
    n = len(vectors)
    procs, conns, peer_ids = [], [], []

    def expect(conn, what: str):
        reply = conn.recv()
        if reply[0] != what:
            raise RuntimeError(f"child answered {reply!r}, expected {what!r}")
        return reply[1:]

    def start(i: int, bootstrap: list[str] | None):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_node_process, args=(i, vectors[i], bootstrap, child, args.send_timeout), daemon=True)
        proc.start()
        procs.append(proc)
        conns.append(parent)
        peer_id, maddrs = expect(parent, "ready")
        peer_ids.append(peer_id)
        return maddrs

    results = []
    try:
        bootstrap = start(0, None)
        for i in range(1, n):
            start(i, bootstrap)
        round_ = 0
        for topo_name in args.topology:
            topo = make_topology(topo_name, n)
            for i, conn in enumerate(conns):
                ins = [peer_ids[j] for j in topo.in_neighbours(i)]
                conn.send(("configure", ins, [peer_ids[j] for j in topo.out_neighbours(i)]))
            for conn in conns:
                expect(conn, "ok")
            for spec in args.codecs:
                times, sent_before, sent, failed_before, failed = [], [0] * n, [0] * n, [0] * n, [0] * n
                for r in range(args.warmup + args.rounds):
                    if r == args.warmup:
                        sent_before, failed_before = list(sent), list(failed)
                    round_ += 1
                    start_t = time.perf_counter()
                    for phase in ("pull", "push"):
                        for conn in conns:
                            conn.send(("phase", spec, round_, phase))
                        for i, conn in enumerate(conns):
                            sent[i], failed[i] = expect(conn, "done")
                    if r >= args.warmup:
                        times.append(time.perf_counter() - start_t)
                per_node = [(s - b) / args.rounds for s, b in zip(sent, sent_before, strict=True)]
                results.append(
                    result_row(
                        "1 process per node",
                        get_codec(spec).spec,
                        topo,
                        times,
                        per_node,
                        sum(failed) - sum(failed_before),
                        vectors[0].numel(),
                    )
                )
        return results
    finally:
        for conn in conns:
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(("stop",))
        for i, (proc, conn) in enumerate(zip(procs, conns, strict=True)):
            with contextlib.suppress(EOFError, OSError):
                while conn.poll(30):
                    reply = conn.recv()
                    if reply[0] == "error":
                        print(f"warning: {reply[1]}", file=sys.stderr)
                    if reply[0] == "closed":
                        break
            proc.join(30)
            if proc.is_alive():
                print(f"warning: node process {i} did not exit; terminating it", file=sys.stderr)
                proc.terminate()
                proc.join(5)


# --- (b) hivemind DecentralizedAverager -------------------------------------------------------------


def averager_rounds(args: argparse.Namespace, vectors: list[torch.Tensor]) -> dict:
    import hivemind
    from hivemind.averaging import DecentralizedAverager

    n = len(vectors)
    dhts: list = []
    averagers: list = []
    expected = torch.stack(vectors).mean(0)
    try:
        dhts.append(hivemind.DHT(start=True, **P2P_KWARGS))
        bootstrap = dhts[0].get_visible_maddrs()
        check_loopback(bootstrap, "DHT 0")
        for _ in range(n - 1):
            dhts.append(hivemind.DHT(initial_peers=bootstrap, start=True, **P2P_KWARGS))
        for i, dht in enumerate(dhts):
            check_loopback(dht.get_visible_maddrs(), f"DHT {i}")
        for i, dht in enumerate(dhts):
            averagers.append(
                DecentralizedAverager(
                    [vectors[i].clone()],
                    dht,
                    prefix="bench_network_round",
                    target_group_size=n,
                    min_matchmaking_time=args.matchmaking,
                    request_timeout=args.request_timeout,
                    start=True,
                )
            )

        full, allreduce, group_sizes, per_peer_allreduce, max_errors = [], [], [], [], []
        for r in range(args.warmup + args.rounds):
            for avg, vec in zip(averagers, vectors, strict=True):
                with avg.get_tensors() as tensors:
                    tensors[0].copy_(vec)
            stamps: list[tuple[float, float, float, object] | None] = [None] * n
            failures: list[str] = []
            barrier = threading.Barrier(n)

            def step(i: int, barrier=barrier, stamps=stamps, failures=failures) -> None:
                barrier.wait()
                t0 = time.perf_counter()
                try:
                    control = averagers[i].step(wait=False, timeout=args.step_timeout)
                    began = None
                    while not control.done():
                        if began is None and control.began_allreduce:
                            began = time.perf_counter()
                        time.sleep(0.001)
                    gathered = control.result()
                    t1 = time.perf_counter()
                    stamps[i] = (t0, began if began is not None else t1, t1, gathered)
                except Exception as e:
                    failures.append(f"peer {i}: {type(e).__name__}: {e}")

            threads = [threading.Thread(target=step, args=(i,), daemon=True) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(args.step_timeout + 30)
            if failures or any(s is None for s in stamps):
                raise RuntimeError(f"averager round {r} failed: {failures or 'a step did not finish'}")
            sizes = [len(s[3]) if s[3] else 0 for s in stamps]
            err = 0.0
            for avg in averagers:
                with avg.get_tensors() as tensors:
                    err = max(err, (tensors[0] - expected).abs().max().item())
            tag = "warm-up" if r < args.warmup else "timed"
            f = max(s[2] for s in stamps) - min(s[0] for s in stamps)
            a = max(s[2] for s in stamps) - min(s[1] for s in stamps)
            print(
                f"  averager round {r} ({tag}): step {f:.3f} s, all-reduce {a:.3f} s, groups {sizes}, "
                f"max |x - mean| {err:.2e}",
                flush=True,
            )
            if r < args.warmup:
                continue
            full.append(f)
            allreduce.append(a)
            per_peer_allreduce.append([s[2] - s[1] for s in stamps])
            group_sizes.append(sizes)
            max_errors.append(err)
        numel = vectors[0].numel()
        return {
            "method": "hivemind DecentralizedAverager",
            "codec": "none (float32)",
            "topology": f"all-reduce, group of {n}",
            "min_matchmaking_time": args.matchmaking,
            "request_timeout": args.request_timeout,
            "step_s": full,
            "allreduce_s": allreduce,
            "per_peer_allreduce_s": per_peer_allreduce,
            "median_step_s": median(full),
            "median_allreduce_s": median(allreduce),
            "group_sizes": group_sizes,
            "full_group_rounds": sum(all(s == n for s in sizes) for sizes in group_sizes),
            "max_abs_error": max(max_errors) if max_errors else None,
            "bytes_per_node_round_computed": 2 * (n - 1) / n * 4 * numel,
        }
    finally:
        for avg in averagers:
            try:
                avg.shutdown()
            except Exception as e:
                print(f"warning: averager shutdown failed: {type(e).__name__}: {e}", file=sys.stderr)
        for dht in dhts:
            try:
                dht.shutdown()
            except Exception as e:
                print(f"warning: DHT shutdown failed: {type(e).__name__}: {e}", file=sys.stderr)


# --- report ---------------------------------------------------------------------------------------


def table(rows: list[dict], avg: dict | None, n: int) -> str:
    step = avg["median_step_s"] if avg else float("nan")
    ar = avg["median_allreduce_s"] if avg else float("nan")
    lines = [
        "| method | codec | topology | median round (s) | bytes sent per node per round "
        "| ratio to averager step (full) | ratio to averager all-reduce part |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        b, raw = row["bytes_per_node_round"], row["raw_float32_bytes_per_node_round"]
        lines.append(
            f"| {row['method']} | {row['codec']} | {row['topology']} | {row['median_s']:.3f} "
            f"| {b:,.0f} ({b / raw:.3f}x raw) | {row['median_s'] / step:.3f} | {row['median_s'] / ar:.3f} |"
        )
    if avg:
        b = avg["bytes_per_node_round_computed"]
        lines.append(
            f"| hivemind averager, full step | none (float32) | all-reduce, group of {n} | {step:.3f} "
            f"| ~{b:,.0f} (computed) | 1.000 | {step / ar:.3f} |"
        )
        lines.append(
            f"| hivemind averager, all-reduce part | none (float32) | all-reduce, group of {n} | {ar:.3f} "
            f"| ~{b:,.0f} (computed) | {ar / step:.3f} | 1.000 |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds per configuration (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up rounds per configuration (default 2)")
    parser.add_argument("--codecs", default=DEFAULT_CODECS, help=f"comma-separated codec specs ({DEFAULT_CODECS})")
    parser.add_argument(
        "--topology", default="directed-ring", help="comma-separated topologies (directed-ring, exponential, ...)"
    )
    parser.add_argument(
        "--matchmaking", type=float, default=2.0, help="averager min_matchmaking_time in seconds (default 2.0)"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="averager request_timeout (default: min(3, matchmaking / 2); hivemind wants it below matchmaking)",
    )
    parser.add_argument(
        "--mode",
        choices=("one-process", "processes", "both"),
        default="both",
        help="P2P-FT nodes in this process, one process each, or both (default)",
    )
    parser.add_argument("--peers", type=int, default=4, help="number of peers (default 4)")
    parser.add_argument("--numel", type=int, default=VIT_SMALL_TRAINABLE, help="vector length (default 1,779,082)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--send-timeout", type=float, default=60.0, help="Links timeout per frame (s)")
    parser.add_argument("--step-timeout", type=float, default=60.0, help="averager step timeout (s)")
    parser.add_argument("--skip-averager", action="store_true", help="measure only P2P-FT")
    parser.add_argument("--json", type=Path, default=None, help="write every measurement here")
    args = parser.parse_args(argv)
    args.codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    args.topology = [t.strip() for t in args.topology.split(",") if t.strip()]
    if args.request_timeout is None:
        args.request_timeout = min(3.0, args.matchmaking / 2)
    if args.rounds < 1 or args.warmup < 0 or args.peers < 2:
        parser.error("need --rounds >= 1, --warmup >= 0 and --peers >= 2")
    for spec in args.codecs:
        get_codec(spec)  # fail early on a bad spec
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("hivemind").setLevel(logging.WARNING)
    tag = uuid.uuid4().hex
    os.environ[TAG_VAR] = tag  # inherited by every p2pd this run starts (directly or via DHT processes)
    others_before = p2pd_pids()
    load_before = loadavg()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    py, cpus = platform.python_version(), os.cpu_count()
    print(f"machine: {platform.node()}, {cpus} CPUs, torch {torch.__version__}, python {py}")
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}")
    print(f"p2pd processes already running (not ours): {len(others_before)}")
    print(
        f"{args.peers} peers, {args.numel:,} float32 values ({4 * args.numel:,} bytes raw), "
        f"{args.warmup} warm-up + {args.rounds} timed rounds per configuration",
        flush=True,
    )

    gen = torch.Generator().manual_seed(args.seed)
    vectors = [torch.randn(args.numel, generator=gen, dtype=torch.float32) for _ in range(args.peers)]
    started = time.perf_counter()
    avg = None
    try:
        print("(a) P2P-FT rounds over Links", flush=True)
        rows = []
        if args.mode in ("one-process", "both"):
            rows += asyncio.run(p2pft_one_process(args, vectors))
        if args.mode in ("processes", "both"):
            rows += p2pft_processes(args, vectors)
        if not args.skip_averager:
            print(f"(b) hivemind DecentralizedAverager, min_matchmaking_time={args.matchmaking}", flush=True)
            avg = averager_rounds(args, vectors)
    finally:
        time.sleep(0.5)  # let terminated daemons exit before looking for them
        leftovers = p2pd_pids(tag)
        if leftovers:
            print(f"warning: p2pd processes left by this run: {leftovers}; terminating them", file=sys.stderr)
            for pid in leftovers:
                with contextlib.suppress(OSError):
                    os.kill(pid, 15)
        else:
            print("p2pd processes left by this run: none")
    load_after = loadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"wall time: {time.perf_counter() - started:.1f} s\n")
    print(table(rows, avg, args.peers))
    raw = 4 * args.numel
    print(f"\nraw float32 vector: {raw:,} bytes; 'x raw' = bytes sent / (raw x messages a node sends per round)")
    for name in args.topology:
        topo = make_topology(name, args.peers)
        print(f"  {name}: {2 * len(topo.out_neighbours(0))} messages per node per round (2 phases x out-degree)")
    failed = [
        f"{r['method']} {r['codec']} {r['topology']}: {r['failed_sends_retried']}"
        for r in rows
        if r["failed_sends_retried"]
    ]
    if failed:
        print("failed sends (Links.send returned False; re-sent within the timed round): " + "; ".join(failed))
    verdict = {}
    if avg:
        print(
            f"averager: {avg['full_group_rounds']}/{args.rounds} timed rounds with a full group of {args.peers}, "
            f"max |x - mean| after a step {avg['max_abs_error']:.2e}"
        )
        for row in rows:
            key = f"{row['mode']} {row['codec']} {row['topology']}"
            verdict[key] = {
                "vs_step": row["median_s"] <= avg["median_step_s"] / 3,
                "vs_allreduce": row["median_s"] <= avg["median_allreduce_s"] / 3,
            }
        print("target, P2P-FT round <= 1/3 of the averager's (full step / all-reduce part):")
        for k, v in verdict.items():
            print(f"  {k}: {'yes' if v['vs_step'] else 'no'} / {'yes' if v['vs_allreduce'] else 'no'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": {"node": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__},
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "p2pft": rows,
            "averager": avg,
            "target_one_third": verdict,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
