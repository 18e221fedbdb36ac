"""The daemon's event log (events.jsonl) and its Prometheus metrics."""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from p2pnode.node.errors import BadInput
from p2pnode.node.events import EventLog, read_events
from p2pnode.node.metrics import NodeMetrics


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick for 127.0.0.1:0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def sample(text: str, name: str, run: str) -> float:
    """The value of sample `name{run="..."}` in a Prometheus text exposition."""
    prefix = f'{name}{{run="{run}"}} '
    values = [float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)]
    assert len(values) == 1, f"expected one {prefix!r} sample in:\n{text}"
    return values[0]


# --- event log ---


def test_each_event_is_one_flushed_json_line_with_time_kind_and_fields(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    before = time.time()
    log.write("start", peer_id="QmPeer", run_id="run-1", settings={"lr": 0.1, "nodes": 4})
    log.write("epoch_change", epoch=1, start_round=7, members=("a", "b"), joined=["b"], left=[])
    log.write("eval", round=7, epoch=1, loss=np.float32(0.5), accuracy=0.75, bytes_sent=np.int64(1024))
    # read while the log is still open: each line must already be on disk
    lines = path.read_text().splitlines()
    log.close()

    events = [json.loads(line) for line in lines]
    assert [e["kind"] for e in events] == ["start", "epoch_change", "eval"]
    assert all(before <= e["t"] <= time.time() for e in events)
    assert events[0]["settings"] == {"lr": 0.1, "nodes": 4} and events[0]["peer_id"] == "QmPeer"
    assert events[1]["members"] == ["a", "b"] and events[1]["start_round"] == 7
    assert events[2]["loss"] == 0.5 and events[2]["bytes_sent"] == 1024
    assert read_events(path) == events


def test_nan_and_inf_are_written_as_null(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.write("eval", round=1, loss=math.nan, accuracy=math.inf, extra={"x": [-math.inf, 1.5, np.float64("nan")]})
    line = path.read_text().strip()
    event = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c} in {line}"))
    assert event["loss"] is None and event["accuracy"] is None
    assert event["extra"] == {"x": [None, 1.5, None]}


def test_rotation_keeps_the_newest_lines_and_one_old_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    max_bytes = 1000
    with EventLog(path, max_bytes=max_bytes) as log:
        for i in range(200):  # about 40 bytes a line: several rotations
            log.write("round", round=i)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.jsonl", "events.jsonl.1"]
    old = read_events(path.with_name("events.jsonl.1"))
    new = read_events(path)
    assert path.stat().st_size <= max_bytes and path.with_name("events.jsonl.1").stat().st_size <= max_bytes
    rounds = [e["round"] for e in old + new]
    assert rounds[-1] == 199
    assert rounds == list(range(200 - len(rounds), 200))  # a contiguous tail, nothing lost between the files
    assert len(old) > 0 and len(new) > 0


def test_unwritable_path_logs_one_warning_and_does_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the state folder should be")
    log = EventLog(blocker / "events.jsonl")
    with caplog.at_level(logging.WARNING, logger="p2pnode.node.events"):
        for i in range(5):
            log.write("round", round=i)
        log.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "events.jsonl" in warnings[0].getMessage()


def test_non_serialisable_field_raises_type_error(tmp_path: Path) -> None:
    with EventLog(tmp_path / "events.jsonl") as log, pytest.raises(TypeError):
        log.write("start", settings=object())


def test_read_events_skips_a_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.write("round", round=1)
        log.write("round", round=2)
    with path.open("ab") as f:
        f.write(b'{"t": 1.0, "kind": "eval", "loss": 0.')  # a crash in the middle of a line
    assert [e["round"] for e in read_events(path)] == [1, 2]


def test_appending_after_a_truncated_line_starts_a_new_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"t": 1.0, "kind": "round", "round": 1}\n{"t": 2.0, "kind": "rou')
    with EventLog(path) as log:  # a restarted daemon appends to the file the crashed one left
        log.write("start", peer_id="QmPeer")
    assert [e["kind"] for e in read_events(path)] == ["round", "start"]


# --- metrics ---


def test_observed_values_appear_in_render_with_the_run_label() -> None:
    metrics = NodeMetrics("run-a")
    metrics.observe_round(12, 3.5)
    metrics.observe_eval(loss=0.25, accuracy=0.875)
    metrics.set_bytes(bytes_sent=4096, messages_sent=9)
    metrics.refused()
    metrics.refused()
    metrics.epoch_changed(2, ["a", "b", "c"])
    metrics.epoch_changed(2, ["a", "b"])  # same epoch again: members change, no new epoch
    text = metrics.render()
    assert sample(text, "p2pnode_round", "run-a") == 12
    assert sample(text, "p2pnode_loss", "run-a") == 0.25
    assert sample(text, "p2pnode_test_accuracy", "run-a") == 0.875
    assert sample(text, "p2pnode_bytes_sent_total", "run-a") == 4096
    assert sample(text, "p2pnode_messages_sent_total", "run-a") == 9
    assert sample(text, "p2pnode_refused_messages_total", "run-a") == 2
    assert sample(text, "p2pnode_epoch", "run-a") == 2
    assert sample(text, "p2pnode_members", "run-a") == 2
    assert sample(text, "p2pnode_epoch_changes_total", "run-a") == 1
    assert sample(text, "p2pnode_round_seconds_count", "run-a") == 1
    assert sample(text, "p2pnode_round_seconds_sum", "run-a") == 3.5


def test_sent_totals_are_counters_set_from_absolute_values() -> None:
    metrics = NodeMetrics("run-a")
    metrics.set_bytes(bytes_sent=100, messages_sent=1)
    metrics.set_bytes(bytes_sent=300, messages_sent=3)
    text = metrics.render()
    for name in ("p2pnode_bytes_sent", "p2pnode_messages_sent"):
        assert re.search(rf"^# TYPE {name}(_total)? counter$", text, re.MULTILINE), text
    assert sample(text, "p2pnode_bytes_sent_total", "run-a") == 300  # the total, not 100 + 300
    assert sample(text, "p2pnode_messages_sent_total", "run-a") == 3


def test_two_node_metrics_in_one_process_do_not_collide() -> None:
    first, second = NodeMetrics("run-a"), NodeMetrics("run-b")
    first.observe_round(5, 1.0)
    second.observe_round(9, 1.0)
    assert sample(first.render(), "p2pnode_round", "run-a") == 5
    assert sample(second.render(), "p2pnode_round", "run-b") == 9
    assert 'run="run-b"' not in first.render()
    same_run = NodeMetrics("run-a")  # two nodes of one run in one process (the testnet)
    assert sample(same_run.render(), "p2pnode_round", "run-a") == 0


def test_loss_and_accuracy_are_nan_until_the_first_evaluation() -> None:
    metrics = NodeMetrics("run-a")
    assert math.isnan(sample(metrics.render(), "p2pnode_test_accuracy", "run-a"))
    assert math.isnan(sample(metrics.render(), "p2pnode_loss", "run-a"))


@pytest.mark.timeout(30)
def test_served_metrics_can_be_scraped_over_http() -> None:
    metrics = NodeMetrics("run-http")
    metrics.observe_round(3, 0.5)
    port = free_port()
    metrics.serve(port)
    try:
        text = scrape(port)
    finally:
        metrics.shutdown()
    assert sample(text, "p2pnode_round", "run-http") == 3


@pytest.mark.timeout(30)
def test_shutdown_frees_the_port() -> None:
    metrics = NodeMetrics("run-http")
    port = free_port()
    metrics.serve(port)
    metrics.shutdown()
    with pytest.raises(OSError):
        scrape(port)
    metrics.serve(port)  # the same port can be served again
    try:
        assert "p2pnode_round" in scrape(port)
    finally:
        metrics.shutdown()


@pytest.mark.timeout(30)
def test_a_port_in_use_raises_bad_input_naming_the_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        metrics = NodeMetrics("run-busy")
        with pytest.raises(BadInput, match=f"{port}.*in use") as caught:
            metrics.serve(port)
        assert "\n" not in str(caught.value)
        metrics.shutdown()  # nothing is served: a no-op
