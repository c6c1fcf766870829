"""The worker's Celery boot step: what the worker's main process runs beside its pool."""

from __future__ import annotations

from typing import Any, ClassVar

from celery import bootsteps

from taskscheduler.broker import celery_app
from taskscheduler.config import get_settings
from taskscheduler.worker import process


class LivenessStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """In the worker's main process, once its pool is up: the process heartbeat that `taskscheduler
    check worker` reads, and the metrics endpoint when METRICS_PORT is set. On shutdown (SIGTERM:
    warm shutdown) the heartbeat row is deleted at once, while running tasks still finish."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.heartbeat: Any = None
        self.metrics_server: Any = None

    def start(self, parent: Any) -> None:
        from taskscheduler import metrics
        from taskscheduler.liveness import ProcessHeartbeat

        settings = get_settings()
        queues = ",".join(sorted(parent.app.amqp.queues.consume_from or {}))
        self.heartbeat = ProcessHeartbeat(
            "worker", interval_sec=settings.process_heartbeat_sec, detail=queues, database=process.database()
        ).start()
        if settings.metrics_port:
            self.metrics_server = metrics.serve(settings.metrics_host, settings.metrics_port, settings.api_key_list)

    def stop(self, parent: Any) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server = None


celery_app.steps["worker"].add(LivenessStep)
