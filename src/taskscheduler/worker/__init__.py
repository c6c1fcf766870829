"""The worker: runs the attempts the broker's messages name, and records their outcomes.

Importing this package registers its Celery tasks (`celery_tasks`) and its boot step (`boot`) on
`broker.celery_app`; `taskscheduler worker` then runs that app. Publishing lives in `broker`.
"""

from __future__ import annotations

from taskscheduler.worker.boot import LivenessStep
from taskscheduler.worker.celery_tasks import execute_many, record_dead
from taskscheduler.worker.db_retry import GaveUp
from taskscheduler.worker.execute import run_attempt, run_attempts

__all__ = ["GaveUp", "LivenessStep", "execute_many", "record_dead", "run_attempt", "run_attempts"]
