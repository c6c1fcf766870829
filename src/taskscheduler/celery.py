"""The Celery app that `celery -A taskscheduler` finds, configured from the settings at import.

Celery's own tools (`celery -A taskscheduler inspect ping`, `events`, `report`, Flower) load the
app by importing this module, so it points the app at REDIS_URL (with REDIS_KEY_PREFIX) here, and
needs nothing else: no DATABASE_URL, no handler modules. The worker's tasks are registered on it as
they are in a worker, so those tools see the same app. Our own roles never import this module (they
configure the same app when they start), so importing `taskscheduler` stays cheap and works without
settings.
"""

from __future__ import annotations

import taskscheduler.worker  # noqa: F401  (registers the worker's tasks and boot step on the app)
from taskscheduler.broker import celery_app, configure_celery
from taskscheduler.config import get_settings

__all__ = ["app"]

# An unset REDIS_URL would leave Celery's default (amqp://localhost), which hangs or talks to the
# wrong broker: refuse, and say what to set.
app = configure_celery(get_settings())
assert app is celery_app
