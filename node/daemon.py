"""The peer daemon behind `p2pnode start`: one `Node` per machine, a member of an elastic run.

A node prepares its model and data, joins the run's DHT, and waits for an epoch record that names
it (`node/membership.py`, `node/epochs.py`): epoch 0 once `--nodes` peers are present, or a later
epoch that lets it in as a joiner, with parameters from its own checkpoint or a donor
(`protocol/transfer.py`). Then it drives the same algorithm object the simulator uses, round after
round: for each phase it sends `send`, waits until every in-neighbour's message for the round has
arrived or its deadline passed (`node/rounds.py`), and applies `receive` in a worker thread. Between
rounds it enters the next epoch at the round that epoch names. SIGTERM makes it leave gracefully;
a second signal stops it at once. Files in the state directory: `node/state_store.py`; which peers
it lets in: `node/peer_gate.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hivemind
import torch

from ..protocol.codecs import get_codec
from ..protocol.envelope import max_frame_bytes
from ..protocol.links import Links
from ..protocol.membership import EpochRecord, MemberInfo, Membership, run_validators
from ..protocol.transfer import TransferError, fetch_state, serve_state
from .access import run_access
from .algorithms import ALGORITHMS, Algorithm, StepRule
from .contributions import Contributions
from .dht_process import start_dht, stop_dht
from .driver import RoundDriver
from .errors import BadInput, RunFinished
from .finish import FINISHED_WITHOUT_THIS_NODE, RunEnd
from .membership import MembershipAgent
from .metrics import NodeMetrics
from .pace import daemon_objective
from .peer_gate import PeerGate
from .rounds import Inbox
from .run_log import RunLog
from .settings import NodeSettings
from .simulator import check_local_steps, iterations_per_epoch, local_steps, objective_seed, step_schedule
from .state_store import StateDirLock, StateStore
from .topology import make_topology
from .training import FeatureBank, VisionObjective, accuracy, local_indices, prepare_model_and_data
from .transport import Transport

logger = logging.getLogger(__name__)


class Node:
    """A peer of one run. Build with `await Node.create(settings)`, then `await node.run()`."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.dht: hivemind.DHT | None = None
        self.p2p = None
        self.links: Links | None = None
        self.transport: Transport | None = None
        self.agent: MembershipAgent | None = None
        self.store: StateStore | None = None
        self.state_lock: StateDirLock | None = None
        self.log: RunLog | None = None  # evaluations, epochs entered, round times, result.json
        self.metrics: NodeMetrics | None = None
        self.algorithm: Algorithm | None = None
        self.record: EpochRecord | None = None  # the epoch this node runs in
        self.index = -1
        self.round = 0
        self.rounds = 0
        self.per_epoch = 1
        self.inbox = Inbox(silent_seconds=max(10.0, 2 * settings.heartbeat))
        self.driver = RoundDriver(self)
        self.ending = RunEnd(self)
        self.stop_requested = asyncio.Event()
        self.leave_by: float | None = None  # loop time after which a leaving node just goes
        self.finishing = False  # past the last round: a signal stops at once
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="p2pnode-train")
        self.evaluator = ThreadPoolExecutor(1, thread_name_prefix="p2pnode-eval")  # --sync async: beside the rounds
        self.evaluations: list[asyncio.Task] = []
        self.info: MemberInfo | None = None
        self.contributions = Contributions()
        self.gate: PeerGate | None = None  # who may open a stream to this node

    # --- lifecycle -------------------------------------------------------------------------------

    @classmethod
    async def create(cls, settings: NodeSettings) -> Node:
        self = cls(settings)
        self.access = run_access(settings.run_id, settings.owner, settings.invite, settings.identity)
        self.gate = PeerGate(self.access.admission, lambda: self.record, self.stop_requested.is_set)
        self.state_lock = StateDirLock.acquire(self.state_dir)
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
        self.model, self.data = await loop.run_in_executor(self.compute, prepare_model_and_data, s, self.device)
        labels = self.data.train_labels
        self.indices = local_indices(s, labels, self.data.num_classes, self.data.name)

        def banks() -> tuple[FeatureBank, FeatureBank]:
            train = FeatureBank(
                self.model,
                self.data.train,
                labels,
                self.indices,
                s.cache_features,
                self.device,
            )
            test = FeatureBank(
                self.model,
                self.data.test,
                self.data.test_labels,
                None,
                True,
                self.device,
            )
            return train, test

        self.train_bank, self.test_bank = await loop.run_in_executor(self.compute, banks)
        self.store = StateStore(
            self.state_dir,
            {
                "run_id": s.run_id,
                "fingerprint": self.model.fingerprint,
                "settings_hash": s.settings_hash(),
            },
        )
        self.log = RunLog(self.store)
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
        validators = run_validators(s.run_id, self.access.signing_key, s.owner)
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
        self.transport = Transport(
            s.run_id,
            self.peer_id,
            self.inbox,
            known_peers=self.gate.known_peers,
            on_refused=self._on_refused,
            on_heard=self._on_heard,
            on_newer_epoch=self._on_newer_epoch,
            may_hold=self.gate.may_hold,
            sent_to_an_earlier_process=self._sent_to_an_earlier_process,
        )
        self.links = self.transport.links = await Links.create(
            self.p2p,
            s.run_id,
            self.transport.on_frame,
            # every message carries one vector of the trainable size and at most a float64 scalar
            max_bytes=max_frame_bytes({"v": (self.model.num_trainable,), "w": (1,)}, s.codec),
            timeout=max(30.0, s.round_timeout),
            admit=self.gate.admits,
        )
        await serve_state(self.p2p, s.run_id, self._snapshot, admit=self.gate.admits)
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
            settings=s.shown_run_fields(),
            invitation=self.access.invitation,
            contributions=self.contributions.view,
        )
        membership = Membership(self.dht, s.run_id, validators[0], ttl=4 * s.heartbeat, admission=self.access.admission)
        self.agent = self.gate.agent = await MembershipAgent.create(membership, self.info, s.heartbeat)
        self.agent.on_change = lambda _record: self.inbox.arrival.set()  # wake a waiting round
        self.store.events.write("start", peer_id=self.peer_id, run_id=s.run_id, settings=s.to_dict())
        for addr in self.dht.get_visible_maddrs():
            logger.info("listening on %s", addr)

    def request_leave(self) -> None:
        """SIGTERM: leave gracefully (take part until the epoch that drops this node, at most
        --leave-timeout seconds); a node not yet in a run, or a second request, stops at once."""
        if self.algorithm is None or self.leave_by is not None or self.finishing:
            self.request_stop()
            return
        self.leave_by = asyncio.get_running_loop().time() + self.settings.leave_timeout
        self.info.status = "leaving"
        self.inbox.arrival.set()  # a waiting round re-checks its deadline: a leaver waits only briefly
        logger.info(
            "leaving: waiting for the epoch that drops this node (at most %.0f s)",
            self.settings.leave_timeout,
        )
        if self.agent is not None:
            self.agent.announce_soon()

    def request_stop(self) -> None:
        """Finish the current step, checkpoint and go now."""
        self.stop_requested.set()
        self.inbox.arrival.set()  # wake a round that is waiting for messages

    async def shutdown(self) -> None:
        if self.transport is not None:
            self.transport.cancel()
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
        if self.state_lock is not None:
            self.state_lock.release()
        self.compute.shutdown(wait=True)
        self.evaluator.shutdown(wait=True)
        if self.algorithm is not None and hasattr(self.algorithm.objective, "shutdown"):
            self.algorithm.objective.shutdown()
        if self.transport is not None:
            self.transport.shutdown()

    # --- joining ---------------------------------------------------------------------------------

    def _schedule(self, members: list[MemberInfo]) -> tuple[int, int]:
        """The run's length, fixed at epoch 0 from the first members' data (shared by all nodes)."""
        s = self.settings
        samples = sum(m.samples for m in members)
        check_local_steps(samples, len(members), s.batch_size, local_steps(s, s.algorithm))
        per_epoch = iterations_per_epoch(samples, len(members), s.batch_size, local_steps(s, s.algorithm))
        return per_epoch * s.epochs, per_epoch

    async def _wait_for_epoch(self, after: EpochRecord | None = None) -> EpochRecord | None:
        s = self.settings
        return await self.agent.wait_for_epoch(
            s.run_id, s.nodes, self._schedule, s.join_timeout, self.stop_requested.is_set, after
        )

    def in_record(self, record: EpochRecord) -> bool:
        """Whether `record` names this node, in this process (an earlier process's membership is not ours)."""
        return record.includes(self.peer_id, self.info.incarnation)

    async def _start_training(self, record: EpochRecord) -> None:
        """Build the algorithm for the first epoch this node is in: parameters from its checkpoint
        (a restart), the model (epoch 0 of a fresh run) or a donor (a joiner)."""
        s = self.settings
        loop = asyncio.get_running_loop()
        self.rounds, self.per_epoch = record.rounds, record.per_epoch
        self.info.rounds = self.rounds
        checkpoint = await loop.run_in_executor(self.compute, self.store.load, self.device)
        initial = self.model.trainable_vector().to(self.device)
        source = "the model's initial parameters"
        if checkpoint is not None:
            initial, source = (
                checkpoint.state["params"],
                f"its checkpoint of round {checkpoint.round}",
            )
            self.log.restore(checkpoint.meta)
            self.round = self.info.round = checkpoint.round
        elif record.start_round > 0 or record.donors:
            donors = [p for p in record.donors if p != self.peer_id]
            try:
                got = await fetch_state(
                    self.p2p,
                    s.run_id,
                    donors,
                    initial.numel(),
                    total_timeout=s.join_timeout / 4,
                )
                initial, source = (
                    got.params.to(self.device),
                    f"donor {got.donor[-8:]} at round {got.round}",
                )
            except TransferError as e:
                logger.warning(
                    "%s; starting from the model's initial parameters (mixing pulls them in)",
                    e,
                )
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
        objective = daemon_objective(objective, s, self.driver)
        codec = None if s.codec == "none" else get_codec(s.codec)
        step = StepRule(step_schedule(s, self.rounds), s.momentum, s.optimizer)

        def build() -> Algorithm:
            algo = ALGORITHMS[s.algorithm](topo.neighbourhood(index), objective, initial, step, codec, s.gamma)
            algo.configure(iterations_per_epoch=self.per_epoch, settings=s)
            if checkpoint is not None:
                StateStore.restore_objective(algo, checkpoint)
                algo.load_model_state(checkpoint.state)  # parameters and momentum, never link state
            return algo

        self.algorithm = await loop.run_in_executor(self.compute, build)
        logger.info("starting from %s", source)
        if checkpoint is not None:
            logger.info("resumed from %s at round %d", self.state_dir, checkpoint.round)

    # --- what the transport asks of the node ------------------------------------------------------

    def _on_heard(self, sender: str, round_: int, nbytes: int) -> None:
        self.contributions.accepted(sender, round_, nbytes)
        if self.agent is not None:
            self.agent.heard_from(sender)

    def _on_refused(self, sender: str, reason: str) -> None:
        self.contributions.refused(sender)
        if self.store is not None:
            self.store.events.write("refused", peer=sender, reason=reason)
        if self.metrics is not None:
            self.metrics.refused()

    def _sent_to_an_earlier_process(self, epoch: int) -> bool:
        """Whether frames of `epoch` were meant for an earlier process with this peer id: a record of that
        epoch read here names this peer id, but not this process."""
        named = [r for r in self.agent.records if r.number == epoch and self.peer_id in r.members] if self.agent else []
        return bool(named) and not any(self.in_record(r) for r in named)  # one per proposer, each the same way

    def _on_newer_epoch(self, epoch: int) -> None:
        if self.agent is not None and (self.agent.record is None or self.agent.record.number < epoch):
            self.agent.wake()  # a newer epoch exists that this node has not read yet: read now

    # --- the run ---------------------------------------------------------------------------------

    async def run(self) -> dict | None:
        """Join, train until the run's last round, write result.json. None if this node left first."""
        try:
            record = await self._wait_for_epoch()
        except RunFinished:
            result = await self.ending.of_checkpoint()
            if result is None:
                raise
            return result
        if record is None:
            logger.info("stopped before the run started: nothing trained, nothing to keep")
            return None
        await self._start_training(record)
        self.log.started = time.perf_counter()
        while True:
            outcome = await self.driver.train(record)
            if outcome != "left out":
                break
            # an epoch went on without this node (it was thought gone): rejoin as a joiner, keeping its parameters
            logger.warning("the run went on without this node: rejoining as a joiner")
            self.info.status = "joining"
            await self.agent.announce()
            try:
                record = await self._wait_for_epoch(after=self.agent.record)
            except RunFinished as e:
                logger.warning("%s: this node was left out at round %d of %d; its result is its own parameters",
                               e, self.round, self.rounds)  # fmt: skip
                outcome = FINISHED_WITHOUT_THIS_NODE
                break
            if record is None:
                outcome = "stopped"
                break
        return await self.ending.finish(outcome)

    async def _snapshot(self) -> tuple[int, object]:
        """What a donor serves a joiner: its current parameters (a consistent tensor: rounds replace
        `params`, they do not modify it in place)."""
        if self.algorithm is None:
            raise TransferError("this node is not training yet")
        return self.round, self.algorithm.params

    async def end_of_epoch(self, epoch: int) -> None:
        """Evaluate the parameters of now (rounds replace `params`, never modify it in place). With
        asynchronous rounds it runs beside the round loop (`self.evaluations`): a slow machine's
        evaluation must not hold up the neighbours that wait for its messages."""
        loop = asyncio.get_running_loop()
        params, round_ = self.algorithm.params, self.round
        pool = self.evaluator if self.algorithm.asynchronous else self.compute
        acc = await loop.run_in_executor(pool, self.evaluate, params)
        self.info.train_epoch, self.info.accuracy = epoch, acc
        self.info.loss = float(self.algorithm.last_loss)
        self.info.bytes_sent = self.links.bytes_sent
        # no training step since the node (re)started (it jumped to an epoch's start round): no loss to report
        loss = self.info.loss if math.isfinite(self.info.loss) else None
        logger.info(
            "round %d/%d epoch %s: loss %.4f, test accuracy %.1f%%, sent %.1f MB",
            round_,
            self.rounds,
            epoch,
            self.info.loss,
            100 * acc,
            self.links.bytes_sent / 1e6,
        )
        progress = {
            "round": round_,
            "rounds": self.rounds,
            "epoch": epoch,
            "membership_epoch": self.record.number,
            "accuracy": acc,
            "loss": loss,
            "bytes_sent": self.links.bytes_sent,
        }
        self.log.evaluation(progress)
        if self.metrics is not None:
            self.metrics.observe_eval(self.info.loss, acc)
        await self.agent.announce()

    def evaluate(self, params: torch.Tensor) -> float:
        with self.algorithm.model_in_use():
            return accuracy(self.model, params, self.test_bank)

    # --- state -----------------------------------------------------------------------------------

    def checkpoint(self) -> None:
        if self.algorithm is None:
            return
        if not torch.isfinite(self.algorithm.params).all():  # diverged: keep the last good checkpoint
            logger.error("parameters not finite at round %d: keeping the checkpoint in %s", self.round, self.state_dir)
            return
        meta = {
            "round": self.round,
            "index": self.index,
            "epoch": self.record.number if self.record is not None else -1,
            "members": list(self.record.members) if self.record is not None else [],
            **self.log.meta(),
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
