"""The peer daemon behind `p2pnode start`: one `Node` per machine, a member of an elastic run.

A node prepares its model and data, joins the run's DHT, and waits for an epoch record that names
it (`node/membership.py`, `node/epochs.py`): epoch 0 once `--nodes` peers are present, or a later
epoch that lets it in as a joiner, with parameters from its own checkpoint or a donor
(`protocol/transfer.py`). Then it drives the same algorithm object the simulator uses, round after
round: for each phase it sends `send`, waits until every in-neighbour's message for the round has
arrived or its deadline passed (`node/rounds.py`), and applies `receive` in a worker thread. Between
rounds it enters the next epoch at the round that epoch names. SIGTERM makes it leave gracefully;
a second signal stops it at once. Files in the state directory: `node/state_store.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hivemind
import numpy as np
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey

from ..protocol.codecs import get_codec
from ..protocol.envelope import MAX_MESSAGE_BYTES, Envelope, ProtocolError, from_message, pack, to_message, unpack
from ..protocol.links import Links
from ..protocol.membership import EpochRecord, MemberInfo, Membership, run_validators
from ..protocol.message import Message
from ..protocol.transfer import TransferError, fetch_state, serve_state
from . import epochs
from .algorithms import ALGORITHMS, Algorithm, StepRule
from .data import parse_class_set, parse_split, partition
from .dht_process import start_dht, stop_dht
from .errors import BadInput
from .membership import MembershipAgent
from .metrics import NodeMetrics
from .rounds import Inbox
from .settings import NodeSettings
from .simulator import iterations_per_epoch, objective_seed, step_schedule
from .state_store import StateStore
from .topology import make_topology
from .training import FeatureBank, VisionObjective, accuracy, prepare_model_and_data

logger = logging.getLogger(__name__)

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
        self.agent: MembershipAgent | None = None
        self.store: StateStore | None = None
        self.metrics: NodeMetrics | None = None
        self.algorithm: Algorithm | None = None
        self.record: EpochRecord | None = None  # the epoch this node runs in
        self.index = -1
        self.round = 0
        self.rounds = 0
        self.per_epoch = 1
        self._started = time.perf_counter()
        self.history: dict[str, list] = {"epoch": [], "accuracy": [], "loss": []}
        self.epoch_log: list[dict] = []  # every epoch change this node saw
        self.inbox = Inbox(silent_seconds=max(10.0, 2 * settings.heartbeat))
        self._stop = asyncio.Event()
        self._leave_by: float | None = None  # loop time after which a leaving node just goes
        self._finishing = False  # past the last round: a signal stops at once
        self._pending: dict[asyncio.Task, PeerID] = {}  # background sends and their destination
        self._unreachable: dict[int, float] = {}
        self._index_of: dict[str, int] = {}
        self._peer_of: dict[int, PeerID] = {}
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="p2pnode-train")
        self._decode = ThreadPoolExecutor(2, thread_name_prefix="p2pnode-decode")
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
        self.store = StateStore(
            self.state_dir,
            {"run_id": s.run_id, "fingerprint": self.model.fingerprint, "settings_hash": s.settings_hash()},
        )
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

        def start() -> hivemind.DHT:
            return start_dht(
                initial_peers=s.peers or None,
                host_maddrs=s.listen,
                announce_maddrs=s.announce or None,
                identity_path=s.identity,
                record_validators=validators,
                startup_timeout=60,
                use_relay=s.use_relay,
                use_auto_relay=s.use_auto_relay,
            )

        try:
            self.dht = await loop.run_in_executor(None, start)
        except Exception as e:
            raise BadInput(f"could not start the DHT or reach --peers ({type(e).__name__}: {e})") from None
        self.p2p = await self.dht.replicate_p2p()
        self.peer_id = str(self.dht.peer_id)
        self.links = await Links.create(
            self.p2p, s.run_id, self._on_frame, max_bytes=MAX_MESSAGE_BYTES, timeout=max(30.0, s.round_timeout)
        )
        await serve_state(self.p2p, s.run_id, self._snapshot)
        if s.metrics_port is not None:
            self.metrics = NodeMetrics(s.run_id)
            self.metrics.serve(s.metrics_port, s.metrics_addr)
        self.info = MemberInfo(
            round=self.store.saved_round(),  # peers restarting together start at the furthest checkpoint
            peer_id=self.peer_id,
            fingerprint=self.model.fingerprint,
            settings_hash=s.settings_hash(),
            samples=len(self.indices),
            index=s.index,
            classes=s.classes or "",
        )
        membership = Membership(self.dht, s.run_id, validators[0], ttl=4 * s.heartbeat)
        self.agent = await MembershipAgent.create(membership, self.info, s.heartbeat)
        self.agent.on_change = lambda _record: self.inbox.arrival.set()  # wake a waiting round
        self.store.events.write("start", peer_id=self.peer_id, run_id=s.run_id, settings=s.to_dict())
        for addr in self.dht.get_visible_maddrs():
            logger.info("listening on %s", addr)

    def request_leave(self) -> None:
        """SIGTERM: leave gracefully (take part until the epoch that drops this node, at most
        --leave-timeout seconds); a node not yet in a run, or a second request, stops at once."""
        if self.algorithm is None or self._leave_by is not None or self._finishing:
            self.request_stop()
            return
        self._leave_by = asyncio.get_running_loop().time() + self.settings.leave_timeout
        self.info.status = "leaving"
        self.inbox.arrival.set()  # a waiting round re-checks its deadline: a leaver waits only briefly
        logger.info("leaving: waiting for the epoch that drops this node (at most %.0f s)", self.settings.leave_timeout)
        if self.agent is not None:
            asyncio.get_running_loop().create_task(self.agent.announce())

    def request_stop(self) -> None:
        """Finish the current step, checkpoint and go now."""
        self._stop.set()
        self.inbox.arrival.set()  # wake a round that is waiting for messages

    async def shutdown(self) -> None:
        for task in list(self._pending):
            task.cancel()
        if self.agent is not None:
            await self.agent.shutdown()
        if self.links is not None:
            await self.links.shutdown()
        if self.metrics is not None:
            self.metrics.shutdown()
        if self.p2p is not None:
            with contextlib.suppress(Exception):
                await self.p2p.shutdown()
        if self.dht is not None:
            dht, self.dht = self.dht, None
            await asyncio.get_running_loop().run_in_executor(None, stop_dht, dht)
        if self.store is not None:
            self.store.close()
        self._compute.shutdown(wait=True)
        self._decode.shutdown(wait=True)

    # --- joining ---------------------------------------------------------------------------------

    def _schedule(self, members: list[MemberInfo]) -> tuple[int, int]:
        """The run's length, fixed at epoch 0 from the first members' data (shared by all nodes)."""
        s = self.settings
        per_epoch = iterations_per_epoch(sum(m.samples for m in members), len(members), s.batch_size)
        return per_epoch * s.epochs, per_epoch

    async def _wait_for_epoch(self, after: EpochRecord | None = None) -> EpochRecord | None:
        """Wait for an epoch record that names this node (newer than `after`); propose epoch 0 if the
        run has none and enough peers are waiting. None if stopped first."""
        s = self.settings
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.join_timeout
        refused: set[str] = set()
        last_count = -1
        while loop.time() < deadline and not self._stop.is_set():
            await self.agent.refresh()
            record, infos = self.agent.record, self.agent.infos
            self._log_refused(infos, refused)
            if record is not None and self._in(record) and (after is None or record.rank > after.rank):
                return record
            stale = record is not None and not epochs.live(record, infos)
            if stale and after is None and any(m.status == "done" and m.peer_id in record.members for m in infos):
                raise BadInput(f"run {s.run_id!r} has finished (its members are done): there is nothing to join")
            if record is None or stale:
                proposal = epochs.first_epoch(infos, self.info, s.nodes, self._schedule, record if stale else None)
                if proposal is not None:
                    await self.agent.propose(proposal)
                    continue
            count = sum(1 for m in infos if epochs.compatible(m, self.info.fingerprint, self.info.settings_hash))
            if count != last_count:
                if record is None or stale:
                    logger.info("%d of %d members present", count, s.nodes)
                else:
                    logger.info("run in progress (epoch %d): waiting to be let in as a joiner", record.number)
                last_count = count
            await asyncio.sleep(self.agent.poll)
        if self._stop.is_set():
            return None
        raise BadInput(f"only {last_count} of {s.nodes} members joined run {s.run_id!r} within {s.join_timeout:.0f} s")

    def _in(self, record: EpochRecord) -> bool:
        """Whether `record` names this node, in this process (an earlier process's membership is not ours)."""
        return record.includes(self.peer_id, self.info.incarnation)

    def _log_refused(self, infos: list[MemberInfo], refused: set[str]) -> None:
        for m in infos:
            if m.peer_id in refused or epochs.compatible(m, self.info.fingerprint, self.info.settings_hash):
                continue
            refused.add(m.peer_id)
            what = "trunk fingerprint" if m.fingerprint != self.info.fingerprint else "settings"
            theirs, ours = (
                (m.fingerprint, self.info.fingerprint) if what[0] == "t" else (m.settings_hash, self.info.settings_hash)
            )
            logger.warning(
                "refusing peer %s: its %s differ from this run's (%s vs %s)", m.peer_id[-8:], what, theirs, ours
            )

    async def _start_training(self, record: EpochRecord) -> None:
        """Build the algorithm for the first epoch this node is in: parameters from its checkpoint
        (a restart), the model (epoch 0 of a fresh run) or a donor (a joiner)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        self.rounds, self.per_epoch = record.rounds, record.per_epoch
        self.info.rounds = self.rounds
        checkpoint = await loop.run_in_executor(self._compute, self.store.load, self.device)
        initial = self.model.trainable_vector().to(self.device)
        source = "the model's initial parameters"
        if checkpoint is not None:
            initial, source = checkpoint.state["params"], f"its checkpoint of round {checkpoint.round}"
            self.history = checkpoint.meta.get("history", self.history)
            self.epoch_log = checkpoint.meta.get("epochs", [])
        elif record.start_round > 0 or record.donors:
            donors = [p for p in record.donors if p != self.peer_id]
            try:
                got = await fetch_state(self.p2p, s.run_id, donors, initial.numel(), total_timeout=s.join_timeout / 4)
                initial, source = got.params.to(self.device), f"donor {got.donor[-8:]} at round {got.round}"
            except TransferError as e:
                logger.warning("%s; starting from the model's initial parameters (mixing pulls them in)", e)
        topo = make_topology(s.topology, len(record.members), s.seed)
        index = record.members.index(self.peer_id)
        objective = VisionObjective(
            self.model,
            self.train_bank,
            self.indices,
            s.batch_size,
            seed=objective_seed(s, index),
            weight_decay=s.weight_decay,
        )
        codec = None if s.codec == "none" else get_codec(s.codec)
        step = StepRule(step_schedule(s, self.rounds), s.momentum, s.optimizer)

        def build() -> Algorithm:
            algo = ALGORITHMS[s.algorithm](topo.neighbourhood(index), objective, initial, step, codec, s.gamma)
            algo.configure(iterations_per_epoch=self.per_epoch, settings=s)
            if checkpoint is not None:
                StateStore.restore_objective(algo, checkpoint)
                algo.load_model_state(checkpoint.state)  # parameters and momentum, never link state
            return algo

        self.algorithm = await loop.run_in_executor(self._compute, build)
        logger.info("starting from %s", source)
        if checkpoint is not None:
            logger.info("resumed from %s at round %d", self.state_dir, checkpoint.round)

    # --- receiving -------------------------------------------------------------------------------

    async def _on_frame(self, data: bytes, peer: PeerID) -> bool:
        """Validate and queue one message; never raises (a bad message is logged and dropped)."""
        sender = str(peer)
        known = self._known_peers()
        if known is not None and sender not in known:
            return self._refuse(sender, "not a member of this run")

        def decode() -> Envelope:
            env = unpack(data, run=self.settings.run_id, senders=[sender])
            if env.sender != sender:
                raise ProtocolError(f"envelope claims sender {env.sender[-8:]} but came from {sender[-8:]}")
            return env

        try:
            env = await self._off_loop(decode, len(data))
            current = self.record.number if self.record is not None else -1
            if env.epoch < current:
                return True  # sent before the sender entered this epoch: harmless, ignored
            if env.epoch > current or self.algorithm is None:
                self.inbox.hold(sender, env)  # the sender entered a later epoch first: keep it for then
                if env.epoch > current and self.agent.record is not None and self.agent.record.number < env.epoch:
                    self.agent.wake()  # a newer epoch exists that this node has not read yet: read now
                return True
            msg = await self._off_loop(lambda: self._to_message(sender, env, strict=True), len(data))
        except ProtocolError as e:
            return self._refuse(sender, str(e))
        self.inbox.put(msg)
        self.agent.heard_from(sender)
        return True

    def _refuse(self, sender: str, reason: str) -> bool:
        logger.warning("dropped a message from %s: %s", sender[-8:], reason)
        if self.store is not None:
            self.store.events.write("refused", peer=sender, reason=reason)
        if self.metrics is not None:
            self.metrics.refused()
        return False

    def _known_peers(self) -> set[str] | None:
        """Peers that may send to this node: members of its epoch and of the record the run follows
        (None while this node knows of no epoch yet: frames are then held back)."""
        records = [r for r in (self.record, self.agent.record if self.agent else None) if r is not None]
        return {p for r in records for p in r.members} if records else None

    def _to_message(self, sender: str, env: Envelope, strict: bool = False) -> Message | None:
        if sender not in self._index_of or env.phase not in self.algorithm.phases:
            if strict:
                raise ProtocolError(f"not an in-neighbour in epoch {env.epoch}, or phase {env.phase!r} unknown")
            return None
        return to_message(env, self._index_of[sender], self.index)

    # --- sending ---------------------------------------------------------------------------------

    async def _send_all(self, messages: list[Message]) -> None:
        """Encode now, deliver in the background: a slow or dead out-neighbour never stalls a round.

        Sends to one peer stay in order (the link's lock is FIFO). A failed send makes the algorithm
        send full state (a keyframe) on that link next time, and the peer is skipped for a while."""
        if not messages:
            return
        s = self.settings

        def encode(m: Message) -> bytes:
            return pack(from_message(m, s.run_id, m.epoch, self.peer_id))

        frames = await self._off_loop(lambda: [encode(m) for m in messages], sum(m.nbytes for m in messages))
        for m, frame in zip(messages, frames, strict=True):
            peer = self._peer_of[m.dst]
            task = asyncio.create_task(self._send_one(m.dst, peer, frame))
            self._pending[task] = peer
            task.add_done_callback(lambda t: self._pending.pop(t, None))

    async def _off_loop(self, work, nbytes: int):
        """Run encode/decode work in the decode pool, or inline when it is small: a thread hop costs
        more than packing a small message and would add to every round's latency."""
        if nbytes < INLINE_BYTES:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._decode, work)

    async def _send_one(self, dst: int, peer: PeerID, frame: bytes) -> None:
        loop = asyncio.get_running_loop()
        if loop.time() < self._unreachable.get(dst, 0.0):
            self.algorithm.request_keyframe(dst)
            return
        if await self.links.send(peer, frame):
            self._unreachable.pop(dst, None)
        elif self._peer_of.get(dst) == peer:  # still the same link (no epoch change since)
            self._unreachable[dst] = loop.time() + RETRY_UNREACHABLE_S
            self.algorithm.request_keyframe(dst)

    async def _drain_sends(self, limit: float = 30.0) -> None:
        if self._pending:
            await asyncio.wait(list(self._pending), timeout=limit)

    # --- epochs ----------------------------------------------------------------------------------

    def _enter_epoch(self, record: EpochRecord, k: int) -> None:
        """Run in `record`'s epoch from round k on: new positions, neighbourhood and fresh links."""
        s = self.settings
        previous = self.record
        self.record = record
        self.index = record.members.index(self.peer_id)
        self._index_of = {p: i for i, p in enumerate(record.members)}
        self._peer_of = {i: PeerID.from_base58(p) for i, p in enumerate(record.members)}
        self._unreachable = {}
        staying = {PeerID.from_base58(p) for p in record.members}
        for task, peer in list(self._pending.items()):  # sends to departed peers would only wait out timeouts
            if peer not in staying:
                task.cancel()
        topo = make_topology(s.topology, len(record.members), s.seed)
        self.algorithm.enter_epoch(topo.neighbourhood(self.index), record.number)
        self.algorithm.iteration = k
        self.inbox.enter_epoch(record.number, self._to_message)
        before = set(previous.members) if previous is not None else set()
        change = {
            "round": k,
            "epoch": record.number,
            "members": list(record.members),
            "joined": [p for p in record.members if p not in before] if previous else [],
            "left": [p for p in before if p not in record.members],
        }
        self.epoch_log.append(change)
        self.store.events.write("epoch_change", start_round=k, **{x: change[x] for x in change if x != "round"})
        if self.metrics is not None:
            self.metrics.epoch_changed(record.number, record.members)
        self.info.status = "training" if self.info.status != "leaving" else "leaving"
        self.agent.acknowledge(record)
        hood = self.algorithm.hood
        logger.info(
            "epoch %d at round %d: node %d of %d, in-neighbours %s, out-neighbours %s",
            record.number,
            k,
            self.index,
            len(record.members),
            list(hood.in_neighbours),
            list(hood.out_neighbours),
        )

    def _hurry(self) -> bool:
        """Stopping or leaving: wait only briefly for in-neighbours (their messages still count if in time)."""
        return self._stop.is_set() or self._leave_by is not None

    def _others_stay(self) -> bool:
        """Whether another live member of this epoch goes on training (else a leaver need not wait)."""
        alive = epochs.live(self.record, self.agent.infos)
        gone = epochs.gone(self.record, self.agent.infos)
        return any(m.status == "training" and p != self.peer_id and p not in gone for p, m in alive.items())

    def _excluded(self) -> set[int]:
        """Positions of in-neighbours not to wait for: those the epoch the run follows leaves out (a
        bounded exemption: this node enters that epoch at its start round), those that said they left
        or are done, and those that already sent a message of a later epoch (they moved on). A
        neighbour that is merely silent still gets the short grace: a node whose in-neighbours all
        died must not race ahead of the run on its own data."""
        out = {m.peer_id for m in self.agent.infos if m.status in ("left", "done")}
        out |= {sender for sender, _ in self.inbox.held}
        latest = self.agent.record
        if latest is not None and latest.rank > self.record.rank:
            out |= set(self.record.members) - set(latest.members)
        return {self._index_of[p] for p in out if p in self._index_of and p != self.peer_id}

    # --- the run ---------------------------------------------------------------------------------

    async def run(self) -> dict | None:
        """Join, train until the run's last round, write result.json. None if this node left first."""
        record = await self._wait_for_epoch()
        if record is None:
            return None
        await self._start_training(record)
        self._started = time.perf_counter()
        while True:
            outcome = await self._train(record)
            if outcome != "left out":
                break
            # an epoch went on without this node (it was thought gone): rejoin as a joiner, keeping its parameters
            logger.warning("the run went on without this node: rejoining as a joiner")
            self.info.status = "joining"
            await self.agent.announce()
            record = await self._wait_for_epoch(after=self.agent.record)
            if record is None:
                outcome = "stopped"
                break
        return await self._finish(outcome)

    async def _train(self, record: EpochRecord) -> str:
        """Rounds until the end ('done'), a stop ('stopped'), a graceful leave ('left') or an epoch that
        leaves this node out ('left out')."""
        loop = asyncio.get_running_loop()
        s = self.settings
        k = max(record.start_round, self.round if self.record is not None else 0)
        self._enter_epoch(record, k)
        self.round = self.info.round = k
        while k < self.rounds:
            if self._stop.is_set():
                return "stopped"
            if self._leave_by is not None and loop.time() > self._leave_by:
                logger.warning("no epoch without this node came within --leave-timeout: leaving anyway")
                return "left"
            if self._leave_by is not None and not self._others_stay():
                return "left"  # nobody stays to form an epoch without this node
            latest = self.agent.record
            if latest is not None and latest.rank > self.record.rank and k >= latest.start_round:
                if not self._in(latest):
                    return "left" if self._leave_by is not None else "left out"
                self._enter_epoch(latest, k)  # at its start round, or at once if this node read it late
            started = time.perf_counter()
            await self._round(k)
            k += 1
            self.round = self.info.round = k
            seconds = time.perf_counter() - started
            self.agent.round_times.append(seconds)
            if self.metrics is not None:
                self.metrics.observe_round(k, seconds)
                self.metrics.set_bytes(self.links.bytes_sent, self.links.frames_sent)
            if k % self.per_epoch == 0:
                await self._end_of_epoch(k // self.per_epoch)
            if k % s.checkpoint_every == 0:
                await loop.run_in_executor(self._compute, self._checkpoint)
        return "done"

    async def _round(self, k: int) -> None:
        loop = asyncio.get_running_loop()
        algo = self.algorithm
        for phase in algo.phases:
            out = await loop.run_in_executor(self._compute, algo.send, phase, k)
            await self._send_all(out)
            wait = bool(algo.hood.in_neighbours) and algo.expects_messages(phase, k)
            arrived = await self.inbox.collect(
                phase, k, algo.hood.in_neighbours, self.settings.round_timeout, self._hurry, self._excluded, wait
            )
            for j in self.inbox.silent():
                self.agent.report_silent(self.record.members[j])
            await loop.run_in_executor(self._compute, algo.receive, phase, k, arrived)

    async def _finish(self, outcome: str) -> dict | None:
        loop = asyncio.get_running_loop()
        self._finishing = True
        await self._drain_sends(limit=5.0 if outcome != "done" else 15.0)
        await loop.run_in_executor(self._compute, self._checkpoint)
        if outcome != "done":
            self.info.status = "left"
            self.store.events.write("leave", round=self.round, reason=outcome)
            await self.agent.announce()
            logger.info("left the run at round %d of %d; state saved in %s", self.round, self.rounds, self.state_dir)
            return None
        result = self._write_result()
        self.store.events.write("done", accuracy=result["accuracy"], rounds=self.round)
        self.info.status = "done"
        await self.agent.announce()
        await self._linger()
        return result

    async def _snapshot(self) -> tuple[int, object]:
        """What a donor serves a joiner: its current parameters (a consistent tensor: rounds replace
        `params`, they do not modify it in place)."""
        if self.algorithm is None:
            raise TransferError("this node is not training yet")
        return self.round, self.algorithm.params

    async def _end_of_epoch(self, epoch: int) -> None:
        loop = asyncio.get_running_loop()
        acc = await loop.run_in_executor(self._compute, accuracy, self.model, self.algorithm.params, self.test_bank)
        self.info.train_epoch, self.info.accuracy = epoch, acc
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
        progress = {
            "round": self.round,
            "rounds": self.rounds,
            "epoch": epoch,
            "membership_epoch": self.record.number,
            "accuracy": acc,
            "loss": self.info.loss,
            "bytes_sent": self.links.bytes_sent,
        }
        self.store.write_json("progress.json", progress)
        self.store.events.write("eval", **progress)
        if self.metrics is not None:
            self.metrics.observe_eval(self.info.loss, acc)
        await self.agent.announce()

    async def _linger(self, limit: float = 10.0) -> None:
        """Stay reachable briefly so slower members can still deliver to us and see us done."""
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        mine = set(self.record.members) if self.record is not None else set()
        while loop.time() < end and not self._stop.is_set():
            await self.agent.refresh()
            if all(m.status in ("done", "left") for m in self.agent.infos if m.peer_id in mine):
                return
            await asyncio.sleep(1.0)

    # --- state -----------------------------------------------------------------------------------

    def _write_result(self) -> dict:
        s = self.settings
        result = {
            "accuracy": self.history["accuracy"][-1] if self.history["accuracy"] else None,
            "rounds": self.round,
            "bytes_sent": self.links.bytes_sent,
            "messages_sent": self.links.frames_sent,
            "bytes_per_epoch": self.links.bytes_sent / s.epochs,
            "messages_per_epoch": self.links.frames_sent / s.epochs,
            "rejected": self.links.rejected,
            "seconds": time.perf_counter() - self._started,
            "index": self.index,
            "peer_id": self.peer_id,
            "fingerprint": self.model.fingerprint,
            "settings": s.to_dict(),
            "history": self.history,
            "epochs": self.epoch_log,
        }
        self.store.write_json("result.json", result)
        return result

    def _checkpoint(self) -> None:
        if self.algorithm is None:
            return
        meta = {
            "round": self.round,
            "index": self.index,
            "epoch": self.record.number if self.record is not None else -1,
            "members": list(self.record.members) if self.record is not None else [],
            "history": self.history,
            "epochs": self.epoch_log,
        }
        self.store.save(self.algorithm, meta)


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
    """Create a node, run it to the end (or until it leaves), always shut it down.
    SIGTERM or SIGINT: leave gracefully; a second one: stop now."""
    import signal

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_quiet_stream_resets)
    nodes: list[Node] = []
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        for n in nodes:
            n.request_leave() if signals == 1 else n.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    node = await Node.create(settings)
    nodes.append(node)
    if signals:  # a signal while the node was starting
        node.request_stop()
    try:
        return await node.run()
    finally:
        await node.shutdown()
