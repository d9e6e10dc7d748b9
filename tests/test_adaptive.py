"""workers = "auto": the concurrency found as the relay goes, on a model mail system and a real relay."""

import threading

import pytest

from conftest import FakeClock, fossil_message, wait_until
from mailrelayd.concurrency import START, Concurrency, Gate


def run(concurrency: Concurrency, clock: FakeClock, rate_at, deliveries: int, failing=lambda limit: False,
        saturated: bool = True) -> list[int]:
    """Feed `deliveries` completions at the rate the model mail system gives for each limit;
    the limits seen along the way."""
    seen = []
    for _ in range(deliveries):
        limit = concurrency.limit
        clock.advance(1 / rate_at(limit))
        concurrency.done(temporary_failure=failing(limit), saturated=saturated)
        seen.append(concurrency.limit)
    return seen


def test_a_latency_bound_mail_system_gets_the_most_concurrency():
    """Where each delivery waits (a smarthost 100 ms away), the limit doubles up to max_workers."""
    clock = FakeClock(0.0)
    concurrency = Concurrency("auto", 32, clock=clock)
    assert concurrency.limit == START
    seen = run(concurrency, clock, lambda limit: limit / 0.1, 500)
    assert seen[-1] == 32 and seen.index(32) < START  # after the first window: one round trip


def test_a_mail_system_whose_rate_never_changes_is_not_given_the_most_concurrency():
    """Where any concurrency gives the same rate, the climb settles below max_workers (fewer cost the mail system less)."""
    clock = FakeClock(0.0)
    concurrency = Concurrency("auto", 32, clock=clock)
    seen = run(concurrency, clock, lambda limit: 1000, 3000)
    assert seen[-1] < 32


def test_a_mail_system_that_stops_gaining_halfway_up_a_step_settles_there():
    """Where the rate grows up to 16 and no further, the step to 32 is taken back to 16, not to 8."""
    clock = FakeClock(0.0)
    concurrency = Concurrency("auto", 32, clock=clock)
    seen = run(concurrency, clock, lambda limit: 100 * min(limit, 16), 3000)
    assert seen[-1] == 16 and 32 in seen


def test_a_cpu_bound_mail_system_stops_where_more_stops_paying():
    """Where the rate stops growing past 8 (the CPUs are busy) and falls beyond, the limit settles near 8."""
    clock = FakeClock(0.0)
    concurrency = Concurrency("auto", 32, clock=clock)
    seen = run(concurrency, clock, lambda limit: 100 * min(limit, 8) / (1 + max(0, limit - 8) / 8), 3000)
    assert 8 <= seen[-1] <= 10


def test_temporary_failures_halve_the_limit_at_once():
    """A burst of temporary failures halves the limit window by window, and it stays low for a cool-down."""
    clock = FakeClock(0.0)
    concurrency = Concurrency("auto", 32, clock=clock)
    run(concurrency, clock, lambda limit: limit / 0.1, 300)
    assert concurrency.limit == 32
    started = clock.now
    while concurrency.limit > 2:
        run(concurrency, clock, lambda limit: limit / 0.1, 1, failing=lambda limit: True)
    assert clock.now - started < 2  # seconds, on a mail system 100 ms away
    run(concurrency, clock, lambda limit: limit / 0.1, 20)
    assert concurrency.limit <= 2


def test_a_limit_never_reached_teaches_nothing():
    """When deliveries never wait for a free slot (a quiet queue), the limit stays where it is."""
    clock = FakeClock(0.0)
    concurrency = Concurrency("auto", 32, clock=clock)
    run(concurrency, clock, lambda limit: limit / 0.1, 500, saturated=False)
    assert concurrency.limit == START


def test_a_fixed_number_of_workers_never_moves():
    """workers = 6 is six, whatever happens."""
    clock = FakeClock(0.0)
    concurrency = Concurrency(6, 32, clock=clock)
    run(concurrency, clock, lambda limit: limit / 0.1, 200, failing=lambda limit: True)
    assert (concurrency.limit, concurrency.adaptive) == (6, False)


def test_the_gate_lets_waiting_deliveries_in_when_its_limit_rises_and_none_over_a_lowered_one():
    """Raising the gate's limit lets waiting threads in at once; after lowering it, one gets in only below it."""
    gate, lock, finish = Gate(2), threading.Lock(), threading.Event()
    running, entered_with = [0], []

    def deliver():
        with gate:
            with lock:
                running[0] += 1
                entered_with.append(running[0])
            finish.wait(30)
            with lock:
                running[0] -= 1

    threads = [threading.Thread(target=deliver) for _ in range(5)]
    for t in threads:
        t.start()
    wait_until(lambda: len(entered_with) == 2 and len(gate._waiting) == 3, what="two in, three waiting")
    gate.set_limit(4)
    wait_until(lambda: len(entered_with) == 4, what="two more let in")
    gate.set_limit(1)
    finish.set()
    for t in threads:
        t.join(30)
    assert max(entered_with[:4]) == 4 and entered_with[4] == 1


@pytest.mark.parametrize("kind", ["sqlite"])
def test_a_relay_on_a_slow_sendmail_raises_its_concurrency(sqlite_harness, fake_sendmail, make_relay, kind):
    """A real relay, workers auto, on a sendmail that takes 0.1 s: more deliveries run at once than it started with."""
    for i in range(120):
        sqlite_harness.enqueue(fossil_message(to=f"u{i}@example.com"))
    fake_sendmail.take_seconds(0.1)
    relay = make_relay(sqlite_harness, workers="auto")
    report = relay.drain()
    assert report.sent == 120 and relay.concurrency.limit > START
