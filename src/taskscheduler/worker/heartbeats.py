"""Heartbeats of the attempts a pool process runs, which keep the stuck sweep away from them."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from taskscheduler.store import transitions
from taskscheduler.store.db import Database
from taskscheduler.worker.threads import ProcessThread

log = logging.getLogger(__name__)


class Heartbeats(ProcessThread):
    """Refreshes `heartbeat_at` of the attempts this process runs, from one background thread.

    One thread per process, started on first use (after the pool's fork), rather than one per task:
    most tasks finish long before their first heartbeat is due, and a thread started and joined for
    each of them would cost more than the task.
    """

    thread_name = "heartbeats"

    def __init__(self, database: Database, interval_sec: float) -> None:
        super().__init__()
        self._database = database
        self._interval = interval_sec
        self._running: dict[tuple[uuid.UUID, int], float] = {}
        # Attempts whose outcome is being written: their write reports what happened to them.
        self._recording: set[tuple[uuid.UUID, int]] = set()
        self._lock = threading.Lock()

    @contextmanager
    def beating(self, task_id: uuid.UUID, attempt: int) -> Iterator[None]:
        """Heartbeat this attempt while the block runs."""
        self._ensure_thread()
        with self._lock:
            self._running[(task_id, attempt)] = time.monotonic()
        try:
            yield
        finally:
            with self._lock:
                self._running.pop((task_id, attempt), None)

    @contextmanager
    def recording(self, task_id: uuid.UUID, attempt: int) -> Iterator[None]:
        """Inside `beating`, around the outcome's write: a beat that finds the attempt no longer
        STARTED then says nothing, since the write may just have moved it (and if someone else did,
        the write says so)."""
        with self._lock:
            self._recording.add((task_id, attempt))
        try:
            yield
        finally:
            with self._lock:
                self._recording.discard((task_id, attempt))

    def _run(self) -> None:
        while True:
            time.sleep(self._interval / 2)
            now = time.monotonic()
            with self._lock:
                due = [key for key, last in self._running.items() if now - last >= self._interval]
            for task_id, attempt in due:
                self._beat(task_id, attempt, now)

    def _beat(self, task_id: uuid.UUID, attempt: int, now: float) -> None:
        fields = {"task_id": str(task_id), "attempt": attempt}
        try:
            alive = self._database.run_statement(
                lambda conn: transitions.heartbeat(conn, task_id=task_id, attempt=attempt)
            )
        except Exception as exc:  # the database may be briefly away; the sweep decides, not us
            log.warning("heartbeat failed: %s", exc, extra={**fields, "event": "heartbeat_failed"})
            return
        with self._lock:
            if (task_id, attempt) not in self._running or (not alive and (task_id, attempt) in self._recording):
                return
            if alive:
                self._running[(task_id, attempt)] = now
                return
            del self._running[(task_id, attempt)]
        log.warning(
            "attempt was taken away while running; its outcome will be discarded",
            extra={**fields, "event": "fenced"},
        )


_heartbeats: Heartbeats | None = None


def process_heartbeats(database: Database, interval_sec: float) -> Heartbeats:
    """This process's Heartbeats (the database and interval of its first call hold)."""
    global _heartbeats
    if _heartbeats is None:
        _heartbeats = Heartbeats(database, interval_sec)
    return _heartbeats
