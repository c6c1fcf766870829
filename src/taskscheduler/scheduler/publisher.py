"""What the scheduler publishes through. The real one is Celery; tests may record instead."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol

from taskscheduler.store.tasks import Dispatched

DeadMessage = tuple[uuid.UUID, int, str, str, str | None]


class Publisher(Protocol):
    def publish_attempts(self, items: Sequence[Dispatched]) -> int: ...

    def publish_dead(self, items: Sequence[DeadMessage]) -> int: ...


class CeleryPublisher:
    def __init__(self, default_timeout_sec: float) -> None:
        self._default_timeout_sec = default_timeout_sec

    def publish_attempts(self, items: Sequence[Dispatched]) -> int:
        from taskscheduler import worker

        return worker.publish_attempts(items, default_timeout_sec=self._default_timeout_sec) if items else 0

    def publish_dead(self, items: Sequence[DeadMessage]) -> int:
        from taskscheduler import worker

        return worker.publish_dead(items) if items else 0
