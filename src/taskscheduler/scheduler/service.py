"""The scheduler loop: dispatch what is due, rescue every POLL_INTERVAL_SEC, sleep until the next
task is due (or a NOTIFY says one is), repeat.

The loop outlives its servers. While the database is away a tick fails (one warning line, then one
every FAILURE_LOG_EVERY_SEC); when it is back, the moment is noted on the database clock and the stuck
sweep counts heartbeat silence from no earlier than that: workers could not write heartbeats
meanwhile. The process's start counts as such a moment too, since it knows nothing of what happened
before. While the broker is away, passes that publish fail fast and are counted (see `publisher`),
and the rest of the tick still runs.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime

import psycopg
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from taskscheduler.config import Settings
from taskscheduler.liveness import ProcessHeartbeat
from taskscheduler.scheduler import dispatch, rescue, retention
from taskscheduler.scheduler.horizons import Horizons
from taskscheduler.scheduler.publisher import BrokerHealth, BrokerQueues, BrokerUnavailable, CeleryPublisher, Publisher
from taskscheduler.scheduler.schedules import ScheduleStep
from taskscheduler.scheduler.wakeup import Wakeup
from taskscheduler.store.db import Database

log = logging.getLogger(__name__)

# Upper bound on back-to-back dispatch batches in one tick, so the sweeps still run under a backlog.
MAX_BATCHES_PER_TICK = 20
# While ticks keep failing, one warning line this often.
FAILURE_LOG_EVERY_SEC = 30.0


def lost_the_database(exc: BaseException) -> bool:
    """Whether `exc` says the database could not be reached (rather than, say, a bad statement)."""
    if isinstance(exc, DBAPIError):
        return isinstance(exc, (OperationalError, InterfaceError)) or exc.connection_invalidated
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


class SchedulerService:
    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        *,
        database: Database | None = None,
        heartbeat: ProcessHeartbeat | None = None,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        # Default: one of its own, for DATABASE_URL of `settings`.
        self.database = database or Database.from_settings(settings)
        self.stopping = threading.Event()
        # Written from the loop, so a scheduler whose loop hangs stops looking alive.
        self.heartbeat = heartbeat
        self._retention_due = time.monotonic()
        self._retention_continues = False
        self._rescue_due = time.monotonic()
        health = publisher.health if isinstance(publisher, CeleryPublisher) else BrokerHealth()
        self.broker = BrokerQueues(settings, health)
        # When this process last regained the database, on its clock; None until the first tick notes
        # it. `_database_lost`: since the last tick that failed for want of the database (or start).
        self.reconnected_at: datetime | None = None
        self._database_lost = True
        self._failed_ticks = 0
        self._failure_logged_at = float("-inf")
        self.schedules = ScheduleStep(settings, self.database)
        # Where this scheduler's scans start; each scheduler keeps its own.
        self.horizons = Horizons()

    def stop(self) -> None:
        """Ask the loop to exit after the batch in hand (SIGTERM, Ctrl-C)."""
        self.stopping.set()

    def database_lost(self) -> None:
        """The database could not be reached: the next tick notes when it is back."""
        self._database_lost = True

    def _note_reconnection(self) -> None:
        if not self._database_lost:
            return
        self.reconnected_at = self.database.now()
        self._database_lost = False
        log.info(
            "database reachable: the stuck check counts heartbeat silence from %s",
            self.reconnected_at.isoformat(),
            extra={"event": "database_reachable"},
        )

    def tick(self) -> int:
        self._note_reconnection()
        self.horizons.begin_tick()
        # First: a task of a schedule due now is dispatched in this same tick.
        self.schedules.tick(self.stopping.is_set)
        dispatched = 0
        try:
            for _ in range(MAX_BATCHES_PER_TICK):
                n = dispatch.run_once(
                    database=self.database, settings=self.settings, publisher=self.publisher, horizons=self.horizons
                )
                dispatched += n
                if n < self.settings.dispatch_batch_size or self.stopping.is_set():
                    break
        except BrokerUnavailable:
            # Counted and logged by the publisher. The batch is ENQUEUED in the database; the
            # lost-message sweep publishes it. The sweeps below need the database only.
            pass
        if dispatched:
            log.info("dispatched %d", dispatched, extra={"event": "dispatch", "count": dispatched})
        # Ticks come as often as tasks fall due; the sweeps need not.
        if time.monotonic() >= self._rescue_due:
            self._rescue_due = time.monotonic() + self.settings.poll_interval_sec
            counts = rescue.run_once(
                database=self.database,
                settings=self.settings,
                publisher=self.publisher,
                reconnected_at=self.reconnected_at,
                broker=self.broker,
                horizons=self.horizons,
            )
            if counts:
                log.info("rescue: %s", counts, extra={"event": "rescue"})
        if time.monotonic() >= self._retention_due and not self.stopping.is_set():
            # A run that stopped on its time budget with work left goes on at the next tick (its
            # partitions already seen to); otherwise the next one is RETENTION_INTERVAL_SEC away.
            kept = retention.run_once(
                database=self.database, settings=self.settings, maintain_partitions=not self._retention_continues
            )
            self._retention_continues = kept.more
            self._retention_due = time.monotonic() + (0.0 if kept.more else self.settings.retention_interval_sec)
        if self.heartbeat is not None:
            self.heartbeat.beat_if_due()
        return dispatched

    def _tick_failed(self, exc: Exception) -> None:
        if lost_the_database(exc):
            self.database_lost()
        self._failed_ticks += 1
        if time.monotonic() - self._failure_logged_at < FAILURE_LOG_EVERY_SEC:
            return
        self._failure_logged_at = time.monotonic()
        log.warning(
            "scheduler tick failed (%d in a row), retrying every %gs: %s",
            self._failed_ticks,
            self.settings.poll_interval_sec,
            exc,
            extra={"event": "tick_failed", "failed_ticks": self._failed_ticks},
        )

    def _tick_succeeded(self) -> None:
        if self._failed_ticks:
            log.info("scheduler tick succeeded after %d failed", self._failed_ticks, extra={"event": "tick_recovered"})
        self._failed_ticks = 0
        self._failure_logged_at = float("-inf")

    def run_forever(self) -> None:
        log.info("scheduler started; checking the broker", extra={"event": "scheduler_started"})
        if not self.broker.wait_until_reachable(self.stopping):
            self.broker.close()
            return
        wakeup = Wakeup(self.settings, self.database, self.horizons)
        while not self.stopping.is_set():
            try:
                dispatched = self.tick()
            except Exception as exc:  # the database may be away; keep going, never die
                self._tick_failed(exc)
                self.stopping.wait(self.settings.poll_interval_sec)
                continue
            self._tick_succeeded()
            if dispatched < self.settings.dispatch_batch_size and not self.stopping.is_set():
                wakeup.wait(dispatched=dispatched > 0)
        wakeup.close()
        self.broker.close()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        log.info("scheduler stopped", extra={"event": "scheduler_stopped"})
