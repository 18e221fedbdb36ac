"""A daemon's files in its state directory: checkpoint, progress, result and the event log.

- `state.safetensors` + `state.json`: the algorithm's state and what it belongs to (run, trunk,
  settings, round, membership epoch). Written atomically (temporary file, then rename).
- `progress.json` after every pass over the data, `result.json` at the end of the run.
- `events.jsonl` (see `node/events.py`).
A restart is a join (DESIGN §8): it takes the checkpoint's parameters, optimizer state and data
order, never its link state; `load` refuses a checkpoint of another run, trunk or settings.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .algorithms import Algorithm
from .events import EventLog
from .pace import unwrapped

logger = logging.getLogger(__name__)

IDENTITY_FIELDS = ("run_id", "fingerprint", "settings_hash")


@dataclass
class Checkpoint:
    state: dict[str, torch.Tensor]
    meta: dict

    @property
    def round(self) -> int:
        return int(self.meta.get("round", 0))


class StateStore:
    def __init__(self, state_dir: Path, identity: dict[str, str]) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.identity = identity  # run_id, fingerprint, settings_hash: what a checkpoint must match
        self.events = EventLog(self.dir / "events.jsonl")

    def write_json(self, name: str, payload: dict) -> None:
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, path)

    def save(self, algorithm: Algorithm, meta: dict) -> None:
        """Atomically write the whole algorithm state (safetensors) and its metadata (JSON)."""
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in algorithm.state_dict().items()}
        objective = unwrapped(algorithm.objective)
        if hasattr(objective, "_order"):
            state["objective.order"] = torch.as_tensor(objective._order.copy())
            meta = {**meta, "rng": objective.rng.bit_generator.state, "samples_seen": objective.samples_seen}
        tmp = self.dir / "state.safetensors.tmp"
        save_file(state, str(tmp))
        os.replace(tmp, self.dir / "state.safetensors")
        self.write_json("state.json", {**self.identity, **meta})

    def saved_round(self) -> int:
        """The round of this run's checkpoint, 0 if there is none (or it belongs to another run)."""
        meta = self._meta()
        return int(meta.get("round", 0)) if meta is not None and self._matches(meta) else 0

    def load(self, device: torch.device | str = "cpu") -> Checkpoint | None:
        """This run's checkpoint, or None (none there, or another run's: then say which fields differ)."""
        meta = self._meta()
        if meta is None or not (self.dir / "state.safetensors").is_file():
            return None
        if not self._matches(meta):
            differs = [k for k in IDENTITY_FIELDS if meta.get(k) != self.identity[k]]
            logger.warning("not resuming from %s: its %s differ from this run's", self.dir, ", ".join(differs))
            return None
        try:
            state = load_file(str(self.dir / "state.safetensors"), device=str(device))
        except Exception as e:  # a torn or foreign file: start afresh rather than crash
            logger.warning("not resuming from %s: the checkpoint cannot be read (%s)", self.dir, e)
            return None
        return Checkpoint(state, meta)

    @staticmethod
    def restore_objective(algorithm: Algorithm, checkpoint: Checkpoint) -> None:
        """Continue the checkpoint's mini-batch order instead of replaying it."""
        objective, meta = unwrapped(algorithm.objective), checkpoint.meta
        order = checkpoint.state.pop("objective.order", None)
        if order is not None and "rng" in meta:
            objective._order = order.cpu().numpy()
            objective.rng.bit_generator.state = meta["rng"]
            objective.samples_seen = meta["samples_seen"]

    def _meta(self) -> dict | None:
        path = self.dir / "state.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring %s: not readable JSON", path)
            return None

    def _matches(self, meta: dict) -> bool:
        return all(meta.get(k) == v for k, v in self.identity.items())

    def close(self) -> None:
        self.events.close()
