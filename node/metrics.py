"""Prometheus metrics of one peer daemon (`p2pnode start --metrics-port`), in a registry of its own.

Each `NodeMetrics` has its own `CollectorRegistry`, so several nodes in one process (the testnet, tests)
never collide and nothing lands in prometheus_client's global registry. Every metric carries the label
`run` (the run id):

- gauges `p2pnode_round`, `p2pnode_epoch` (membership epoch), `p2pnode_members`, `p2pnode_loss`,
  `p2pnode_test_accuracy`;
- counters `p2pnode_bytes_sent_total`, `p2pnode_messages_sent_total` (exposed from the daemon's own absolute
  totals by a collector), `p2pnode_refused_messages_total`, `p2pnode_epoch_changes_total`;
- histogram `p2pnode_round_seconds` (wall time per round).
"""

from __future__ import annotations

import errno
import logging
import math
import threading
from collections.abc import Collection, Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from .errors import BadInput

logger = logging.getLogger(__name__)

ROUND_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, math.inf)


class _TotalsCollector(Collector):
    """Counters whose values are the daemon's absolute totals (prometheus_client's Counter only increments)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.bytes_sent = 0.0
        self.messages_sent = 0.0

    def collect(self) -> Iterator[Metric]:
        for name, doc, value in (
            ("p2pnode_bytes_sent", "Bytes this node has sent to peers", self.bytes_sent),
            ("p2pnode_messages_sent", "Messages this node has sent to peers", self.messages_sent),
        ):
            family = CounterMetricFamily(name, doc, labels=["run"])
            family.add_metric([self.run_id], value)
            yield family


class NodeMetrics:
    """The metrics of one node of run `run_id`; `serve` exposes them over HTTP at `/metrics`."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["run"]
        r = self.registry
        self._round = Gauge("p2pnode_round", "Last finished round", labels, registry=r).labels(run_id)
        self._epoch = Gauge("p2pnode_epoch", "Membership epoch of the run", labels, registry=r).labels(run_id)
        self._members = Gauge("p2pnode_members", "Members in the current epoch", labels, registry=r).labels(run_id)
        self._loss = Gauge("p2pnode_loss", "Test loss at the last evaluation", labels, registry=r).labels(run_id)
        self._accuracy = Gauge(
            "p2pnode_test_accuracy", "Test accuracy (0..1) at the last evaluation", labels, registry=r
        ).labels(run_id)
        self._refused = Counter(
            "p2pnode_refused_messages", "Messages from peers that this node refused", labels, registry=r
        ).labels(run_id)
        self._epoch_changes = Counter(
            "p2pnode_epoch_changes", "Membership epochs this node has entered", labels, registry=r
        ).labels(run_id)
        self._round_seconds = Histogram(
            "p2pnode_round_seconds", "Wall time of a round", labels, registry=r, buckets=ROUND_SECONDS_BUCKETS
        ).labels(run_id)
        self._loss.set(math.nan)  # no evaluation yet: not a perfect loss or a zero accuracy
        self._accuracy.set(math.nan)
        self._totals = _TotalsCollector(run_id)
        r.register(self._totals)
        self._last_epoch: int | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_round(self, round: int, seconds: float) -> None:
        """Round `round` finished after `seconds` of wall time (a non-finite time is not observed)."""
        self._round.set(round)
        if math.isfinite(seconds):
            self._round_seconds.observe(seconds)

    def observe_eval(self, loss: float, accuracy: float) -> None:
        """The latest test loss and accuracy (0..1)."""
        self._loss.set(loss)
        self._accuracy.set(accuracy)

    def set_bytes(self, bytes_sent: int, messages_sent: int) -> None:
        """The node's total bytes and messages sent so far (absolute totals, not increments).

        They are exposed as counters, so they should only grow; a smaller value reads as a counter reset.
        """
        if bytes_sent < self._totals.bytes_sent or messages_sent < self._totals.messages_sent:
            logger.debug("Sent totals went down (%s, %s): a counter reset for Prometheus", bytes_sent, messages_sent)
        self._totals.bytes_sent = float(bytes_sent)
        self._totals.messages_sent = float(messages_sent)

    def refused(self) -> None:
        """A message from a peer was refused."""
        self._refused.inc()

    def epoch_changed(self, epoch: int, members: Collection[str] | int) -> None:
        """The node entered membership epoch `epoch` with `members` (peer ids, or their number).

        `p2pnode_epoch_changes_total` counts each epoch entered, the first one included; repeating the
        current epoch only updates the member count.
        """
        if epoch != self._last_epoch:
            self._epoch_changes.inc()
            self._last_epoch = epoch
        self._epoch.set(epoch)
        self._members.set(members if isinstance(members, int) else len(members))

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve `/metrics` on `addr:port` from a daemon thread until `shutdown`.

        The default binds the loopback interface only; pass `addr="0.0.0.0"` (or "::") to let a Prometheus
        server on another machine scrape it. Raises BadInput when the port is taken or cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError(f"metrics are already served on port {self._server.server_port}")
        if not 1 <= port <= 65535:
            raise BadInput(f"--metrics-port {port}: give a port from 1 to 65535")
        try:
            started = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise BadInput(
                    f"--metrics-port {port}: {addr}:{port} is already in use; pick another port "
                    "or stop the process that holds it"
                ) from e
            if e.errno == errno.EACCES:
                raise BadInput(f"--metrics-port {port}: not allowed to bind it; use a port above 1023") from e
            raise BadInput(f"--metrics-port {port}: cannot serve metrics on {addr}:{port} ({e.strerror or e})") from e
        self._server, self._thread = started
        logger.info("Serving metrics at http://%s:%d/metrics", addr, port)

    def shutdown(self) -> None:
        """Stop serving and free the port (nothing to do if not serving)."""
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def render(self) -> str:
        """The metrics in Prometheus' text format, as a scrape would get them."""
        return generate_latest(self.registry).decode()
