"""The long-running process: one relay per queue, each on its own thread, supervised.

The main thread only supervises. It starts a relay for each configured queue (and for
a glob's matches as they appear), holds each queue's single-relay lock, tells systemd
how things are (READY, STATUS, WATCHDOG while the supervisor itself runs, STOPPING),
feeds the metrics, and acts on the flags that signal handlers set (SIGHUP reload, SIGUSR1 scan, SIGTERM stop).

One queue's trouble is that queue's alone: a relay that crashes (a bug, or input nobody
foresaw) is logged and started again after a backoff (1 s doubling to 5 min) while the
others go on; one whose loop stops turning is reported as stalled (log, STATUS=, metrics)
and never stops the watchdog pings. Only a failure of the supervisor ends the process
(exit status 70).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from mailrelayd import log as logmod
from mailrelayd.config import Config, ConfigError, expand, is_glob
from mailrelayd.log import get_logger
from mailrelayd.queuelock import QueueLock
from mailrelayd.relay import Relay
from mailrelayd.sdnotify import Notifier
from mailrelayd.supervision import Supervision
from mailrelayd.wakeup import Wakeup
from mailrelayd.watch import Watcher

STATUS_EVERY = 10.0  # STATUS= line and metrics gauges
MAX_SLEEP = 15.0  # a relay's loop turns at least this often
STALLED_TURNS = 4  # a relay whose loop has missed this many turns (of max_sleep) is stalled
RESTART_FIRST, RESTART_MAX = 1.0, 300.0  # backoff between restarts of a crashing relay
HEALTHY_RUN = 300.0  # a relay that ran this long before it crashed starts its backoff afresh
_CRASHED = -1


class QueueHeld(Exception):
    """Another process relays this queue (exit status 75)."""

    def __init__(self, path: Path, pid: int):
        super().__init__(f"{path} is relayed by another mailrelayd (pid {pid or 'unknown'});"
                         " stop it, or give --allow-concurrent to run beside it")
        self.path, self.pid = path, pid


@dataclass
class _Running:
    config: Config
    relay: Relay
    thread: threading.Thread = field(init=False)
    status: int | None = None  # Relay.run's exit status (or _CRASHED), once it has returned
    error: str = ""  # what it crashed with
    noted: str = ""  # what its lock file says of it
    started: float = 0.0


class Service:
    def __init__(self, config: Config, *, build_relay: Callable[[Config, Supervision], Relay],
                 reload_config: Callable[[], Config], notifier: Notifier | None = None, metrics=None,
                 lock_path: Callable[[Config], Path], configure_log: Callable[[Config], None] = lambda c: None,
                 monotonic: Callable[[], float] = time.monotonic):
        self.config = config
        self.build_relay = build_relay
        self.reload_config = reload_config
        self.notifier = notifier or Notifier.from_environment({})
        self.metrics = metrics
        self.lock_path = lock_path
        self.configure_log = configure_log
        self.monotonic = monotonic
        self.log = get_logger()
        self._running: dict[Path, _Running] = {}
        self._locks: dict[Path, QueueLock] = {}
        self._said: dict[Path, str] = {}  # a waiting queue's problem, logged once
        self._ended: dict[Path, int] = {}  # queues whose relay gave up (66): not restarted until a reload
        self._wakeup = Wakeup()  # what signals and relays wake the supervisor with
        self._stop = self._reload = self._scan = False
        self._ready = False
        self.exit_status = os.EX_OK
        self._next_sync = self._next_status = self._next_ping = 0.0
        self._stalled: set[Path] = set()
        self._restart_at: dict[Path, float] = {}  # crashed relays, started again at this time
        self._backoff: dict[Path, float] = {}
        self._watcher = Watcher()  # one inotify Observer for every queue

    # -- called from signal handlers: set a flag, post a token --------------------------

    def request_stop(self) -> None:
        self._stop = True
        self._wakeup.ring()

    def request_reload(self) -> None:
        self._reload = True
        self._wakeup.ring()

    def request_scan(self) -> None:
        self._scan = True
        self._wakeup.ring()

    # -- start-up -------------------------------------------------------------------------

    def claim_queues(self) -> None:
        """Take every configured queue's single-relay lock now; QueueHeld if another holds
        one (unless allow_concurrent). Queues whose directory is missing are taken later."""
        for queue in expand(self.config):
            held_by = self._lock(queue)
            if held_by is not None and not self.config.allow_concurrent:
                raise QueueHeld(queue.queue_path.absolute(), held_by)

    def keep_fds(self) -> list[int]:  # what --daemon's detaching must keep open
        return [lock.fileno() for lock in self._locks.values()] + self._wakeup.fds()

    def catch_signals(self) -> None:  # from the main thread: a signal to any thread wakes run()
        self._wakeup.catch_signals()

    def rewrite_pids(self) -> None:
        """After forking: the locks are ours still, under a new pid."""
        for lock in self._locks.values():
            lock.rewrite_pid()

    def run(self) -> int:
        """Supervise until stopped; the exit status."""
        try:
            while not self._stop:  # the first turn starts the relays
                timeout = self._tick()
                if timeout is None:
                    break
                self._wakeup.wait(timeout)
        except Exception as e:  # noqa: BLE001 -- the supervisor's own bug: a supervisor above restarts us
            self.log.critical("service_crashed", error=repr(e)[:500])
            self.exit_status = os.EX_SOFTWARE
        finally:
            self.notifier.stopping()
            self._stop_relays(list(self._running))
            for lock in self._locks.values():
                lock.release()
            self._locks.clear()
            self._watcher.close()
            if self.metrics is not None:
                self.metrics.close()
            self.notifier.close()
        return self.exit_status

    # -- the supervisor's turn ------------------------------------------------------------

    def _tick(self) -> float | None:
        """Do what is due; return how long to wait for the next event, or None to exit."""
        if self._reload:
            self._reload = False
            self._do_reload()
        if self._scan:
            self._scan = False
            for running in self._running.values():
                running.relay.scan()
            self._next_sync = 0.0
        self._reap()
        if self._stop:
            return 0.0
        now = self.monotonic()
        globs = any(is_glob(q.queue_path) for q in self.config.queue_configs)
        if now >= self._next_sync or any(at <= now for at in self._restart_at.values()):  # a crashed relay's turn
            self._sync()
            self._next_sync = now + self.config.poll_interval
        if not self._running and not self._said and not globs:
            self.exit_status = max(self._ended.values(), default=os.EX_OK)
            return None  # every queue's relay has given up, and none can appear
        if not self._ready and all(r.relay.status().state != "starting" for r in self._running.values()):
            self._ready = True
            self.notifier.ready(self._status_line())
            self.log.info("service_ready", queues=len(self._running), waiting=len(self._said))
        deadlines = list(self._restart_at.values())
        if globs or self._said:  # look for new matches, or try waiting queues again
            deadlines.append(self._next_sync)
        if self.notifier.enabled or self.metrics is not None:
            if now >= self._next_status:
                self._next_status = now + STATUS_EVERY
                self._publish_status()
            deadlines.append(self._next_status)
        self._check_stalls(now)
        self._note_concurrency()
        deadlines.append(now + MAX_SLEEP)
        interval = self.notifier.watchdog_interval
        if interval:
            if now >= self._next_ping:  # the supervisor turns: whatever one queue does, the process lives
                self.notifier.watchdog()
                self._next_ping = now + interval
            deadlines.append(self._next_ping)
        return max(0.0, min(deadlines) - now)

    def _note_concurrency(self) -> None:
        """Write each queue's concurrency into its lock file, beside the pid, when it changed
        (`mailrelayd status` reads it there)."""
        for path, running in self._running.items():
            lock, note = self._locks.get(path), f"concurrency {running.relay.status().concurrency}\n"
            if lock is not None and running.noted != note:
                lock.rewrite_pid(note)
                running.noted = note

    def _check_stalls(self, now: float) -> None:
        """Report a relay whose loop has stopped turning (queue_stalled), and its recovery."""
        limit = STALLED_TURNS * (self._supervision().max_sleep or MAX_SLEEP)
        for path, running in self._running.items():
            age = now - running.relay.status().heartbeat
            stalled = running.thread.is_alive() and age > limit
            if stalled and path not in self._stalled:
                self._stalled.add(path)
                self.log.error("queue_stalled", queue=str(path), seconds=round(age, 1),
                               note="its relay's loop has not turned; the other queues go on")
            elif not stalled and path in self._stalled:
                self._stalled.discard(path)
                self.log.info("queue_recovered", queue=str(path))
            if self.metrics is not None:
                self.metrics.stalled(str(path), stalled)

    def _reap(self) -> None:
        """Forget relays that ended by themselves: a queue that can never work stays ended
        (until a reload); one that crashed is started again after its backoff."""
        now = self.monotonic()
        for path, running in list(self._running.items()):
            if running.status is None and running.thread.is_alive():
                continue
            running.thread.join()  # its run returned and rang: the thread is ending, if not gone yet
            del self._running[path]
            self._stalled.discard(path)
            running.relay.transport.close()
            if running.status != _CRASHED:
                self._ended[path] = running.status or os.EX_OK
                continue
            delay = RESTART_FIRST if now - running.started >= HEALTHY_RUN else self._backoff.get(path, RESTART_FIRST)
            self._backoff[path] = min(RESTART_MAX, 2 * delay)
            self._restart_at[path] = now + delay
            self.log.critical("relay_crashed", queue=str(path), error=running.error, restart_in_s=delay,
                              note="only this queue; the others go on")

    # -- queues: which should run, and starting and stopping them -------------------------

    def _sync(self, prebuilt: dict[Path, Relay] | None = None) -> None:
        """Run a relay for each queue the config names now, with that queue's settings."""
        wanted = {q.queue_path.absolute(): q for q in expand(self.config)}
        outdated = [p for p, r in self._running.items() if wanted.get(p) != r.config]
        self._stop_relays(outdated)
        for path in list(self._locks):
            if path not in wanted:
                self._locks.pop(path).release()
        for path in list(self._said):
            if path not in wanted:
                del self._said[path]
        now = self.monotonic()
        for path in [p for p, at in self._restart_at.items() if at <= now or p not in wanted]:
            del self._restart_at[path]
        for path, queue in wanted.items():
            if path in self._running or path in self._ended or path in self._restart_at:
                continue
            held_by = self._lock(queue)
            if held_by is not None and not self.config.allow_concurrent:
                self._say(path, "queue_held", f"relayed by another mailrelayd (pid {held_by})",
                          pid=held_by, note="taken when it lets go")
                continue
            if path not in self._locks and held_by is None:
                continue  # no lock yet: its directory is missing (logged)
            relay = (prebuilt or {}).pop(path, None) or self._build(queue)
            if relay is None:
                continue
            self._said.pop(path, None)
            self._start(path, queue, relay)
        for relay in (prebuilt or {}).values():
            relay.transport.close()

    def _lock(self, queue: Config) -> int | None:
        """Take the queue's lock unless held: None when ours (or its directory is missing:
        logged), else the holder's pid."""
        path = queue.queue_path.absolute()
        if path in self._locks:
            return None
        lock = QueueLock(self.lock_path(queue))
        try:
            held_by = lock.acquire()
        except OSError as e:
            self._say(path, "queue_unavailable", f"cannot take {lock.path}: {e.strerror or e}",
                      note="tried again every poll interval")
            return None
        if held_by is None:
            self._locks[path] = lock
        return held_by

    def _supervision(self) -> Supervision:
        """What every relay is asked: turns often enough for the watchdog, stats for STATUS=
        and metrics, a word when its state changes, and the one Watcher."""
        interval = self.notifier.watchdog_interval
        return Supervision(
            max_sleep=min(MAX_SLEEP, interval / 2) if interval else MAX_SLEEP,
            stats_every=STATUS_EVERY if self.notifier.enabled or self.metrics is not None else None,
            observer=self.metrics.delivery if self.metrics is not None else None,
            on_status=self._wakeup.ring,
            watcher=self._watcher,
        )

    def _build(self, queue: Config) -> Relay | None:
        try:
            relay = self.build_relay(queue, self._supervision())
        except ConfigError as e:
            self._say(queue.queue_path.absolute(), "queue_not_started", str(e))
            return None
        return relay

    def _start(self, path: Path, queue: Config, relay: Relay) -> None:
        running = _Running(queue, relay, started=self.monotonic())
        running.thread = threading.Thread(target=self._run_relay, args=(running,), name=f"relay {path.name}")
        self._running[path] = running
        running.thread.start()

    def _run_relay(self, running: _Running) -> None:
        try:
            running.status = running.relay.run()
        except Exception as e:  # noqa: BLE001 -- a bug, or input nobody foresaw: this queue only
            running.error, running.status = repr(e)[:500], _CRASHED
        finally:
            self._wakeup.ring()

    def _stop_relays(self, paths: list[Path]) -> None:
        """Stop these relays and wait for their deliveries in flight, pinging the watchdog."""
        stopping = [self._running.pop(p) for p in paths if p in self._running]
        for running in stopping:
            running.relay.stop()
        for running in stopping:
            while running.thread.is_alive():
                running.thread.join(timeout=self.notifier.watchdog_interval)
                if self.notifier.watchdog_interval:
                    self.notifier.watchdog()
            running.relay.transport.close()
            if self.metrics is not None:
                self.metrics.forget(running.relay.queue.name)

    def _say(self, path: Path, event: str, problem: str, **context) -> None:
        if self._said.get(path) != problem:
            self.log.error(event, queue=str(path), error=problem, **context)
            self._said[path] = problem

    # -- reload -------------------------------------------------------------------------

    def _do_reload(self) -> None:
        error = logmod.reopen()
        if error:
            self.log.error("log_reopen_failed", error=error)
        prebuilt: dict[Path, Relay] = {}
        try:
            new = self.reload_config()
            for queue in expand(new):  # every changed queue's transport must build, or nothing changes
                path = queue.queue_path.absolute()
                running = self._running.get(path)
                if running is None or running.config != queue:
                    prebuilt[path] = self.build_relay(queue, self._supervision())
        except ConfigError as e:
            self.log.error("config_reload_failed", error=str(e), note="the running configuration stays in force")
            for relay in prebuilt.values():
                relay.transport.close()
            return
        self.notifier.reloading()
        for key in ("log_file", "syslog", "metrics", "pidfile", "daemon"):
            if getattr(new, key) != getattr(self.config, key):
                self.log.warning("setting_needs_restart", key=key, note="the running value stays until a restart")
                new = replace(new, **{key: getattr(self.config, key)})
        if (new.log_format, new.log_level) != (self.config.log_format, self.config.log_level):
            self.configure_log(new)  # every logger follows, those of running relays too
        self._ended.clear()
        self.config = new
        self._sync(prebuilt)
        self.notifier.ready(self._status_line())
        self.log.info("config_reloaded", queues=len(self._running), waiting=len(self._said))

    # -- status ---------------------------------------------------------------------------

    def _publish_status(self) -> None:
        self.notifier.status(self._status_line())
        if self.metrics is not None:
            for running in self._running.values():
                status = running.relay.status()
                self.metrics.concurrency(running.relay.queue.name, status.concurrency)
                if status.stats is not None:
                    self.metrics.queue_stats(running.relay.queue.name, status.stats)

    def _status_line(self) -> str:
        totals = [r.relay.status() for r in self._running.values()]
        stats = [t.stats for t in totals if t.stats is not None]
        line = f"{len(totals)} queue{'s' * (len(totals) != 1)}"
        trouble = [f"{len(self._said)} waiting"] if self._said else []
        trouble += [f"{len(self._stalled)} stalled"] if self._stalled else []
        trouble += [f"{len(self._restart_at)} restarting"] if self._restart_at else []
        if trouble:
            line += f" ({', '.join(trouble)})"
        if stats:
            line += (f": {sum(s.queued for s in stats)} queued, {sum(s.deferred for s in stats)} deferred,"
                     f" {sum(s.failed for s in stats)} failed")
        return line + (f"; since start {sum(t.sent for t in totals)} sent, {sum(t.deferred for t in totals)}"
                       f" deferred, {sum(t.failed for t in totals)} set aside;"
                       f" concurrency {sum(t.concurrency for t in totals)}")
