"""The run's event log: `STATE_DIR/events.jsonl`, one JSON object per line, written by the peer daemon.

Every line is `{"t": <unix time, float>, "kind": <kind>, ...fields}`. Non-finite floats (NaN, ±inf) are
written as `null`, so each line is valid JSON for any reader. Kinds and their fields (the schema):

- `start`: `peer_id` (str), `run_id` (str), `settings` (dict: the node's settings).
- `round`: `round` (int), `epoch` (int: membership epoch), `seconds` (float: wall time of the round).
- `eval`: `round` (int), `epoch` (int), `loss` (float | null), `accuracy` (float | null), `bytes_sent` (int).
- `epoch_change`: `epoch` (int), `start_round` (int: first round of the epoch), `members` (list[str]: peer ids
  in topology order), `joined` (list[str]), `left` (list[str]).
- `refused`: `peer` (str), `reason` (str): a message from that peer was refused.
- `leave`: no fields; the node leaves the run.
- `done`: `accuracy` (float | null), `rounds` (int).

Each line is flushed when written (a crash of the process loses at most the line in progress; an OS crash
may lose what the kernel had not yet written). When the file would pass `max_bytes` it is renamed to
`events.jsonl.1` (replacing the previous one) and a new file is started. A failing disk never stops training:
an `OSError` is logged once as a warning and the event is dropped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 50 * 2**20


def _json_safe(value: Any) -> Any:
    """`value` with non-finite floats as None, tuples and sets as lists, numpy/torch values as Python ones."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return _json_safe(value.tolist())
    return value  # json.dumps raises TypeError for anything else


class EventLog:
    """Appends events to a JSON-lines file; see the module docstring for the schema.

    Safe to call from several threads. The file (and its folder) is created on the first write.
    """

    def __init__(self, path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._file: BinaryIO | None = None
        self._size = 0
        self._failing = False  # an OSError was logged; stay quiet until a write succeeds again
        self._rotate_failing = False
        self._lock = threading.Lock()

    def write(self, kind: str, **fields: Any) -> None:
        """Append one event `{"t": now, "kind": kind, **fields}` and flush it.

        Raises TypeError if a field is not JSON-serialisable (a bug in the caller); never raises OSError.
        """
        if "t" in fields:
            raise TypeError("'t' is the event time and cannot be a field")
        record = {"t": time.time(), "kind": kind, **_json_safe(fields)}
        data = (json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n").encode()
        with self._lock:
            try:
                self._write_locked(data)
            except OSError as e:
                self._close_locked()  # reopen on the next write: the disk may have room again
                if not self._failing:
                    logger.warning(
                        "Cannot write the event log %s (%s); events are dropped until it works", self.path, e
                    )
                    self._failing = True
                return
            if self._failing:
                logger.info("Writing the event log %s again", self.path)
                self._failing = False

    def _write_locked(self, data: bytes) -> None:
        if self._file is None:
            self._open_locked()
        assert self._file is not None
        if self._size > 0 and self._size + len(data) > self.max_bytes:
            self._rotate_locked()
            assert self._file is not None
        self._file.write(data)
        self._file.flush()
        self._size += len(data)

    def _open_locked(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "ab")  # noqa: SIM115 - kept open across writes, closed in close()
        try:
            size = file.seek(0, os.SEEK_END)
            if size > 0 and not self._ends_with_newline():
                # a line cut short by a crash or a full disk: end it so the next event starts its own line
                file.write(b"\n")
                file.flush()
                size += 1
        except OSError:
            file.close()
            raise
        self._file, self._size = file, size

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def _rotate_locked(self) -> None:
        self._close_locked()
        old = self.path.with_name(self.path.name + ".1")
        try:
            os.replace(self.path, old)
        except OSError as e:  # keep appending to the full file rather than lose events
            if not self._rotate_failing:
                logger.warning("Cannot rotate the event log %s to %s (%s); it grows past its limit", self.path, old, e)
                self._rotate_failing = True
        else:
            self._rotate_failing = False
        self._open_locked()
        if self._rotate_failing:
            self._size = 0  # try rotating again only after another max_bytes

    def _close_locked(self) -> None:
        file, self._file, self._size = self._file, None, 0
        if file is not None:
            try:
                file.close()
            except OSError as e:
                logger.debug("Closing the event log %s: %s", self.path, e)

    def close(self) -> None:
        """Close the file (a later write opens it again)."""
        with self._lock:
            self._close_locked()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events in one file (not its rotated `.1`), in order.

    A truncated last line (the line in progress when a process died) is skipped silently; an unreadable
    line elsewhere is skipped with a warning.
    """
    lines = Path(path).read_bytes().split(b"\n")
    events: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if isinstance(event, dict):
            events.append(event)
        elif number < len(lines):  # a complete line (a newline follows it) that is not an event
            logger.warning("Skipping line %d of %s: not a JSON object", number, path)
        else:
            logger.debug("Skipping the truncated last line of %s", path)
    return events
