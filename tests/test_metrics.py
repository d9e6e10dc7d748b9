"""Prometheus metrics: recorded values as scraped over HTTP."""

from __future__ import annotations

import socket
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailrelayd.metrics import Metrics, parse_listen


@pytest.fixture
def metrics():
    m = Metrics()
    yield m
    m.close()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def stats(queued=0, deferred=0, failed=0, oldest_queued_s=None):
    return SimpleNamespace(queued=queued, deferred=deferred, failed=failed, oldest_queued_s=oldest_queued_s)


def test_scraped_values_by_queue(metrics):
    port = metrics.serve("127.0.0.1", 0)
    for outcome, seconds in [("sent", 0.004), ("sent", 0.2), ("deferred", 3.0), ("failed", 0.02)]:
        metrics.delivery("/a.db", outcome, seconds)
    metrics.delivery("/spool", "sent", 90.0)
    metrics.queue_stats("/a.db", stats(queued=5, deferred=2, failed=1, oldest_queued_s=42.5))
    metrics.queue_stats("/spool", stats())

    values = scrape(port)
    a, spool = (("queue", "/a.db"),), (("queue", "/spool"),)
    assert values["mailrelayd_messages_sent_total", a] == 2
    assert values["mailrelayd_messages_deferred_total", a] == 1
    assert values["mailrelayd_messages_failed_total", a] == 1
    assert values["mailrelayd_messages_sent_total", spool] == 1
    assert ("mailrelayd_messages_failed_total", spool) not in values
    assert values["mailrelayd_delivery_seconds_count", a] == 4
    assert values["mailrelayd_delivery_seconds_sum", a] == pytest.approx(3.224)
    assert values["mailrelayd_delivery_seconds_bucket", (("le", "0.005"), *a)] == 1
    assert values["mailrelayd_delivery_seconds_bucket", (("le", "60.0"), *spool)] == 0
    assert values["mailrelayd_delivery_seconds_bucket", (("le", "+Inf"), *spool)] == 1
    for state, n in [("queued", 5), ("deferred", 2), ("failed", 1)]:
        assert values["mailrelayd_queue_messages", (*a, ("state", state))] == n
        assert values["mailrelayd_queue_messages", (*spool, ("state", state))] == 0
    assert values["mailrelayd_oldest_queued_seconds", a] == 42.5
    assert values["mailrelayd_oldest_queued_seconds", spool] == 0


def test_unknown_outcome_is_refused(metrics):
    with pytest.raises(ValueError):
        metrics.delivery("/a.db", "partly sent", 1.0)


def test_forget_removes_a_queues_series(metrics):
    port = metrics.serve("127.0.0.1", 0)
    for queue in ("/a.db", "/b.db"):
        metrics.delivery(queue, "sent", 0.1)
        metrics.queue_stats(queue, stats(queued=1, oldest_queued_s=3))
    metrics.forget("/a.db")
    metrics.forget("/never-seen")
    queues = {dict(labels).get("queue") for _, labels in scrape(port)}
    assert "/b.db" in queues and "/a.db" not in queues


def test_separate_registries(metrics):
    other = Metrics()  # no clash over metric names
    other.delivery("/a.db", "sent", 0.1)
    try:
        port = metrics.serve("127.0.0.1", 0)
        assert ("mailrelayd_messages_sent_total", (("queue", "/a.db"),)) not in scrape(port)
    finally:
        other.close()


def test_close_frees_the_port(metrics):
    port = metrics.serve("127.0.0.1", 0)
    scrape(port)
    metrics.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    again = Metrics()
    try:
        assert again.serve("127.0.0.1", port) == port
        scrape(port)
    finally:
        again.close()
    metrics.close()  # twice is harmless


@pytest.mark.parametrize("value, expected", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)),
    ("[::1]:9464", ("::1", 9464)),
    ("localhost:1", ("localhost", 1)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_parse_listen_accepts(value, expected):
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", [
    ":9464", "9464", "localhost", "localhost:", "localhost:0", "localhost:65536", "localhost:http",
    "::1:9464", "[]:9464", "localhost:-1", "localhost:٣",
])
def test_parse_listen_rejects(value):
    with pytest.raises(ValueError, match="HOST:PORT") as e:
        parse_listen(value)
    assert "\n" not in str(e.value)
