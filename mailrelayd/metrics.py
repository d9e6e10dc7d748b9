"""Prometheus metrics, served over HTTP only with `--metrics HOST:PORT`."""

from __future__ import annotations

import contextlib
import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.metrics import MetricWrapperBase

OUTCOMES = ("sent", "deferred", "failed")
STATES = ("queued", "deferred", "failed")
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def parse_listen(value: str) -> tuple[str, int]:
    """Split HOST:PORT (127.0.0.1:9464, [::1]:9464, localhost:9464); the host is required."""
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address needs brackets
    if not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"metrics address must be HOST:PORT, like 127.0.0.1:9464 or [::1]:9464, not {value!r}")
    return host, int(port)


class _Server(ThreadingMixIn, WSGIServer):
    """Serves each scrape on a thread of its own, none of which keeps the process alive."""

    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass


class Metrics:
    """The relay's metrics, in a registry of their own."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self._outcomes = {
            outcome: Counter(f"mailrelayd_messages_{outcome}", f"Messages {outcome}.", ["queue"], registry=registry)
            for outcome in OUTCOMES
        }
        self._seconds = Histogram("mailrelayd_delivery_seconds", "Time taken by each delivery attempt.",
                                  ["queue"], buckets=BUCKETS, registry=registry)
        self._messages = Gauge("mailrelayd_queue_messages", "Messages in the queue, by state.",
                               ["queue", "state"], registry=registry)
        self._oldest = Gauge("mailrelayd_oldest_queued_seconds", "Age of the oldest queued message (0: none).",
                             ["queue"], registry=registry)
        self._concurrency = Gauge("mailrelayd_concurrency", "Deliveries the queue's relay lets run at once now.",
                                  ["queue"], registry=registry)
        self._stalled = Gauge("mailrelayd_queue_stalled", "1 while the queue's relay loop has stopped turning.",
                              ["queue"], registry=registry)
        self._server = self._thread = None

    def delivery(self, queue: str, outcome: str, seconds: float) -> None:
        """Count one delivery attempt; `outcome` is sent, deferred or failed."""
        counter = self._outcomes.get(outcome)
        if counter is None:
            raise ValueError(f"unknown outcome {outcome!r}")
        counter.labels(queue).inc()
        self._seconds.labels(queue).observe(seconds)

    def queue_stats(self, queue: str, stats) -> None:
        """Set the gauges from `stats` (queued, deferred, failed, oldest_queued_s)."""
        for state in STATES:
            self._messages.labels(queue, state).set(getattr(stats, state))
        self._oldest.labels(queue).set(stats.oldest_queued_s or 0)

    def concurrency(self, queue: str, limit: int) -> None:
        self._concurrency.labels(queue).set(limit)

    def stalled(self, queue: str, stalled: bool) -> None:
        self._stalled.labels(queue).set(1 if stalled else 0)

    def forget(self, queue: str) -> None:
        """Drop every series of `queue` (no longer relayed)."""
        labelsets: list[tuple[MetricWrapperBase, tuple[str, ...]]] = [
            (metric, (queue,)) for metric in (*self._outcomes.values(), self._seconds, self._oldest, self._stalled,
                                                                   self._concurrency)]
        labelsets += [(self._messages, (queue, state)) for state in STATES]
        for metric, labels in labelsets:
            with contextlib.suppress(KeyError):  # older prometheus_client raise it if absent
                metric.remove(*labels)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port in a daemon thread; return the bound port.

        The server is built here from the library's WSGI app, as start_http_server only
        returns it (to close it) from prometheus-client 0.17 on, and Debian 12 has 0.16."""
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("_Server", (_Server,), {"address_family": family})
        self._server = make_server(host, port, make_wsgi_app(self.registry), server_class, handler_class=_Quiet)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True)
        self._thread.start()
        return self._server.server_port

    def close(self) -> None:
        """Stop the HTTP server, if any, and free its port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join()
            self._server = self._thread = None
