"""Settings, read from the environment and `.env`, with the seed's names."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Deepest nesting of JSON a task takes in (its payload, checked by the API's body guard) or gives
# back (its result, checked by the worker): pydantic cannot serialise a response nested 256 levels
# deep, so a deeper value could be stored but never read back; stay well below.
MAX_JSON_DEPTH = 64


def normalize_database_url(url: str) -> str:
    """Accept `postgresql://`, `postgres://` and `postgresql+psycopg2://`; we always drive psycopg 3."""
    for prefix in ("postgresql+psycopg2://", "postgresql+psycopg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    raise ValueError(f"DATABASE_URL must be a PostgreSQL URL (postgresql://...), got scheme {url.split(':', 1)[0]!r}")


def redis_client_url(url: str) -> str:
    """REDIS_URL as redis-py wants it: kombu's `redis+socket:///path` is redis-py's `unix:///path`."""
    return "unix://" + url[len("redis+socket://") :] if url.startswith("redis+socket://") else url


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value is not repeated in the error, since API_KEYS holds
    # secrets and DATABASE_URL / REDIS_URL may hold passwords.
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", hide_input_in_errors=True
    )

    # Empty means "use the embedded servers" (only `taskscheduler dev` and the tests start them).
    database_url: str = ""
    redis_url: str = ""
    # Prefix for every broker key, so several deployments (or test runs) can share one Redis.
    redis_key_prefix: str = ""

    stuck_after_sec: float = Field(180.0, gt=0, description="Default run-time limit of a task.")
    heartbeat_sec: float = Field(5.0, gt=0, description="How often a running task's worker heartbeats.")
    heartbeat_timeout_sec: float = Field(30.0, gt=0, description="A STARTED task silent this long is stuck.")
    enqueue_timeout_sec: float = Field(60.0, gt=0, description="An ENQUEUED task unclaimed this long is re-published.")
    poll_interval_sec: float = Field(1.0, gt=0, description="Scheduler loop period.")
    dispatch_batch_size: int = Field(500, ge=1, le=10_000)
    max_enqueued_per_queue: int = Field(
        2000,
        ge=1,
        description="Back-pressure: dispatch no more while this many tasks of a queue wait unclaimed in the broker.",
    )
    max_tasks_per_message: int = Field(
        20,
        ge=1,
        le=1000,
        description="A deep queue's due tasks travel this many to a Celery message (1: one task per message).",
    )
    retry_backoff_base_sec: float = Field(2.0, gt=0)
    retry_backoff_max_sec: float = Field(300.0, gt=0)
    run_at_grace_sec: float = Field(60.0, ge=0, description="How far in the past a run_at may be.")
    max_body_bytes: int = Field(256 * 1024, ge=1024, description="Largest accepted request body.")
    max_result_bytes: int = Field(
        1024 * 1024, ge=1024, description="Largest result a handler may return (as UTF-8 JSON); a larger one fails."
    )
    worker_db_retry_sec: float = Field(
        180.0,
        gt=0,
        description="How long a worker retries a claim or an outcome while the database is unreachable.",
    )
    db_wait_sec: float = Field(
        60.0, ge=0, description="How long a role waits at start for the database to answer before it exits 1."
    )
    task_modules: str = ""
    api_keys: str = ""
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    # Loopback unless told otherwise: compose and the Dockerfile set 0.0.0.0 (and API_KEYS belongs with it).
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    # Resources of the API process under abuse: slow clients, idle connections, a locked row.
    api_request_timeout_sec: float = Field(
        10.0, gt=0, description="A connection that has not sent its whole request (head, body) within this is closed."
    )
    api_max_connections: int = Field(
        1000, ge=1, description="Open connections the API keeps at most; beyond it a new one gets a 503 and is closed."
    )
    api_lock_timeout_sec: float = Field(
        2.0, gt=0, description="How long cancel and retry wait for a task's row lock before a 503."
    )
    # The SQLAlchemy engine's pool of each process (the API's synchronous routes, workers, scheduler).
    db_pool_size: int = Field(10, ge=1, description="Connections each process's pool keeps open.")
    db_max_overflow: int = Field(20, ge=0, description="Connections the pool may open beyond DB_POOL_SIZE under load.")
    db_pool_timeout_sec: float = Field(
        5.0, gt=0, description="How long a request waits for a pooled connection before giving up (the API: a 503)."
    )
    worker_concurrency: int = Field(1, ge=1, description="Worker processes per `taskscheduler worker`.")
    # Off by default: each event is one more publish to Redis per task and state change.
    task_events: bool = Field(
        False,
        description="Workers send Celery task events and worker heartbeats (for Flower and `celery events`).",
    )
    # Retention: finished tasks and dlq_events older than this are deleted (events by partition); 0 keeps them.
    retention_days: float = Field(30.0, ge=0, description="Finished tasks are deleted this many days after finishing.")
    dlq_retention_days: float = Field(180.0, ge=0, description="dlq_events are deleted this many days after creation.")
    retention_interval_sec: float = Field(60.0, gt=0, description="How often the scheduler runs the retention sweep.")
    # task_events is partitioned by time; whole partitions are dropped RETENTION_DAYS after they end.
    events_partition_sec: float = Field(
        86400.0, ge=60, description="Width of each task_events partition (by event time); a day by default."
    )
    events_partitions_ahead: int = Field(
        3, ge=1, description="task_events partitions the scheduler keeps created ahead of the current one."
    )
    # Liveness rows for `taskscheduler check <role>`.
    process_heartbeat_sec: float = Field(10.0, gt=0, description="How often each process records that it is alive.")
    # Prometheus endpoint of `taskscheduler scheduler` and `taskscheduler worker`; 0: none (the API serves /metrics).
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Test-only: a fault point name; see scheduler/dispatch.py. Never set in production.
    fault_point: str = ""

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return normalize_database_url(value) if value else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "redis+socket://", "unix://")):
            raise ValueError("REDIS_URL must start with redis://, rediss:// or redis+socket://")
        return value

    @field_validator("api_keys")
    @classmethod
    def _api_keys(cls, value: str) -> str:
        # A key travels in an HTTP header, read as latin-1 bytes: a non-ASCII key could never match,
        # and one with a space or control character is not a bearer token. Say which, never the key.
        keys = [k.strip() for k in value.split(",") if k.strip()]
        for n, key in enumerate(keys, start=1):
            bad = next((c for c in key if not ("!" <= c <= "~")), None)
            if bad is not None:
                what = "a non-ASCII character" if ord(bad) > 0x7E else "a space or control character"
                raise ValueError(
                    f"API_KEYS: key {n} of {len(keys)} holds {what}; a key is printable ASCII without spaces"
                    " or commas (e.g. from `openssl rand -hex 32`)"
                )
        return value

    @property
    def task_module_list(self) -> list[str]:
        return [m.strip() for m in self.task_modules.split(",") if m.strip()]

    @property
    def api_key_list(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]

    def require_urls(self) -> tuple[str, str]:
        """The two server URLs; a clear error when a production role starts without them."""
        missing = [n for n, v in (("DATABASE_URL", self.database_url), ("REDIS_URL", self.redis_url)) if not v]
        if missing:
            raise RuntimeError(
                f"{' and '.join(missing)} not set: set them, or run `taskscheduler dev` to use embedded servers"
            )
        return self.database_url, self.redis_url

    def require_redis_url(self) -> str:
        """REDIS_URL, for what needs the broker only (`celery -A taskscheduler`: inspect, events, Flower)."""
        if not self.redis_url:
            raise RuntimeError(
                "REDIS_URL not set: set it (and REDIS_KEY_PREFIX, if the deployment uses one) to the broker of"
                " the workers; for a running `taskscheduler dev`, see `taskscheduler env`"
            )
        return self.redis_url


@lru_cache
def get_settings() -> Settings:
    return Settings()
