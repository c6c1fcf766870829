"""Table definitions. The Alembic migrations build exactly this (tests/integration/test_migrations.py)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

from taskscheduler.lifecycle import TaskStatus

metadata = MetaData()

_STATUSES = ", ".join(f"'{s.value}'" for s in TaskStatus)
_TERMINAL_SQL = "status IN ('SUCCEEDED', 'DEAD', 'CANCELLED')"

tasks = Table(
    "tasks",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("name", Text, nullable=False),
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("priority", SmallInteger, nullable=False),
    Column("queue", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("run_at", DateTime(timezone=True), nullable=False),
    # The fencing token: incremented at each dispatch and carried by the message.
    Column("attempt", Integer, nullable=False, server_default=text("0")),
    Column("max_retries", Integer, nullable=False),
    # The attempt at which an API retry replayed the task; the retry budget counts from here.
    Column("retry_base_attempt", Integer, nullable=False, server_default=text("0")),
    Column("timeout_sec", Double, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("result", JSONB, nullable=True),
    Column("dead_reason", Text, nullable=True),
    # Set by the DLQ worker when the dlq_events row of the current DEAD attempt exists; keeps the
    # "DEAD but not yet in the DLQ" sweep on a tiny partial index.
    Column("dlq_recorded", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # When a message for the current attempt (or its DLQ record) was last published.
    Column("published_at", DateTime(timezone=True), nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("heartbeat_at", DateTime(timezone=True), nullable=True),
    # Written by the claim that moved the current attempt to STARTED: a claim sent again after its
    # reply was lost recognises its own claim by it (see store.transitions.CLAIM).
    Column("claim_token", UUID(as_uuid=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    # Idempotent creation: the client's key, and a hash of the canonical request it first came with.
    Column("idempotency_key", Text, nullable=True),
    Column("request_hash", Text, nullable=True),
    # Set for the tasks a schedule creates: which schedule, and the fire time (before jitter). No
    # foreign key: a deleted schedule's tasks stay, findable by it.
    Column("schedule_id", UUID(as_uuid=True), nullable=True),
    Column("scheduled_for", DateTime(timezone=True), nullable=True),
    CheckConstraint(f"status IN ({_STATUSES})", name="tasks_status_valid"),
    CheckConstraint("priority BETWEEN 1 AND 10", name="tasks_priority_range"),
    CheckConstraint("max_retries >= 0", name="tasks_max_retries_nonnegative"),
    CheckConstraint("attempt >= 0", name="tasks_attempt_nonnegative"),
    CheckConstraint(f"(finished_at IS NOT NULL) = ({_TERMINAL_SQL})", name="tasks_finished_iff_terminal"),
    # Partial indexes: each sweep scans only the rows in the status it looks for, so millions of
    # finished or far-future rows cost nothing.
    # A dispatch batch: per priority, the earliest due first (see store.sweeps.DISPATCH_DUE).
    Index(
        "tasks_due_by_priority_idx",
        "priority",
        "run_at",
        postgresql_where=text("status IN ('PENDING', 'FAILED')"),
    ),
    Index("tasks_started_idx", "started_at", postgresql_where=text("status = 'STARTED'")),
    Index("tasks_enqueued_idx", "published_at", postgresql_where=text("status = 'ENQUEUED'")),
    Index(
        "tasks_dead_unrecorded_idx",
        "published_at",
        postgresql_where=text("status = 'DEAD' AND NOT dlq_recorded"),
    ),
    # Newest-first listing with keyset pagination on (created_at, id), unfiltered or by status.
    Index("tasks_created_id_idx", "created_at", "id"),
    Index("tasks_status_created_idx", "status", "created_at", "id"),
    # By name, newest first (migration 0006 builds it CONCURRENTLY).
    Index("tasks_name_created_idx", "name", text("created_at DESC"), text("id DESC")),
    # Retention: finished tasks by age.
    Index("tasks_finished_idx", "finished_at", postgresql_where=text(_TERMINAL_SQL)),
    # One task per idempotency key; INSERT ... ON CONFLICT relies on it under concurrent requests.
    Index(
        "tasks_idempotency_key_idx",
        "idempotency_key",
        unique=True,
        postgresql_where=text("idempotency_key IS NOT NULL"),
    ),
    # One task per schedule and fire time, whatever races (two schedulers, a crash, a backfill):
    # the scheduler's INSERT ... ON CONFLICT relies on it.
    Index(
        "tasks_schedule_fire_idx",
        "schedule_id",
        "scheduled_for",
        unique=True,
        postgresql_where=text("schedule_id IS NOT NULL"),
    ),
    # GET /tasks?schedule_id=, newest first.
    Index(
        "tasks_schedule_created_idx",
        "schedule_id",
        "created_at",
        "id",
        postgresql_where=text("schedule_id IS NOT NULL"),
    ),
    # The overlap check: has this schedule a task not finished? A few rows, whatever the history.
    Index(
        "tasks_schedule_unfinished_idx",
        "schedule_id",
        postgresql_where=text("schedule_id IS NOT NULL AND status NOT IN ('SUCCEEDED', 'DEAD', 'CANCELLED')"),
    ),
)

# Partitioned by range of `at` (migration 0008; the partitions are made and dropped by
# store/partitions.py, and are not part of this metadata). No foreign key to tasks: a deleted task's
# events go with their partition, not one by one; readers ask for the task too. The primary key must
# hold the partition key.
task_events = Table(
    "task_events",
    metadata,
    Column("id", BigInteger, nullable=False, autoincrement=True),
    Column("task_id", UUID(as_uuid=True), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()),
    Column("from_status", Text, nullable=True),
    Column("to_status", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("detail", Text, nullable=True),
    PrimaryKeyConstraint("id", "at", name="task_events_pkey"),
    Index("task_events_task_idx", "task_id", "id"),
    postgresql_partition_by="RANGE (at)",
)

# No foreign key: the audit trail is kept longer than the tasks it describes.
dlq_events = Table(
    "dlq_events",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("task_id", UUID(as_uuid=True), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("task_name", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("error", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("task_id", "attempt", name="dlq_events_task_attempt_key"),
    Index("dlq_events_created_idx", "created_at"),
)

# Liveness of the long-running processes, for `taskscheduler check <role>` (compose healthchecks).
# Each process upserts its own row every PROCESS_HEARTBEAT_SEC and deletes it when it stops cleanly.
process_heartbeats = Table(
    "process_heartbeats",
    metadata,
    Column("id", Text, primary_key=True),
    Column("role", Text, nullable=False),
    Column("hostname", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    # The worker's queues (comma-separated); empty for the other roles.
    Column("detail", Text, nullable=False, server_default=text("''")),
    Column("started_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("seen_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("process_heartbeats_role_idx", "role", "hostname", "seen_at"),
)

# Recurring schedules (see schedule_spec.py and scheduler/schedules.py).
schedules = Table(
    "schedules",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("name", Text, nullable=False),
    Column("task", Text, nullable=False),
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("priority", SmallInteger, nullable=False),
    Column("max_retries", Integer, nullable=False),
    Column("timeout_sec", Double, nullable=True),
    Column("cron", Text, nullable=True),
    Column("every_sec", Integer, nullable=True),
    Column("timezone", Text, nullable=False, server_default=text("'UTC'")),
    Column("start_at", DateTime(timezone=True), nullable=True),
    Column("end_at", DateTime(timezone=True), nullable=True),
    Column("jitter_sec", Double, nullable=False, server_default=text("0")),
    Column("overlap", Text, nullable=False, server_default=text("'skip'")),
    Column("catchup_window_sec", Double, nullable=False, server_default=text("300")),
    Column("paused", Boolean, nullable=False, server_default=text("false")),
    Column("note", Text, nullable=True),
    Column("source", Text, nullable=False, server_default=text("'api'")),
    # The earliest fire time not yet handled; NULL once the schedule has ended (end_at).
    Column("next_fire_at", DateTime(timezone=True), nullable=True),
    # overlap=buffer_one: the fire time waiting for the running task to finish.
    Column("buffered_for", DateTime(timezone=True), nullable=True),
    Column("last_fire_at", DateTime(timezone=True), nullable=True),
    Column("fires", BigInteger, nullable=False, server_default=text("0")),
    Column("skips", BigInteger, nullable=False, server_default=text("0")),
    Column("misses", BigInteger, nullable=False, server_default=text("0")),
    Column("last_skipped_at", DateTime(timezone=True), nullable=True),
    Column("last_skip_reason", Text, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("name", name="schedules_name_key"),
    CheckConstraint("(cron IS NULL) <> (every_sec IS NULL)", name="schedules_cron_xor_every"),
    CheckConstraint("every_sec >= 1", name="schedules_every_sec_positive"),
    CheckConstraint("priority BETWEEN 1 AND 10", name="schedules_priority_range"),
    CheckConstraint("max_retries >= 0", name="schedules_max_retries_nonnegative"),
    CheckConstraint("overlap IN ('skip', 'allow', 'buffer_one')", name="schedules_overlap_valid"),
    CheckConstraint("source IN ('api', 'code')", name="schedules_source_valid"),
    CheckConstraint("end_at > start_at", name="schedules_end_after_start"),
    CheckConstraint("jitter_sec >= 0 AND catchup_window_sec >= 0", name="schedules_windows_nonnegative"),
    # The tick's batch: due schedules by fire time.
    Index("schedules_due_idx", "next_fire_at", postgresql_where=text("NOT paused")),
    Index("schedules_buffered_idx", "buffered_for", postgresql_where=text("buffered_for IS NOT NULL AND NOT paused")),
)
