"""How one node's run ends (DESIGN §8): its result.json, the DHT record that says it is done, and a
short linger so that slower members can still deliver to it.

A node ends in one of four ways: it trained to the run's last round ("done"); the run finished while
it was left out of the last epoch (its machine slept: `FINISHED_WITHOUT_THIS_NODE`, its own
parameters, evaluated afresh); it comes back after the end with its checkpoint (the same outcome, for
the checkpoint); or it left or stopped first (no result, state saved).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .training import accuracy

if TYPE_CHECKING:
    from .daemon import Node

logger = logging.getLogger(__name__)

FINISHED_WITHOUT_THIS_NODE = "finished without this node"  # left out of the run's last epoch
LINGER_S = 10.0  # how long a finished node stays reachable for slower members at most


class RunEnd:
    """Ends one node's run: `await RunEnd(node).finish(outcome)` after its rounds."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def finish(self, outcome: str) -> dict | None:
        """Save the state, then write result.json and say done (None if the node left or stopped)."""
        node = self.node
        loop = asyncio.get_running_loop()
        node.finishing = True
        await asyncio.gather(*node.evaluations)
        await node.transport.drain(limit=5.0 if outcome != "done" else 15.0)
        await loop.run_in_executor(node.compute, node.checkpoint)
        if outcome not in ("done", FINISHED_WITHOUT_THIS_NODE):
            node.info.status = "left"
            node.store.events.write("leave", round=node.round, reason=outcome)
            await node.agent.announce()
            logger.info("left the run at round %d of %d; state saved in %s", node.round, node.rounds, node.state_dir)
            return None
        fresh = None  # left out: its last pass's evaluation is older than its parameters
        if outcome == FINISHED_WITHOUT_THIS_NODE:
            fresh = await loop.run_in_executor(node.compute, node.evaluate, node.algorithm.params)
        result = await self.done(outcome, fresh)
        await self.linger()
        return result

    async def of_checkpoint(self) -> dict | None:
        """The run finished while this node was away (stopped, crashed, asleep): with a checkpoint,
        its result is the checkpoint's parameters, evaluated now (None without one)."""
        node = self.node
        loop = asyncio.get_running_loop()
        checkpoint = await loop.run_in_executor(node.compute, node.store.load, node.device)
        if checkpoint is None:
            return None
        node.log.restore(checkpoint.meta)
        node.round = node.info.round = checkpoint.round
        params = checkpoint.state["params"]
        fresh = await loop.run_in_executor(node.compute, accuracy, node.model, params, node.test_bank)
        logger.warning("run %r finished while this node was away: its result is its checkpoint of round %d",
                       node.settings.run_id, node.round)  # fmt: skip
        return await self.done(FINISHED_WITHOUT_THIS_NODE, fresh)

    async def done(self, outcome: str, fresh: float | None = None) -> dict:
        """Write result.json (with `fresh`, an evaluation of the parameters of now, if given) and tell
        the run this node is done."""
        node = self.node
        result = self.write_result(outcome, fresh)
        node.store.events.write("done", accuracy=result["accuracy"], rounds=node.round)
        node.info.status = "done"
        await node.agent.announce()
        return result

    async def linger(self, limit: float = LINGER_S) -> None:
        """Stay reachable briefly so slower members can still deliver to us and see us done."""
        node = self.node
        loop = asyncio.get_running_loop()
        end = loop.time() + limit
        mine = set(node.record.members) if node.record is not None else set()
        while loop.time() < end and not node.stop_requested.is_set():
            await node.agent.refresh()
            if all(m.status in ("done", "left") for m in node.agent.infos if m.peer_id in mine):
                return
            await asyncio.sleep(1.0)

    def write_result(self, outcome: str, accuracy: float | None = None) -> dict:
        node = self.node
        s = node.settings
        links = node.links
        summary = {
            "outcome": outcome,
            "rounds": node.round,
            "bytes_sent": links.bytes_sent,
            "messages_sent": links.frames_sent,
            "bytes_per_epoch": links.bytes_sent / s.epochs,
            "messages_per_epoch": links.frames_sent / s.epochs,
            "rejected": links.rejected,
            # this node's view of each in-neighbour: [rounds, bytes, accepted, refused] (also in its DHT record)
            "contributions": node.contributions.summary(),
            "refused_by_link_limits": dict(links.refused),
            "banned": {str(p): reason for p, reason in links.banned.items()},
            "index": node.index,
            "peer_id": node.peer_id,
            "fingerprint": node.model.fingerprint,
            "settings": s.to_dict(),
        }
        if accuracy is not None:
            summary["accuracy"] = accuracy
        gradients = getattr(node.algorithm.objective, "gradients", None) if node.algorithm is not None else None
        if gradients is not None:  # --sync async or --slow: how many of its rounds had a new gradient
            summary["gradients"] = gradients
        weight = node.algorithm.gradient_weight if node.algorithm is not None else None
        if weight is not None:  # P2P-FT with --sync async --pace-batch: what its last gradient counted with
            summary["gradient_weight"] = weight
        return node.log.write_result(summary)
