"""The scheduler loop: dispatch what is due, rescue every POLL_INTERVAL_SEC, sleep until the next
task is due (or a NOTIFY says one is), repeat."""

from __future__ import annotations

import logging
import threading
import time

from taskscheduler.config import Settings
from taskscheduler.liveness import ProcessHeartbeat
from taskscheduler.scheduler import dispatch, rescue, retention
from taskscheduler.scheduler.publisher import Publisher
from taskscheduler.scheduler.wakeup import Wakeup

log = logging.getLogger(__name__)

# Upper bound on back-to-back dispatch batches in one tick, so the sweeps still run under a backlog.
MAX_BATCHES_PER_TICK = 20


class SchedulerService:
    def __init__(self, settings: Settings, publisher: Publisher, *, heartbeat: ProcessHeartbeat | None = None) -> None:
        self.settings = settings
        self.publisher = publisher
        self.stopping = threading.Event()
        # Written from the loop, so a scheduler whose loop hangs stops looking alive.
        self.heartbeat = heartbeat
        self._retention_due = time.monotonic()
        self._rescue_due = time.monotonic()

    def stop(self) -> None:
        """Ask the loop to exit after the batch in hand (SIGTERM, Ctrl-C)."""
        self.stopping.set()

    def tick(self) -> int:
        dispatched = 0
        for _ in range(MAX_BATCHES_PER_TICK):
            n = dispatch.run_once(settings=self.settings, publisher=self.publisher)
            dispatched += n
            if n < self.settings.dispatch_batch_size or self.stopping.is_set():
                break
        if dispatched:
            log.info("dispatched %d", dispatched, extra={"event": "dispatch", "count": dispatched})
        # Ticks come as often as tasks fall due; the sweeps need not.
        if time.monotonic() >= self._rescue_due:
            self._rescue_due = time.monotonic() + self.settings.poll_interval_sec
            counts = rescue.run_once(settings=self.settings, publisher=self.publisher)
            if counts:
                log.info("rescue: %s", counts, extra={"event": "rescue"})
        if time.monotonic() >= self._retention_due and not self.stopping.is_set():
            self._retention_due = time.monotonic() + self.settings.retention_interval_sec
            retention.run_once(settings=self.settings)
        if self.heartbeat is not None:
            self.heartbeat.beat_if_due()
        return dispatched

    def run_forever(self) -> None:
        log.info("scheduler started", extra={"event": "scheduler_started"})
        wakeup = Wakeup(self.settings)
        while not self.stopping.is_set():
            try:
                dispatched = self.tick()
            except Exception as exc:  # the database or broker may be away; keep going, never die
                log.warning("scheduler tick failed, retrying: %s", exc, extra={"event": "tick_failed"})
                self.stopping.wait(self.settings.poll_interval_sec)
                continue
            if dispatched < self.settings.dispatch_batch_size and not self.stopping.is_set():
                wakeup.wait(dispatched=dispatched > 0)
        wakeup.close()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        log.info("scheduler stopped", extra={"event": "scheduler_stopped"})
