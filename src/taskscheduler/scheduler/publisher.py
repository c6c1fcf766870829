"""What the scheduler publishes through, and what it asks the broker. The real one is Celery; tests may record instead.

A broker that cannot be reached fails a pass quickly and visibly: bounded socket timeouts and one
retry (kombu's defaults wait forever for a broker that does not answer, and retry three times), a
Prometheus counter and gauge, and a warning line per failed pass, at most one every
LOG_EVERY_SEC. Nothing is lost meanwhile: the tasks are in PostgreSQL and a later pass publishes them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import redis
from kombu.exceptions import OperationalError as KombuOperationalError

from taskscheduler import broker, metrics
from taskscheduler.broker import DeadMessage
from taskscheduler.config import Settings, redis_client_url
from taskscheduler.store.sweeps import Dispatched

log = logging.getLogger(__name__)

T = TypeVar("T")

# A broker on the same network answers in milliseconds; these only bound a broker that does not.
CONNECT_TIMEOUT_SEC = 2.0
SOCKET_TIMEOUT_SEC = 5.0
# One retry: enough to replace a connection the broker closed (it restarted); a broker that is down
# fails the pass at once instead of after kombu's default three retries.
RETRY_POLICY: dict[str, Any] = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
# While the broker stays unreachable, one warning line this often (each failed pass is counted).
LOG_EVERY_SEC = 30.0
# Between start-up checks of the broker.
WAIT_STEP_SEC = 1.0

# What a broker that is away raises: kombu wraps connection errors; redis-py raises its own; a socket
# timeout or refusal may come through as an OSError.
BROKER_ERRORS: tuple[type[BaseException], ...] = (KombuOperationalError, redis.RedisError, OSError)


class BrokerUnavailable(Exception):
    """A scheduler pass could not reach the broker; what it was to publish stays in PostgreSQL."""


class Publisher(Protocol):
    def publish_attempts(self, items: Sequence[Dispatched]) -> int: ...

    def publish_dead(self, items: Sequence[DeadMessage]) -> int: ...


class BrokerHealth:
    """Counts the scheduler's failed broker passes and logs them, rate-limited, and when the broker is back."""

    def __init__(self, log_every_sec: float = LOG_EVERY_SEC) -> None:
        self._log_every = log_every_sec
        self._lock = threading.Lock()
        self._failed_passes = 0  # since the broker was last reachable
        self._unlogged = 0  # failed passes since the last warning line
        self._last_log = float("-inf")

    @property
    def failing(self) -> bool:
        return self._failed_passes > 0

    def call(self, kind: str, what: Callable[[], T]) -> T:
        """Run `what` (one pass's broker work); a broker error is counted, logged and raised as BrokerUnavailable."""
        try:
            result = what()
        except BROKER_ERRORS as exc:
            self.failed(kind, exc)
            raise BrokerUnavailable(f"broker unreachable ({kind}): {exc}") from exc
        self.ok()
        return result

    def failed(self, kind: str, exc: BaseException) -> None:
        metrics.BROKER_FAILURES.labels(kind=kind).inc()
        metrics.BROKER_UP.labels(role="scheduler").set(0)
        with self._lock:
            self._failed_passes += 1
            self._unlogged += 1
            now = time.monotonic()
            if now - self._last_log < self._log_every:
                return
            passes, self._unlogged, self._last_log = self._unlogged, 0, now
        log.warning(
            "broker unreachable: %d failed pass(es) (last: %s): %s; the tasks stay in PostgreSQL and are"
            " published once it is back",
            passes,
            kind,
            exc,
            extra={"event": "broker_unreachable", "kind": kind, "failed_passes": passes},
        )

    def ok(self) -> None:
        metrics.BROKER_UP.labels(role="scheduler").set(1)
        with self._lock:
            failed, self._failed_passes, self._unlogged, self._last_log = self._failed_passes, 0, 0, float("-inf")
        if failed:
            log.info(
                "broker reachable again after %d failed pass(es)",
                failed,
                extra={"event": "broker_reachable", "failed_passes": failed},
            )


class BrokerQueues:
    """How many messages wait in the broker's lists (kombu's Redis transport keeps a queue as a list
    named after it, under REDIS_KEY_PREFIX), read with the same short timeouts."""

    def __init__(self, settings: Settings, health: BrokerHealth) -> None:
        self._url = redis_client_url(settings.redis_url)
        self._prefix = settings.redis_key_prefix
        self._health = health
        self._client: redis.Redis | None = None

    def _redis(self) -> redis.Redis:
        if self._client is None:
            self._client = redis.Redis.from_url(
                self._url, socket_connect_timeout=CONNECT_TIMEOUT_SEC, socket_timeout=SOCKET_TIMEOUT_SEC
            )
        return self._client

    def waiting(self, queues: Sequence[str], *, kind: str) -> dict[str, int]:
        """Messages waiting in each of `queues`; BrokerUnavailable when the broker does not answer."""

        def read() -> dict[str, int]:
            pipe = self._redis().pipeline(transaction=False)
            for queue in queues:
                pipe.llen(f"{self._prefix}{queue}")
            return {queue: int(n) for queue, n in zip(queues, pipe.execute(), strict=True)}

        return self._health.call(kind, read)

    def wait_until_reachable(self, stopping: threading.Event) -> bool:
        """Block until the broker answers a PING (False if `stopping` is set first), logging while it does not."""
        while not stopping.is_set():
            try:
                self._health.call("check", lambda: self._redis().ping())
                return True
            except BrokerUnavailable:
                stopping.wait(WAIT_STEP_SEC)
        return False

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class CeleryPublisher:
    """Publishes over a connection of its own, with the short timeouts and the retry policy above."""

    def __init__(self, settings: Settings, health: BrokerHealth | None = None) -> None:
        self._default_timeout_sec = settings.stuck_after_sec
        self._max_tasks_per_message = settings.max_tasks_per_message
        self._settings = settings
        self.health = health or BrokerHealth()
        self._connection: Any = None

    def _producer(self) -> Any:
        if self._connection is None:
            app = broker.configure_celery(self._settings)
            self._connection = app.connection_for_write(
                transport_options={
                    "socket_connect_timeout": CONNECT_TIMEOUT_SEC,
                    "socket_timeout": SOCKET_TIMEOUT_SEC,
                }
            )
        return self._connection.Producer()

    def publish_attempts(self, items: Sequence[Dispatched]) -> int:
        if not items:
            return 0
        return self.health.call(
            "dispatch",
            lambda: broker.publish_attempts(
                items,
                default_timeout_sec=self._default_timeout_sec,
                max_per_message=self._max_tasks_per_message,
                producer=self._producer(),
                retry_policy=RETRY_POLICY,
            ),
        )

    def publish_dead(self, items: Sequence[DeadMessage]) -> int:
        if not items:
            return 0
        return self.health.call(
            "dead", lambda: broker.publish_dead(items, producer=self._producer(), retry_policy=RETRY_POLICY)
        )
