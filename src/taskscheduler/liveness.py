"""Process heartbeats: each long-running process says it is alive, for `taskscheduler check <role>`.

The API and the workers beat from a background thread; the scheduler beats from its loop, so a
scheduler whose loop hangs goes stale. A process that stops cleanly deletes its row.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from taskscheduler.store import processes as process_store
from taskscheduler.store.db import Database

log = logging.getLogger(__name__)

ROLES = ("api", "scheduler", "worker")


class ProcessHeartbeat:
    def __init__(self, role: str, *, interval_sec: float, database: Database, detail: str = "") -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        self.role = role
        self.detail = detail
        self.interval_sec = interval_sec
        self.hostname = socket.gethostname()
        self.process_id = f"{role}:{self.hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.database = database
        self._last = float("-inf")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def beat(self) -> bool:
        """Write the row now. False (and one warning per outage) when the database is away."""
        try:
            with self.database.transaction() as conn:
                process_store.beat(
                    conn,
                    process_id=self.process_id,
                    role=self.role,
                    hostname=self.hostname,
                    pid=os.getpid(),
                    detail=self.detail,
                )
        except Exception as exc:
            if not self._failing:
                log.warning("process heartbeat failed: %s", exc, extra={"event": "process_heartbeat_failed"})
            self._failing = True
            return False
        self._failing = False
        self._last = time.monotonic()
        return True

    def beat_if_due(self) -> None:
        """For a loop: beat when the last one is `interval_sec` old."""
        if time.monotonic() - self._last >= self.interval_sec:
            self.beat()

    def start(self) -> ProcessHeartbeat:
        """Beat now and then every `interval_sec` from a daemon thread."""
        self.beat()
        self._thread = threading.Thread(target=self._run, name=f"process-heartbeat-{self.role}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_sec):
            self.beat()

    def stop(self) -> None:
        """Stop beating and delete the row: `check` fails at once instead of after a timeout."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            with self.database.transaction() as conn:
                process_store.remove(conn, self.process_id)
        except Exception as exc:  # the row goes stale instead
            log.warning("could not remove the process heartbeat: %s", exc, extra={"event": "process_heartbeat_failed"})
