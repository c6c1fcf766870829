"""What the scheduler publishes through. The real one is Celery; tests may record instead."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Protocol

from taskscheduler.config import Settings
from taskscheduler.store.tasks import Dispatched

DeadMessage = tuple[uuid.UUID, int, str, str, str | None]


class Publisher(Protocol):
    def publish_attempts(self, items: Sequence[Dispatched]) -> int: ...

    def publish_dead(self, items: Sequence[DeadMessage]) -> int: ...


class CeleryPublisher:
    def __init__(self, settings: Settings) -> None:
        self._default_timeout_sec = settings.stuck_after_sec
        self._max_tasks_per_message = settings.max_tasks_per_message

    def publish_attempts(self, items: Sequence[Dispatched]) -> int:
        from taskscheduler import worker

        if not items:
            return 0
        return worker.publish_attempts(
            items, default_timeout_sec=self._default_timeout_sec, max_per_message=self._max_tasks_per_message
        )

    def publish_dead(self, items: Sequence[DeadMessage]) -> int:
        from taskscheduler import worker

        return worker.publish_dead(items) if items else 0
