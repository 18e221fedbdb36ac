"""The peer daemon behind `p2pnode start`: DHT membership, directed links, and rounds of an algorithm.

One `Node` per machine. It joins the run's DHT key, waits for `--nodes` members that share its trunk
fingerprint and settings, derives the topology from the member order (identically on every node),
and drives the same algorithm object the simulator uses: for each phase it sends `outgoing`, waits
until every in-neighbour's message for the round has arrived or `--round-timeout` passes, and
applies `incoming` in a worker thread, so the event loop keeps serving peers while it computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hivemind
import numpy as np
import torch
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey
from safetensors.torch import load_file, save_file

from ..protocol.codecs import get_codec
from ..protocol.envelope import MAX_MESSAGE_BYTES, ProtocolError, from_message, pack, to_message, unpack
from ..protocol.links import Links
from ..protocol.membership import MemberInfo, Membership, run_validators
from .algorithms import ALGORITHMS, Algorithm, Message, StepRule
from .data import parse_class_set, parse_split, partition
from .errors import BadInput
from .settings import NodeSettings
from .simulator import iterations_per_epoch, objective_seed, step_schedule
from .topology import make_topology
from .training import FeatureBank, VisionObjective, accuracy, prepare_model_and_data

logger = logging.getLogger(__name__)

TOPOLOGY_EPOCH = 0  # bumped by a coordinated restart of tracking after a permanent departure
MAX_CATCH_UP = 2  # rounds a resumed node may skip to rejoin peers that stopped later
INLINE_BYTES = 1 << 20  # messages below this are encoded and decoded on the event loop
RETRY_UNREACHABLE_S = 10.0  # after a failed send, skip that peer this long (then try again)


class Node:
    """A peer of one run. Build with `await Node.create(settings)`, then `await node.run()`."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.dht: hivemind.DHT | None = None
        self.p2p = None
        self.links: Links | None = None
        self.membership: Membership | None = None
        self.algorithm: Algorithm | None = None
        self.members: list[MemberInfo] = []
        self.index = -1
        self.round = 0
        self.rounds = 0
        self.history: dict[str, list] = {"epoch": [], "accuracy": [], "loss": []}
        self._inbox: dict[str, list[Message]] = {}
        self._arrival = asyncio.Event()
        self._stop = asyncio.Event()
        self._absent: set[int] = set()
        self._pending: set[asyncio.Task] = set()
        self._unreachable: dict[int, float] = {}
        self._index_of: dict[str, int] = {}
        self._peer_of: dict[int, PeerID] = {}
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="p2pnode-train")
        self._decode = ThreadPoolExecutor(2, thread_name_prefix="p2pnode-decode")
        self._heartbeat: asyncio.Task | None = None
        self._ready = asyncio.Event()  # set once members, topology and algorithm are known
        self.info: MemberInfo | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    @classmethod
    async def create(cls, settings: NodeSettings) -> Node:
        self = cls(settings)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            await self._prepare_training()
            await self._join_network()
        except BaseException:
            await self.shutdown()
            raise
        return self

    async def _prepare_training(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        self.device = s.torch_device
        self.model, self.data = await loop.run_in_executor(self._compute, prepare_model_and_data, s, self.device)
        labels = self.data.train_labels
        if s.classes is not None:
            classes = parse_class_set(s.classes)
            missing = [c for c in classes if c >= self.data.num_classes]
            if missing:
                raise BadInput(f"class {missing[0]} is not in {self.data.name} (classes 0-{self.data.num_classes - 1})")
            self.indices = np.flatnonzero(np.isin(labels, classes))
        else:
            if s.index < 0:
                raise BadInput("give this node its data: --classes RANGES, or --index N to take its share of --split")
            parts = partition(labels, parse_split(s.split), s.nodes, s.seed, self.data.num_classes, self.data.name)
            self.indices = parts[s.index]
        if len(self.indices) == 0:
            raise BadInput("this node has no training samples: check --classes")

        def banks():
            train = FeatureBank(self.model, self.data.train, labels, self.indices, s.cache_features, self.device)
            test = FeatureBank(self.model, self.data.test, self.data.test_labels, None, True, self.device)
            return train, test

        self.train_bank, self.test_bank = await loop.run_in_executor(self._compute, banks)
        logger.info(
            "model %s (trunk %s, %d trainable), %d local samples of %s",
            s.model,
            self.model.fingerprint,
            self.model.num_trainable,
            len(self.indices),
            self.data.name,
        )

    async def _join_network(self) -> None:
        s = self.settings
        validators = run_validators(s.run_id, RSAPrivateKey())  # own key: several nodes may share a process
        loop = asyncio.get_running_loop()

        def start_dht() -> hivemind.DHT:
            return hivemind.DHT(
                initial_peers=s.peers or None,
                host_maddrs=s.listen,
                announce_maddrs=s.announce or None,
                identity_path=s.identity,
                record_validators=validators,
                start=True,
                startup_timeout=60,
                use_relay=s.use_relay,
                use_auto_relay=s.use_auto_relay,
            )

        try:
            self.dht = await loop.run_in_executor(None, start_dht)
        except Exception as e:
            raise BadInput(f"could not start the DHT or reach --peers ({type(e).__name__}: {e})") from None
        self.p2p = await self.dht.replicate_p2p()
        self.peer_id = str(self.dht.peer_id)
        self.links = await Links.create(
            self.p2p, s.run_id, self._on_frame, max_bytes=MAX_MESSAGE_BYTES, timeout=max(30.0, s.round_timeout)
        )
        self.membership = Membership(self.dht, s.run_id, validators[0], ttl=4 * s.heartbeat)
        saved = self.state_dir / "state.json"
        saved_round = json.loads(saved.read_text()).get("round", 0) if saved.is_file() else 0
        self.info = MemberInfo(
            round=saved_round,  # peers resuming together use it to start at the same round
            peer_id=self.peer_id,
            fingerprint=self.model.fingerprint,
            settings_hash=s.settings_hash(),
            samples=len(self.indices),
            index=s.index,
            classes=s.classes or "",
        )
        for addr in self.dht.get_visible_maddrs():
            logger.info("listening on %s", addr)

    def request_stop(self) -> None:
        """Finish the current step, checkpoint and leave (what SIGINT / SIGTERM do)."""
        self._stop.set()
        self._arrival.set()  # wake a round that is waiting for messages

    async def shutdown(self) -> None:
        for task in list(self._pending):
            task.cancel()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._heartbeat
        if self.links is not None:
            await self.links.shutdown()
        if self.p2p is not None:
            with contextlib.suppress(Exception):
                await self.p2p.shutdown()
        if self.dht is not None:
            dht, self.dht = self.dht, None
            await asyncio.get_running_loop().run_in_executor(None, dht.shutdown)
        self._compute.shutdown(wait=True)
        self._decode.shutdown(wait=True)

    # --- membership ------------------------------------------------------------------------------

    async def _announce(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self.membership.announce, self.info)
        except Exception as e:
            logger.warning("membership refresh failed: %s", e)

    async def _beat(self) -> None:
        while True:
            await self._announce()
            await asyncio.sleep(self.settings.heartbeat)

    async def _wait_for_members(self) -> list[MemberInfo]:
        s = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.join_timeout
        refused: set[str] = set()
        last_count = -1
        while loop.time() < deadline and not self._stop.is_set():
            found = await loop.run_in_executor(None, self.membership.members)
            ok = []
            for m in found:
                if m.fingerprint != self.info.fingerprint or m.settings_hash != self.info.settings_hash:
                    if m.peer_id not in refused:
                        refused.add(m.peer_id)
                        what = "trunk fingerprint" if m.fingerprint != self.info.fingerprint else "settings"
                        logger.warning(
                            "refusing peer %s: its %s differ from this run's (%s vs %s)",
                            m.peer_id[-8:],
                            what,
                            m.fingerprint if what[0] == "t" else m.settings_hash,
                            self.info.fingerprint if what[0] == "t" else self.info.settings_hash,
                        )
                    continue
                ok.append(m)
            if len(ok) != last_count:
                logger.info("%d of %d members present", len(ok), s.nodes)
                last_count = len(ok)
            if len(ok) >= s.nodes and any(m.peer_id == self.peer_id for m in ok[: s.nodes]):
                if len(ok) > s.nodes:
                    logger.warning("%d members present, the run takes the first %d", len(ok), s.nodes)
                return ok[: s.nodes]
            await asyncio.sleep(min(1.0, s.heartbeat))
        if self._stop.is_set():
            return []
        raise BadInput(f"only {last_count} of {s.nodes} members joined run {s.run_id!r} within {s.join_timeout:.0f} s")

    # --- receiving -------------------------------------------------------------------------------

    async def _on_frame(self, data: bytes, peer: PeerID) -> bool:
        """Validate and queue one message; never raises (a bad message is logged and dropped)."""
        sender = str(peer)
        try:  # a faster peer may send before this node has built its algorithm: hold the sender back
            await asyncio.wait_for(self._ready.wait(), self.links.timeout / 2)
        except asyncio.TimeoutError:
            logger.warning("dropped a message from %s: this node is not in a run yet", sender[-8:])
            return False
        if sender not in self._index_of:
            logger.warning("dropped a message from %s: not an in-neighbour in this run", sender[-8:])
            return False
        in_peers = [str(self._peer_of[j]) for j in self.algorithm.hood.in_neighbours]

        def decode() -> Message:
            env = unpack(data, run=self.settings.run_id, senders=in_peers)
            if env.sender != sender:
                raise ProtocolError(f"envelope claims sender {env.sender[-8:]} but came from {sender[-8:]}")
            if env.epoch != TOPOLOGY_EPOCH:
                raise ProtocolError(f"topology epoch {env.epoch}, this node is at {TOPOLOGY_EPOCH}")
            if env.phase not in self.algorithm.phases:
                raise ProtocolError(f"unknown phase {env.phase!r} for {self.algorithm.name}")
            return to_message(env, self._index_of[sender], self.index)

        try:
            msg = await self._off_loop(decode, len(data))
        except ProtocolError as e:
            logger.warning("dropped a message from %s: %s", sender[-8:], e)
            return False
        self._inbox.setdefault(msg.phase, []).append(msg)
        if msg.round >= self.round:  # a neighbour still behind stays on the short grace
            self._absent.discard(msg.src)
        self._arrival.set()
        return True

    async def _collect(self, phase: str, k: int, wait: bool = True) -> list[Message]:
        """Wait for every in-neighbour's message of round k (or the deadline); return what has arrived."""
        loop = asyncio.get_running_loop()
        hood = self.algorithm.hood
        start = loop.time()
        waiting: list[int] = []
        while wait:
            self._arrival.clear()
            inbox = self._inbox.get(phase, [])
            heard = {m.src for m in inbox if m.round >= k}
            waiting = [j for j in hood.in_neighbours if j not in heard]
            present = [j for j in waiting if j not in self._absent]
            elapsed = loop.time() - start
            # an in-neighbour that already missed a deadline gets a short grace, not the full timeout
            limit = self.settings.round_timeout if present else min(2.0, self.settings.round_timeout)
            if self._stop.is_set():
                limit = min(limit, 1.0)  # stopping: give in-flight messages a moment, then finish the step
            if not waiting or elapsed >= limit:
                break
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrival.wait(), limit - elapsed)
        inbox = self._inbox.get(phase, [])
        if waiting:
            newly = [j for j in waiting if j not in self._absent]
            if newly:
                logger.warning("round %d %s: going on without node(s) %s", k, phase, newly)
            self._absent.update(waiting)
        ready = [m for m in inbox if m.round <= k]
        self._inbox[phase] = [m for m in inbox if m.round > k]
        return ready

    # --- sending ---------------------------------------------------------------------------------

    async def _send_all(self, messages: list[Message]) -> None:
        """Encode now, deliver in the background: a slow or dead out-neighbour never stalls a round.

        Sends to one peer stay in order (the link's lock is FIFO). A failed send makes the algorithm
        send full state (a keyframe) on that link next time, and the peer is skipped for a while."""
        if not messages:
            return
        s = self.settings

        def encode(m: Message) -> bytes:
            return pack(from_message(m, s.run_id, TOPOLOGY_EPOCH, self.peer_id))

        frames = await self._off_loop(lambda: [encode(m) for m in messages], sum(m.nbytes for m in messages))
        for m, frame in zip(messages, frames, strict=True):
            task = asyncio.create_task(self._send_one(m.dst, frame))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _off_loop(self, work, nbytes: int):
        """Run encode/decode work in the decode pool, or inline when it is small: a thread hop costs
        more than packing a small message and would add to every round's latency."""
        if nbytes < INLINE_BYTES:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._decode, work)

    async def _send_one(self, dst: int, frame: bytes) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._unreachable.get(dst, 0.0):
            self.algorithm.request_keyframe(dst)
            return
        if await self.links.send(self._peer_of[dst], frame):
            self._unreachable.pop(dst, None)
        else:
            self._unreachable[dst] = loop.time() + RETRY_UNREACHABLE_S
            self.algorithm.request_keyframe(dst)

    async def _drain_sends(self, limit: float = 30.0) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=limit)

    # --- the run ---------------------------------------------------------------------------------

    def _build_algorithm(self) -> tuple[Algorithm, int]:
        s = self.settings
        n = len(self.members)
        topo = make_topology(s.topology, n, s.seed)
        per_epoch = iterations_per_epoch(sum(m.samples for m in self.members), n, s.batch_size)
        self.rounds = per_epoch * s.epochs
        objective = VisionObjective(
            self.model,
            self.train_bank,
            self.indices,
            s.batch_size,
            seed=objective_seed(s, self.index),
            weight_decay=s.weight_decay,
        )
        codec = None if s.codec == "none" else get_codec(s.codec)
        step = StepRule(step_schedule(s, self.rounds), s.momentum, s.optimizer)
        initial = self.model.trainable_vector().to(self.device)
        algo = ALGORITHMS[s.algorithm](topo.neighbourhood(self.index), objective, initial, step, codec, s.gamma)
        algo.configure(iterations_per_epoch=per_epoch, settings=s)
        return algo, per_epoch

    async def run(self) -> dict | None:
        """Join, train for the run's rounds, write result.json. None if stopped before the end."""
        s = self.settings
        loop = asyncio.get_running_loop()
        self._heartbeat = asyncio.create_task(self._beat())
        self.members = await self._wait_for_members()
        if not self.members:
            return None
        self._index_of = {m.peer_id: i for i, m in enumerate(self.members)}
        self._peer_of = {i: PeerID.from_base58(m.peer_id) for i, m in enumerate(self.members)}
        self.index = self._index_of[self.peer_id]
        self.algorithm, per_epoch = await loop.run_in_executor(self._compute, self._build_algorithm)
        hood = self.algorithm.hood
        logger.info(
            "node %d of %d: in-neighbours %s, out-neighbours %s, %d rounds (%d per epoch)",
            self.index,
            len(self.members),
            list(hood.in_neighbours),
            list(hood.out_neighbours),
            self.rounds,
            per_epoch,
        )
        start_round = await loop.run_in_executor(self._compute, self._resume)
        if start_round > 0:
            start_round = self.round = self.info.round = self._catch_up(start_round)
        self._ready.set()
        self.info.status, self.info.rounds = "training", self.rounds
        started = time.perf_counter()
        k = start_round
        while k < self.rounds and not self._stop.is_set():
            for phase in self.algorithm.phases:
                out = await loop.run_in_executor(self._compute, self.algorithm.outgoing, phase, k)
                await self._send_all(out)
                wait = bool(hood.in_neighbours) and self.algorithm.expects_messages(phase, k)
                arrived = await self._collect(phase, k, wait)
                await loop.run_in_executor(self._compute, self.algorithm.incoming, phase, k, arrived)
            k += 1
            self.round = self.info.round = k
            if k % per_epoch == 0:
                await self._end_of_epoch(k // per_epoch)
            if k % s.checkpoint_every == 0:
                await loop.run_in_executor(self._compute, self._checkpoint)
        await self._drain_sends(limit=5.0 if self._stop.is_set() else 30.0)
        await loop.run_in_executor(self._compute, self._checkpoint)
        if k < self.rounds:
            self.info.status = "left"
            await self._announce()
            logger.info("left the run at round %d of %d; state saved in %s", k, self.rounds, self.state_dir)
            return None
        result = self._write_result(time.perf_counter() - started)
        self.info.status = "done"
        await self._announce()
        await self._linger()
        return result

    def _catch_up(self, start_round: int) -> int:
        """Members that stopped a round or two apart resume at the latest one (DESIGN §3 tolerates the
        skipped local steps; the first push on every link is a keyframe). Otherwise each would wait
        for the other's next message until the round timeout."""
        latest = max((m.round for m in self.members), default=start_round)
        if start_round < latest <= start_round + MAX_CATCH_UP:
            logger.info("peers resumed at round %d: skipping ahead from round %d", latest, start_round)
            return latest
        return start_round

    async def _end_of_epoch(self, epoch: int) -> None:
        loop = asyncio.get_running_loop()
        acc = await loop.run_in_executor(self._compute, accuracy, self.model, self.algorithm.params, self.test_bank)
        self.info.epoch, self.info.accuracy = epoch, acc
        self.info.loss = float(self.algorithm.last_loss)
        self.info.bytes_sent = self.links.bytes_sent
        self.history["epoch"].append(epoch)
        self.history["accuracy"].append(acc)
        self.history["loss"].append(self.info.loss)
        logger.info(
            "round %d/%d epoch %s: loss %.4f, test accuracy %.1f%%, sent %.1f MB",
            self.round,
            self.rounds,
            epoch,
            self.info.loss,
            100 * acc,
            self.links.bytes_sent / 1e6,
        )
        self._write_json(
            "progress.json",
            {
                "round": self.round,
                "rounds": self.rounds,
                "epoch": epoch,
                "accuracy": acc,
                "loss": self.info.loss,
                "bytes_sent": self.links.bytes_sent,
            },
        )
        await self._announce()

    async def _linger(self, limit: float = 10.0) -> None:
        """Stay reachable briefly so slower members can still deliver to us and see us done."""
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        while loop.time() < end and not self._stop.is_set():
            members = await loop.run_in_executor(None, self.membership.members)
            mine = {m.peer_id for m in self.members}
            if all(m.status in ("done", "left") for m in members if m.peer_id in mine):
                return
            await asyncio.sleep(1.0)

    # --- state -----------------------------------------------------------------------------------

    def _write_json(self, name: str, payload: dict) -> None:
        path = self.state_dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, path)

    def _write_result(self, seconds: float) -> dict:
        result = {
            "accuracy": self.history["accuracy"][-1] if self.history["accuracy"] else None,
            "rounds": self.round,
            "bytes_sent": self.links.bytes_sent,
            "messages_sent": self.links.frames_sent,
            "bytes_per_epoch": self.links.bytes_sent / self.settings.epochs,
            "messages_per_epoch": self.links.frames_sent / self.settings.epochs,
            "rejected": self.links.rejected,
            "seconds": seconds,
            "index": self.index,
            "peer_id": self.peer_id,
            "fingerprint": self.model.fingerprint,
            "settings": self.settings.to_dict(),
            "history": self.history,
        }
        self._write_json("result.json", result)
        return result

    def _checkpoint_meta(self) -> dict:
        s = self.settings
        return {
            "run_id": s.run_id,
            "fingerprint": self.model.fingerprint,
            "settings_hash": s.settings_hash(),
            "index": self.index,
            "topology_epoch": TOPOLOGY_EPOCH,
            "members": [m.peer_id for m in self.members],
        }

    def _checkpoint(self) -> None:
        """Atomically write the whole algorithm state (safetensors) and its metadata (JSON)."""
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in self.algorithm.state_dict().items()}
        objective = self.algorithm.objective
        state["objective.order"] = torch.as_tensor(objective._order.copy())
        tmp = self.state_dir / "state.safetensors.tmp"
        save_file(state, str(tmp))
        os.replace(tmp, self.state_dir / "state.safetensors")
        meta = {
            **self._checkpoint_meta(),
            "round": self.round,
            "history": self.history,
            "rng": objective.rng.bit_generator.state,
            "samples_seen": objective.samples_seen,
        }
        self._write_json("state.json", meta)

    def _resume(self) -> int:
        meta_path, state_path = self.state_dir / "state.json", self.state_dir / "state.safetensors"
        if not (meta_path.is_file() and state_path.is_file()):
            return 0
        meta = json.loads(meta_path.read_text())
        expected = self._checkpoint_meta()
        differs = [
            k for k in ("run_id", "fingerprint", "settings_hash", "index", "members") if meta.get(k) != expected[k]
        ]
        if differs:
            logger.warning("not resuming from %s: its %s differ from this run's", self.state_dir, ", ".join(differs))
            return 0
        state = load_file(str(state_path), device=str(self.device))
        objective = self.algorithm.objective
        objective._order = state.pop("objective.order").cpu().numpy()
        objective.rng.bit_generator.state = meta["rng"]
        objective.samples_seen = meta["samples_seen"]
        self.algorithm.load_state_dict(state)
        self.history = meta["history"]
        self.round = meta["round"]
        for dst in self.algorithm.hood.out_neighbours:  # a restart is a reconnect: resynchronise every link
            self.algorithm.request_keyframe(dst)
        logger.info("resumed from %s at round %d", self.state_dir, self.round)
        return self.round


def _quiet_stream_resets(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """hivemind's p2pd bindings log a full traceback when p2pd drops a stream before announcing it
    (asyncio's 'Unhandled exception in client_connected_cb'); the sender retries, so one line will do."""
    if isinstance(context.get("exception"), asyncio.IncompleteReadError) and "client_connected_cb" in str(
        context.get("message", "")
    ):
        logger.debug("p2pd dropped an incoming stream before it started (the sender retries)")
        return
    loop.default_exception_handler(context)


async def run_node(settings: NodeSettings) -> dict | None:
    """Create a node, run it to the end (or until stopped by a signal), always shut it down."""
    import signal

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_stream_resets)
    nodes: list[Node] = []
    stopped = asyncio.Event()

    def on_signal() -> None:
        stopped.set()
        for n in nodes:
            n.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    node = await Node.create(settings)
    nodes.append(node)
    if stopped.is_set():  # a signal while the node was starting
        node.request_stop()
    try:
        return await node.run()
    finally:
        await node.shutdown()
