"""A daemon's files in its state directory: checkpoint, progress, result and the event log.

- `state.safetensors`: what a restart takes (parameters, optimizer state, data order) and, in its
  header, what it belongs to (run, trunk,
  settings, round, membership epoch), written together by one rename, so a crash between two files
  can never pair one checkpoint's tensors with another's round; `state.json`: a readable copy of
  that header (the only place older checkpoints kept it).
- `progress.json` after every pass over the data, `result.json` at the end of the run.
- `events.jsonl` (see `node/events.py`).
A restart is a join (DESIGN §8): it takes the checkpoint's parameters, optimizer state and data
order, never its link state. A checkpoint of another run, trunk or settings (or one that cannot be
read) is never resumed and never overwritten: opening the directory moves it, with that run's
progress and result, into `set-aside-<time>/`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .algorithms import Algorithm
from .errors import BadInput
from .events import EventLog
from .models import CHECKPOINT_HEADER_KEY
from .pace import unwrapped
from .training import BatchPosition

logger = logging.getLogger(__name__)

IDENTITY_FIELDS = ("run_id", "fingerprint", "settings_hash")
SET_ASIDE = "set-aside-"  # prefix of the folders that keep another run's files
RUN_FILES = ("state.safetensors", "state.json", "progress.json", "result.json")  # what one run leaves


def set_aside_run_files(state_dir: Path, why: str, names: Iterable[str] = RUN_FILES) -> Path | None:
    """Move the files (or folders) of `names` present in `state_dir` into a new `set-aside-<time>/` there
    (None if there are none), and say so."""
    present = [name for name in names if (state_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = state_dir / f"{SET_ASIDE}{stamp}", 1
    while target.exists():
        n += 1
        target = state_dir / f"{SET_ASIDE}{stamp}-{n}"
    target.mkdir()
    for name in present:
        os.replace(state_dir / name, target / name)
    logger.warning("%s: %s; its files are kept in %s", state_dir, why, target)
    return target


def replace_durably(tmp: Path, path: Path) -> None:
    """`os.replace(tmp, path)` with tmp's bytes on disk first and the rename after: after a power cut
    `path` is the old file or the whole new one, never a new name over a torn or zeroed file."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # some filesystems cannot sync a directory; the rename stands
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class UnreadableCheckpoint(Exception):
    pass


@dataclass
class Checkpoint:
    state: dict[str, torch.Tensor]
    meta: dict

    @property
    def round(self) -> int:
        return int(self.meta.get("round", 0))


def make_state_dir(state_dir: Path | str) -> Path:
    """The state directory, created if missing; BadInput if it cannot be (a file there, no permission)."""
    path = Path(state_dir)
    if path.exists() and not path.is_dir():
        raise BadInput(f"--state-dir {path} is a file: give a directory (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot use --state-dir {path}: {e.strerror or e}") from None
    return path


class StateDirLock:
    """One daemon per state directory: an exclusive lock on STATE_DIR/lock, held until `release` or
    the process's end (a crash frees it), so that two daemons started on one directory by mistake
    never write over each other's checkpoints."""

    def __init__(self, path: Path, handle: TextIO) -> None:
        self.path, self._handle = path, handle

    @classmethod
    def acquire(cls, state_dir: Path | str) -> StateDirLock:
        path = make_state_dir(state_dir) / "lock"
        handle = open(path, "a+")  # noqa: SIM115 - held open for as long as the lock
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # a filesystem without locks (some NFS)
                logger.warning("cannot lock %s (%s): make sure no other node uses this directory", path, e)
                return cls(path, handle)
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise BadInput(
                f"--state-dir {path.parent} is in use by another p2pnode (pid {holder}): "
                "give each node its own state directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        return cls(path, handle)

    def release(self) -> None:
        if not self._handle.closed:
            self._handle.close()  # closing the file drops the lock


class StateStore:
    def __init__(self, state_dir: Path, identity: dict[str, str]) -> None:
        self.dir = make_state_dir(state_dir)
        self.identity = identity  # run_id, fingerprint, settings_hash: what a checkpoint must match
        self.set_aside: Path | None = None  # where another run's files went, if any
        self._failing = False  # the last write failed (disk full?)
        self._set_aside_other_runs()
        self.events = EventLog(self.dir / "events.jsonl")

    def write_json(self, name: str, payload: dict) -> bool:
        """Atomically (re)write `name`; False if the disk refused (full, gone), the old file kept."""
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(payload, indent=1))
            replace_durably(tmp, path)
        except OSError as e:
            self._failed_write(name, tmp, e)
            return False
        self._failing = False
        return True

    def save(self, algorithm: Algorithm, meta: dict) -> bool:
        """Atomically write what a restart takes (the model state and the data order) and its metadata (one
        safetensors file), then the metadata's readable copy (JSON). False if the disk refused: the
        previous checkpoint stays, and training goes on (the next checkpoint tries again)."""
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in algorithm.model_state_dict().items()}
        objective = unwrapped(algorithm.objective)
        if hasattr(objective, "position"):
            position = objective.position()
            state["objective.order"] = torch.as_tensor(position.order.copy())
            meta = {**meta, "rng": position.rng, "samples_seen": position.samples_seen}
        meta = {**self.identity, **meta}
        tmp = self.dir / "state.safetensors.tmp"
        try:
            save_file(state, str(tmp), metadata={CHECKPOINT_HEADER_KEY: json.dumps(meta)})
            replace_durably(tmp, self.dir / "state.safetensors")
        except (OSError, SafetensorError) as e:
            self._failed_write(f"the checkpoint of round {meta.get('round', '?')}", tmp, e)
            return False
        return self.write_json("state.json", meta)

    def _failed_write(self, what: str, tmp: Path, error: Exception) -> None:
        tmp.unlink(missing_ok=True)  # a partial file would only take more of a full disk
        log = logger.warning if self._failing else logger.error  # loud once per streak of failures
        self._failing = True
        log("could not write %s in %s (%s); the previous one is kept and training goes on", what, self.dir, error)

    def saved_round(self) -> int:
        """The round of this run's checkpoint, 0 if there is none."""
        try:
            meta = self._meta()
        except UnreadableCheckpoint:
            return 0
        return int(meta.get("round", 0)) if meta is not None and self._matches(meta) else 0

    def load(self, device: torch.device | str = "cpu") -> Checkpoint | None:
        """This run's checkpoint, or None (there is none; one that cannot be read is set aside)."""
        try:
            meta = self._meta()
            if meta is None or not (self.dir / "state.safetensors").is_file() or not self._matches(meta):
                return None
            state = load_file(str(self.dir / "state.safetensors"), device=str(device))
        except Exception as e:  # a torn or foreign file: start afresh, keeping it for a look
            self._move_aside(f"the checkpoint cannot be read ({e})")
            return None
        return Checkpoint(state, meta)

    @staticmethod
    def restore_objective(algorithm: Algorithm, checkpoint: Checkpoint) -> None:
        """Continue the checkpoint's mini-batch order instead of replaying it."""
        objective, meta = unwrapped(algorithm.objective), checkpoint.meta
        order = checkpoint.state.pop("objective.order", None)
        if order is not None and "rng" in meta:
            objective.resume(BatchPosition(order.cpu().numpy(), meta["rng"], meta["samples_seen"]))

    def _meta(self) -> dict | None:
        """The checkpoint's metadata: state.safetensors' header, else state.json (older checkpoints,
        or the first checkpoint's tensors not yet written); None if there is no checkpoint."""
        tensors, copy = self.dir / "state.safetensors", self.dir / "state.json"
        try:
            if tensors.is_file():
                with safe_open(str(tensors), framework="pt") as f:
                    header = (f.metadata() or {}).get(CHECKPOINT_HEADER_KEY)
                if header is not None:
                    return json.loads(header)
            return json.loads(copy.read_text()) if copy.is_file() else None
        except Exception as e:
            raise UnreadableCheckpoint(str(e)) from None

    def _set_aside_other_runs(self) -> None:
        """Move another run's (or an unreadable) checkpoint and its progress and result out of the way."""
        try:
            meta = self._meta()
        except UnreadableCheckpoint as e:
            self._move_aside(f"its checkpoint cannot be read ({e})")
            return
        if meta is not None and not self._matches(meta):
            differs = [k for k in IDENTITY_FIELDS if meta.get(k) != self.identity[k]]
            self._move_aside(f"its checkpoint's {', '.join(differs)} differ from this run's")

    def _move_aside(self, why: str) -> None:
        self.set_aside = set_aside_run_files(self.dir, f"not resuming: {why}")

    def _matches(self, meta: dict) -> bool:
        return all(meta.get(k) == v for k, v in self.identity.items())

    def close(self) -> None:
        self.events.close()
