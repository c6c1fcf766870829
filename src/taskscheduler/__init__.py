"""A fault-tolerant distributed task scheduler: PostgreSQL for state, Celery over Redis for delivery.

From an application: `from taskscheduler import task, Client` (see `taskscheduler.sdk`). Those are
imported on first use, so that the CLI and the server roles, which import this package, do not
load them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskscheduler.api.schemas import TaskOut
    from taskscheduler.handlers import Task, task
    from taskscheduler.sdk import Client, SubmissionError

__version__ = "0.1.0"
__all__ = ["Client", "SubmissionError", "Task", "TaskOut", "task"]

_EXPORTS = {
    "Client": "taskscheduler.sdk",
    "SubmissionError": "taskscheduler.sdk",
    "TaskOut": "taskscheduler.api.schemas",
    "Task": "taskscheduler.handlers",
    "task": "taskscheduler.handlers",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
