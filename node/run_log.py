"""What a daemon keeps about its own run: one evaluation per pass over the data (`progress.json` and
an `eval` event), every membership epoch it entered, its time in rounds, and at the end `result.json`.
A checkpoint carries the history and the epochs (`meta`), so a restarted node goes on with them."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from .state_store import StateStore

logger = logging.getLogger(__name__)


@dataclass
class RunLog:
    store: StateStore
    history: dict[str, list] = field(default_factory=lambda: {"epoch": [], "accuracy": [], "loss": []})
    epochs: list[dict] = field(default_factory=list)  # every epoch change this node saw
    round_seconds: float = 0.0  # wall time in rounds
    wait_seconds: float = 0.0  # of round_seconds: waiting for in-neighbours' messages
    started: float = field(default_factory=time.perf_counter)

    def meta(self) -> dict:
        """What a checkpoint keeps of this log."""
        return {"history": self.history, "epochs": self.epochs}

    def restore(self, meta: dict) -> None:
        """Go on with the history and epochs of a checkpoint's `meta`."""
        self.history = meta.get("history", self.history)
        self.epochs = meta.get("epochs", [])

    def evaluation(self, progress: dict) -> None:
        """Record a pass's evaluation: `progress` (written as progress.json and an `eval` event) names
        its epoch, accuracy and loss (None where no step was taken since a restart)."""
        for key in ("epoch", "accuracy", "loss"):
            self.history[key].append(progress[key])
        self.store.write_json("progress.json", progress)
        self.store.events.write("eval", **progress)

    @property
    def accuracy(self) -> float | None:
        """The last evaluation's accuracy (None before the first)."""
        return self.history["accuracy"][-1] if self.history["accuracy"] else None

    def write_result(self, summary: dict) -> dict:
        """result.json: `summary` (what the node says of its run) with this log's times, history and epochs."""
        result = {
            "accuracy": self.accuracy,
            **summary,
            "seconds": time.perf_counter() - self.started,
            "round_seconds": self.round_seconds,
            "wait_seconds": self.wait_seconds,
            "history": self.history,
            "epochs": self.epochs,
        }
        if not self.store.write_json("result.json", result):  # the disk refused: the log keeps the result
            logger.error("result.json not written; the result: %s", json.dumps(result))
        return result
