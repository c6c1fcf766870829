"""The base of the worker's per-process background threads (heartbeats, the message slicer)."""

from __future__ import annotations

import os
import threading


class ProcessThread:
    """One daemon thread per process running `_run`, started on first use: a pool process forks
    after import, and a thread does not survive a fork, so the check is made on every use."""

    thread_name = "worker-helper"

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._pid = 0

    def _ensure_thread(self) -> None:
        if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        raise NotImplementedError
