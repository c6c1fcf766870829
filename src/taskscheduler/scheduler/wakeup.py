"""How long the scheduler sleeps between ticks, and what wakes it early.

It sleeps until the earliest PENDING/FAILED task is due or the earliest schedule fires (never longer
than POLL_INTERVAL_SEC), and a NOTIFY on the due channel (sent when a task due now is created) wakes
it at once. Polling stays the fallback: if the listening connection breaks, the scheduler just
sleeps and listens again later.
"""

from __future__ import annotations

import logging
import time

import psycopg

from taskscheduler.config import Settings
from taskscheduler.scheduler.horizons import Horizons
from taskscheduler.store import creation, fires, sweeps
from taskscheduler.store.db import Database

log = logging.getLogger(__name__)

# Ticks are at least this far apart, so a burst of notifications is handled in batches.
MIN_GAP_SEC = 0.005
# When tasks are due but held back (their queue is full), look again this soon.
HELD_BACK_SEC = 0.05


def _earliest(*seconds: float | None) -> float | None:
    known = [s for s in seconds if s is not None]
    return min(known) if known else None


class Wakeup:
    def __init__(self, settings: Settings, database: Database, horizons: Horizons | None = None) -> None:
        self.settings = settings
        self.database = database
        self.horizons = horizons
        self._conn: psycopg.Connection[tuple[object, ...]] | None = None

    def wait(self, *, dispatched: bool = False) -> None:
        """Sleep until the next task is due, a notification arrives, or POLL_INTERVAL_SEC passes.

        `dispatched`: the tick just before dispatched something, so a task due already fell due
        since (under a steady stream, every few milliseconds) rather than being held back.
        """
        timeout = self._timeout(dispatched=dispatched)
        conn = self._listening()
        if conn is None:
            time.sleep(timeout)
            return
        try:
            for note in conn.notifies(timeout=timeout, stop_after=1):
                self._due_notified(note.payload)
            # Several notifications may be queued: one tick takes care of all of them.
            for note in conn.notifies(timeout=0):
                self._due_notified(note.payload)
        except psycopg.Error as exc:
            log.warning("lost the notification connection, polling: %s", exc)
            self.close()
            time.sleep(timeout)

    def _due_notified(self, payload: str) -> None:
        """A task due at the notified run_at committed: the next dispatch looks from there on."""
        if self.horizons is not None:
            self.horizons.due_notified(creation.notified_due_at(payload))

    def _timeout(self, *, dispatched: bool) -> float:
        poll = self.settings.poll_interval_sec
        try:
            with self.database.transaction() as conn:
                horizons = self.horizons
                due = sweeps.next_due(conn, since=horizons.due if horizons else None)
                due_in = _earliest(due.seconds, fires.seconds_until_next_fire(conn))
            if horizons is not None:
                horizons.earliest_due(due.earliest)
        except Exception:  # the tick that follows reports database trouble
            return poll
        if due_in is None:
            return poll
        if due_in <= 0:
            return min(poll, MIN_GAP_SEC if dispatched else HELD_BACK_SEC)
        return min(poll, max(due_in, MIN_GAP_SEC))

    def _listening(self) -> psycopg.Connection[tuple[object, ...]] | None:
        if self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(self.database.libpq_url, autocommit=True, connect_timeout=5)
                self._conn.execute(f"LISTEN {creation.DUE_CHANNEL}")
            except psycopg.Error as exc:
                log.warning("cannot listen for due tasks, polling: %s", exc)
                self._conn = None
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
