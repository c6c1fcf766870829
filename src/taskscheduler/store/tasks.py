"""Every change of a task's status, each one guarded SQL statement that also writes its event row.

A transition names the status it expects (and, after dispatch, the attempt). When no row matches,
someone else moved the task first, and the function says so by returning None/False: the caller
drops its stale work. Nothing outside this package writes `tasks.status`.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import psycopg
from psycopg.types.json import Jsonb
from sqlalchemy import Connection, Row, RowMapping, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB

from taskscheduler import metrics
from taskscheduler.lifecycle import (
    CANCELLABLE,
    MAX_PRIORITY,
    MIN_PRIORITY,
    RETRYABLE,
    TERMINAL,
    DlqReason,
    TaskStatus,
    queue_for_priority,
)
from taskscheduler.store import db

MAX_ERROR_CHARS = 4000

# The database clock decides every time question; tests pass an explicit `now` to travel in time.
_NOW = "COALESCE(CAST(:now AS timestamptz), now())"


def storable_error(error: str | None) -> str | None:
    """An error text as a text column can hold it, the same wherever it is stored (`last_error`, an
    event's detail, `dlq_events.error`): NUL and lone surrogates, which PostgreSQL refuses, written
    as the escapes `\\x00` and `\\udce9`, and clipped to MAX_ERROR_CHARS characters."""
    if error is None:
        return None
    error = error[:MAX_ERROR_CHARS]  # first, so that a huge text costs no more than a short one
    if "\x00" in error:
        error = error.replace("\x00", "\\x00")
    if not error.isascii():
        error = error.encode("utf-8", "backslashreplace").decode("utf-8")
    return error[:MAX_ERROR_CHARS]


@dataclass(frozen=True)
class Dispatched:
    id: uuid.UUID
    attempt: int
    queue: str
    timeout_sec: float | None
    # The handler's name, for the message's shadow name (what Flower shows); not part of the message.
    name: str = ""


@dataclass(frozen=True)
class Claimed:
    name: str
    payload: dict[str, Any]
    timeout_sec: float | None
    max_retries: int
    retry_base_attempt: int


@dataclass(frozen=True)
class Started:
    """A STARTED task as the stuck sweep sees it."""

    id: uuid.UUID
    attempt: int
    max_retries: int
    retry_base_attempt: int
    by_heartbeat: bool


@dataclass(frozen=True)
class DeadUnrecorded:
    id: uuid.UUID
    attempt: int
    name: str
    reason: str
    error: str | None


# Not frozen: a frozen dataclass's __init__ costs several times more, a cost paid per task of a batch.
@dataclass(slots=True)
class NewTask:
    """A task to create. With an `idempotency_key`, `request_hash` identifies the request it came with."""

    name: str
    payload: dict[str, Any]
    priority: int
    queue: str
    run_at: datetime | None
    max_retries: int
    timeout_sec: float | None
    idempotency_key: str | None = None
    request_hash: str | None = None


@dataclass(frozen=True)
class CreateResult:
    """A task row, and whether this call created it (False: an earlier request with its key did)."""

    row: RowMapping | dict[str, Any]
    created: bool


class IdempotencyConflict(Exception):
    """An idempotency key already names a task created from a different request."""

    def __init__(self, key: str, task_id: uuid.UUID | None) -> None:
        where = f" (task {task_id})" if task_id else " in this batch"
        super().__init__(f"idempotency key {key!r} was already used for a different request{where}")
        self.key = key
        self.task_id = task_id


class IdempotencyKeyInFlux(Exception):
    """The task holding an idempotency key was deleted while the key was being looked up: try again."""

    def __init__(self, key: str) -> None:
        super().__init__(f"idempotency key {key!r} was just released (its task was deleted); send the request again")


# The channel on which a scheduler waits between polls; NOTIFY is delivered when the transaction
# that sent it commits, so a task due now is dispatched at once instead of at the next poll.
DUE_CHANNEL = "taskscheduler_due"
_NOTIFY_DUE = f"SELECT pg_notify('{DUE_CHANNEL}', '')"

# Many tasks in one statement. A task whose idempotency key exists already is skipped (ON CONFLICT DO
# NOTHING waits for a concurrent insert of the same key to commit or roll back, then decides), and
# only the rows inserted get their 'created' event. The NOTIFY for a task due now rides in the same
# statement (`due`, joined so that it runs), which saves a round trip and lets a single task be
# created in autocommit mode.
_CREATE_SQL = f"""
    WITH input AS (
        SELECT * FROM jsonb_to_recordset(:rows) AS r(
            id uuid, name text, payload jsonb, priority smallint, queue text, run_at timestamptz,
            max_retries integer, timeout_sec double precision, idempotency_key text, request_hash text, ord integer)
    ), created AS (
        INSERT INTO tasks (id, name, payload, priority, queue, status, run_at, max_retries, timeout_sec,
                           idempotency_key, request_hash)
        SELECT id, name, payload, priority, queue, 'PENDING', COALESCE(run_at, now()), max_retries, timeout_sec,
               idempotency_key, request_hash
        FROM input ORDER BY ord
        ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING *
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)
        SELECT id, NULL, 'PENDING', 0, 'created' FROM created
    ), due AS (
        {_NOTIFY_DUE} FROM created WHERE run_at <= created_at LIMIT 1
    )
    SELECT created.* FROM created LEFT JOIN due ON true
    """
_CREATE = text(_CREATE_SQL).bindparams(bindparam("rows", type_=JSONB))
# The same for psycopg on the event loop (db.AsyncStatementPool), without SQLAlchemy.
_CREATE_PG = _CREATE_SQL.replace(":rows", "%(rows)s")

_BY_KEYS = text("SELECT * FROM tasks WHERE idempotency_key = ANY(:keys)")
_BY_KEYS_PG = "SELECT * FROM tasks WHERE idempotency_key = ANY(%(keys)s)"


def _insert_row(task_id: str, spec: NewTask, ord_: int) -> dict[str, Any]:
    return {
        "id": task_id,
        "name": spec.name,
        "payload": spec.payload,
        "priority": spec.priority,
        "queue": spec.queue,
        "run_at": None if spec.run_at is None else spec.run_at.isoformat(),
        "max_retries": spec.max_retries,
        "timeout_sec": spec.timeout_sec,
        "idempotency_key": spec.idempotency_key,
        "request_hash": spec.request_hash,
        "ord": ord_,
    }


def _count_created(rows: Iterable[Mapping[Any, Any]]) -> None:
    """Count created tasks; call it once no conflict can roll them back."""
    # Once per queue, not per row: a label lookup per task is a measurable part of a batch.
    for queue, n in Counter(row["queue"] for row in rows).items():
        metrics.TASKS_CREATED.labels(queue=queue).inc(n)


def _plan(specs: Sequence[NewTask]) -> tuple[list[dict[str, Any]], list[str | None], dict[str, int]]:
    """The rows to insert for `specs`; per spec the id it is inserted under (None when a spec before
    it has its key); and for each key the index of the first spec with it."""
    rows: list[dict[str, Any]] = []
    ids: list[str | None] = []
    first_with_key: dict[str, int] = {}
    for index, spec in enumerate(specs):
        key = spec.idempotency_key
        if key is not None:
            first = first_with_key.setdefault(key, index)
            if first != index:
                if specs[first].request_hash != spec.request_hash:
                    raise IdempotencyConflict(key, None)
                ids.append(None)
                continue
        task_id = str(uuid.uuid4())
        ids.append(task_id)
        rows.append(_insert_row(task_id, spec, len(rows)))
    return rows, ids, first_with_key


def _not_inserted(ids: list[str | None], first_with_key: dict[str, int], inserted: Mapping[str, Any]) -> list[str]:
    """Keys that did not insert: an earlier request (maybe a concurrent one, now committed) holds them."""
    return [key for key, index in first_with_key.items() if ids[index] not in inserted]


def _results(
    specs: Sequence[NewTask],
    ids: list[str | None],
    first_with_key: dict[str, int],
    inserted: Mapping[str, RowMapping | dict[str, Any]],
    existing: Mapping[str, RowMapping | dict[str, Any]],
) -> list[CreateResult]:
    """Check the tasks found by key against their specs, count the inserted ones, and pair each spec
    with its row."""
    for key in _not_inserted(ids, first_with_key, inserted):
        holder = existing.get(key)
        if holder is None:
            # Its task was deleted (retention) between the two statements: rare; sent again, the
            # request creates the task.
            raise IdempotencyKeyInFlux(key)
        if holder["request_hash"] != specs[first_with_key[key]].request_hash:
            raise IdempotencyConflict(key, holder["id"])
    _count_created(inserted.values())
    results: list[CreateResult] = []
    for spec, spec_id in zip(specs, ids, strict=True):
        if spec_id is not None and spec_id in inserted:
            results.append(CreateResult(inserted[spec_id], created=True))
            continue
        spec_key = spec.idempotency_key
        assert spec_key is not None
        if spec_key in existing:
            results.append(CreateResult(existing[spec_key], created=False))
        else:  # a later spec with a key this call inserted
            first_id = ids[first_with_key[spec_key]]
            assert first_id is not None
            results.append(CreateResult(inserted[first_id], created=False))
    return results


def create_tasks(conn: Connection, specs: Sequence[NewTask]) -> list[CreateResult]:
    """Create `specs` in one statement; the results are in the order of `specs`.

    A spec whose idempotency key names an existing task created with the same `request_hash` gets
    that task (created=False); with a different hash, IdempotencyConflict (the caller rolls back).
    Specs that share a key must share the hash too, and get one task.
    """
    rows, ids, first_with_key = _plan(specs)
    inserted = {str(row["id"]): row for row in conn.execute(_CREATE, {"rows": rows}).mappings()} if rows else {}
    taken = _not_inserted(ids, first_with_key, inserted)
    existing = (
        {row["idempotency_key"]: row for row in conn.execute(_BY_KEYS, {"keys": taken}).mappings()} if taken else {}
    )
    return _results(specs, ids, first_with_key, inserted, existing)


async def create_tasks_async(conn: db.AsyncConn, specs: Sequence[NewTask]) -> list[CreateResult]:
    """`create_tasks` on a psycopg connection of the event loop (in a transaction, see
    `db.run_transaction_async`); the rows are plain dicts."""
    rows, ids, first_with_key = _plan(specs)
    inserted: dict[str, dict[str, Any]] = {}
    if rows:
        cursor = await conn.execute(_CREATE_PG, {"rows": Jsonb(rows)})
        inserted = {str(row["id"]): row for row in await cursor.fetchall()}
    taken = _not_inserted(ids, first_with_key, inserted)
    existing: dict[str, dict[str, Any]] = {}
    if taken:
        cursor = await conn.execute(_BY_KEYS_PG, {"keys": taken})
        existing = {row["idempotency_key"]: row for row in await cursor.fetchall()}
    return _results(specs, ids, first_with_key, inserted, existing)


async def get_by_idempotency_key_async(conn: db.AsyncConn, key: str) -> dict[str, Any] | None:
    return await (await conn.execute(_BY_KEYS_PG, {"keys": [key]})).fetchone()


async def get_by_idempotency_keys_async(conn: db.AsyncConn, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The tasks holding these keys, by key (keys no task holds are left out)."""
    rows = await (await conn.execute(_BY_KEYS_PG, {"keys": list(keys)})).fetchall()
    return {row["idempotency_key"]: row for row in rows}


async def create_task_async(
    pool: db.AsyncStatementPool | None, spec: NewTask, url: str | None = None
) -> dict[str, Any]:
    """Create one task without an idempotency key, from the event loop: one autocommit statement,
    one round trip, on a connection of `pool` (see `db.run_statement_async`).

    Nothing else has to be atomic with it, so BEGIN/COMMIT and a ping per checkout would only add
    round trips. After a dead connection the statement is sent once more with the same id: if the
    first one did commit, the second meets its row in the primary key, and that row is the answer,
    so a retry never creates the task twice.
    """
    if spec.idempotency_key is not None:
        raise ValueError("a task with an idempotency key needs create_tasks, in a transaction")
    task_id = str(uuid.uuid4())
    params = {"rows": Jsonb([_insert_row(task_id, spec, 0)])}

    async def insert(conn: db.AsyncConn) -> dict[str, Any] | None:
        try:
            return await (await conn.execute(_CREATE_PG, params)).fetchone()
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name != "tasks_pkey":
                raise
            return await (await conn.execute("SELECT * FROM tasks WHERE id = %s", (task_id,))).fetchone()

    created = await db.run_statement_async(pool, insert, url)
    assert created is not None
    _count_created([created])
    return created


def create_task(
    conn: Connection,
    *,
    name: str,
    payload: dict[str, Any],
    priority: int,
    queue: str,
    run_at: datetime | None,
    max_retries: int,
    timeout_sec: float | None,
    idempotency_key: str | None = None,
    request_hash: str | None = None,
) -> RowMapping:
    """Create one task (see `create_tasks`); returns its row, or that of the task holding its key."""
    spec = NewTask(
        name=name,
        payload=payload,
        priority=priority,
        queue=queue,
        run_at=run_at,
        max_retries=max_retries,
        timeout_sec=timeout_sec,
        idempotency_key=idempotency_key,
        request_hash=request_hash,
    )
    # The sync path's rows are SQLAlchemy's.
    return cast(RowMapping, create_tasks(conn, [spec])[0].row)


def get_task(conn: Connection, task_id: uuid.UUID) -> RowMapping | None:
    return conn.execute(text("SELECT * FROM tasks WHERE id = :id"), {"id": task_id}).mappings().one_or_none()


def get_by_idempotency_key(conn: Connection, key: str) -> RowMapping | None:
    return conn.execute(_BY_KEYS, {"keys": [key]}).mappings().one_or_none()


def list_events(conn: Connection, task_id: uuid.UUID) -> list[RowMapping]:
    return list(
        conn.execute(
            text("SELECT at, from_status, to_status, attempt, detail FROM task_events WHERE task_id = :id ORDER BY id"),
            {"id": task_id},
        ).mappings()
    )


# PENDING/FAILED -> ENQUEUED for a batch of due tasks. SKIP LOCKED lets several schedulers share the
# work without waiting on each other; the status guard in the UPDATE is belt and braces.
_DISPATCH = text(
    f"""
    WITH due AS (
        SELECT d.id, d.status
        FROM unnest(CAST(:priorities AS smallint[])) AS p(priority)
        CROSS JOIN LATERAL (
            SELECT id, status FROM tasks
            WHERE status IN ('PENDING', 'FAILED') AND priority = p.priority AND run_at <= {_NOW}
            ORDER BY run_at
            LIMIT :limit
            FOR UPDATE SKIP LOCKED
        ) d
        LIMIT :limit
    ), moved AS (
        UPDATE tasks t
        SET status = 'ENQUEUED', attempt = t.attempt + 1, published_at = now(), updated_at = now()
        FROM due
        WHERE t.id = due.id AND t.status = due.status
        RETURNING t.id, t.attempt, t.queue, t.priority, t.run_at, t.timeout_sec, t.name, due.status AS from_status
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt)
        SELECT id, from_status, 'ENQUEUED', attempt FROM moved ORDER BY priority DESC, run_at
    )
    SELECT id, attempt, queue, timeout_sec, name, from_status FROM moved ORDER BY priority DESC, run_at
    """
)


def dispatch_due(
    conn: Connection, *, limit: int, queue: str | None = None, now: datetime | None = None
) -> list[Dispatched]:
    """PENDING/FAILED tasks due at `now` (of `queue`, or of all) -> ENQUEUED, at most `limit`, priority first.

    The batch is taken priority by priority (a queue is a range of priorities), each an index range
    scan of `tasks_due_by_priority_idx` in run_at order that stops once the batch is full: the cost
    is the batch's, however many tasks are due, and an empty queue costs a few index probes.
    """
    priorities = [p for p in range(MAX_PRIORITY, MIN_PRIORITY - 1, -1) if queue in (None, queue_for_priority(p))]
    rows = conn.execute(_DISPATCH, {"priorities": priorities, "limit": limit, "now": now}).all()
    for r in rows:
        metrics.transition(r.from_status, TaskStatus.ENQUEUED, r.queue)
    return [Dispatched(id=r.id, attempt=r.attempt, queue=r.queue, timeout_sec=r.timeout_sec, name=r.name) for r in rows]


_ENQUEUED_PER_QUEUE = text("SELECT queue, count(*) FROM tasks WHERE status = 'ENQUEUED' GROUP BY queue")


def enqueued_per_queue(conn: Connection) -> dict[str, int]:
    """How many tasks wait in each queue, published but not yet claimed."""
    return {queue: int(n) for queue, n in conn.execute(_ENQUEUED_PER_QUEUE)}


# The earliest run_at of each priority: ten probes of tasks_due_by_priority_idx.
_NEXT_DUE = text(
    f"""
    SELECT EXTRACT(EPOCH FROM min(n.run_at) - {_NOW})::float8
    FROM generate_series({MIN_PRIORITY}, {MAX_PRIORITY}) AS p(priority)
    CROSS JOIN LATERAL (
        SELECT run_at FROM tasks
        WHERE status IN ('PENDING', 'FAILED') AND priority = p.priority
        ORDER BY run_at LIMIT 1
    ) n
    """
)


def seconds_until_next_due(conn: Connection, *, now: datetime | None = None) -> float | None:
    """Seconds until the earliest PENDING/FAILED task is due (<= 0: due now); None if there is none."""
    value = conn.execute(_NEXT_DUE, {"now": now}).scalar_one()
    return None if value is None else float(value)


# What the outcome transitions return: the queue and the attempt's run time, for the metrics.
_OUTCOME = "t.id, t.queue, EXTRACT(EPOCH FROM now() - t.started_at)::float8 AS run_sec"


def status_guard(column: str, status: TaskStatus) -> str:
    """`column = 'STATUS'` for a row already found by its primary key.

    Written as `(...) IS TRUE` so that no index on the status can serve it: with statistics taken
    when, say, no task was ENQUEUED, the planner would otherwise walk a status index (or a partial
    index on that status) and read every row in that status for each single-row transition.
    """
    return f"({column} = '{status.value}') IS TRUE"


def _guarded(set_clause: str, *, src: TaskStatus, dst: TaskStatus, returning: str = _OUTCOME) -> str:
    """One statement: move (id, attempt) from `src` to `dst` and append the event row."""
    return f"""
    WITH moved AS (
        UPDATE tasks t SET status = '{dst.value}', updated_at = now(), {set_clause}
        WHERE t.id = :id AND t.attempt = :attempt AND {status_guard("t.status", src)}
        RETURNING {returning}
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)
        SELECT id, '{src.value}', '{dst.value}', :attempt, :detail FROM moved
    )
    SELECT * FROM moved
    """


_CLAIMED_COLUMNS = "t.id, t.name, t.payload, t.timeout_sec, t.max_retries, t.retry_base_attempt, t.queue"
# ENQUEUED -> STARTED, or the row this very claim (same token) already moved: the claim is sent again
# when its reply was lost, and must then find its own claim rather than drop the task. Both parts
# read the snapshot taken before the update, so at most one of them returns the row.
_CLAIM = text(
    f"""
    WITH moved AS (
        UPDATE tasks t SET status = 'STARTED', updated_at = now(), started_at = now(), heartbeat_at = now(),
                           claim_token = :token
        WHERE t.id = :id AND t.attempt = :attempt AND {status_guard("t.status", TaskStatus.ENQUEUED)}
        RETURNING {_CLAIMED_COLUMNS}, EXTRACT(EPOCH FROM t.started_at - t.run_at)::float8 AS lag_sec, true AS fresh
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)
        SELECT id, 'ENQUEUED', 'STARTED', :attempt, :detail FROM moved
    ), mine AS (
        SELECT {_CLAIMED_COLUMNS}, 0::float8 AS lag_sec, false AS fresh FROM tasks t
        WHERE t.id = :id AND t.attempt = :attempt AND {status_guard("t.status", TaskStatus.STARTED)}
          AND t.claim_token = :token
    )
    SELECT * FROM moved UNION ALL SELECT * FROM mine
    """
)


def claim(
    conn: Connection,
    *,
    task_id: uuid.UUID,
    attempt: int,
    worker: str | None = None,
    token: uuid.UUID | None = None,
) -> Claimed | None:
    """ENQUEUED -> STARTED. None when the message is stale (duplicate, cancelled, re-dispatched).

    `token` names this claim: sent again with the same token (its first reply was lost), the claim
    returns the task it already started instead of None. Without one, a fresh token.
    """
    params = {"id": task_id, "attempt": attempt, "detail": worker, "token": token or uuid.uuid4()}
    row = conn.execute(_CLAIM, params).one_or_none()
    if row is None:
        return None
    if not row.fresh:
        return _claimed(row)
    metrics.transition(TaskStatus.ENQUEUED, TaskStatus.STARTED, row.queue)
    metrics.DISPATCH_LAG.labels(queue=row.queue).observe(max(0.0, row.lag_sec))
    return _claimed(row)


def _claimed(row: Row[Any]) -> Claimed:
    return Claimed(
        name=row.name,
        payload=row.payload,
        timeout_sec=row.timeout_sec,
        max_retries=row.max_retries,
        retry_base_attempt=row.retry_base_attempt,
    )


_HEARTBEAT = text(
    "UPDATE tasks SET heartbeat_at = now()"
    f" WHERE id = :id AND attempt = :attempt AND {status_guard('status', TaskStatus.STARTED)}"
)


def heartbeat(conn: Connection, *, task_id: uuid.UUID, attempt: int) -> bool:
    """Not a transition: refreshes the liveness of a running attempt. False once it was taken away."""
    return conn.execute(_HEARTBEAT, {"id": task_id, "attempt": attempt}).rowcount == 1


_SUCCEED = text(
    _guarded(
        "result = :result, last_error = NULL, finished_at = now()",
        src=TaskStatus.STARTED,
        dst=TaskStatus.SUCCEEDED,
    )
).bindparams(bindparam("result", type_=JSONB(none_as_null=True)))


def succeed(conn: Connection, *, task_id: uuid.UUID, attempt: int, result: Any) -> bool:
    params = {"id": task_id, "attempt": attempt, "result": result, "detail": None}
    return _counted(conn.execute(_SUCCEED, params).first(), TaskStatus.STARTED, TaskStatus.SUCCEEDED)


def _counted(row: Row[Any] | None, src: TaskStatus, dst: TaskStatus) -> bool:
    """Count an outcome transition that happened (row is not None) in the metrics."""
    if row is None:
        return False
    metrics.transition(src, dst, row.queue)
    metrics.observe_run_time(row.queue, dst.lower(), row.run_sec)
    return True


_FAIL = text(
    _guarded(
        "last_error = :error, run_at = now() + make_interval(secs => :retry_in_sec)",
        src=TaskStatus.STARTED,
        dst=TaskStatus.FAILED,
    )
)


def fail(conn: Connection, *, task_id: uuid.UUID, attempt: int, error: str, retry_in_sec: float) -> bool:
    """STARTED -> FAILED, due again after `retry_in_sec`."""
    error = storable_error(error) or ""
    params = {"id": task_id, "attempt": attempt, "error": error, "retry_in_sec": retry_in_sec, "detail": error}
    return _counted(conn.execute(_FAIL, params).first(), TaskStatus.STARTED, TaskStatus.FAILED)


_KILL = text(
    _guarded(
        "last_error = :error, dead_reason = :reason, dlq_recorded = false, finished_at = now(), published_at = now()",
        src=TaskStatus.STARTED,
        dst=TaskStatus.DEAD,
        returning=f"{_OUTCOME}, t.name",
    )
)


def kill(conn: Connection, *, task_id: uuid.UUID, attempt: int, error: str, reason: DlqReason) -> str | None:
    """STARTED -> DEAD; returns the task's name (for the DLQ message the caller publishes), or None."""
    error = storable_error(error) or ""
    detail = storable_error(f"{reason}: {error}")
    params = {"id": task_id, "attempt": attempt, "error": error, "reason": reason.value, "detail": detail}
    row = conn.execute(_KILL, params).first()
    if row is None or not _counted(row, TaskStatus.STARTED, TaskStatus.DEAD):
        return None
    return str(row.name)


# Heartbeat silence counts from the latest of: the last heartbeat; when this scheduler's connection
# to the database last came back (`reconnected_at`, its start included); when the database server
# started. While the database was unreachable no worker could write a heartbeat, so that silence says
# nothing about the workers. The postmaster's start covers a restart that this scheduler did not see
# (it started later); its own reconnection covers a failover to a replica (which keeps its older
# start time) and a network outage (which leaves the server running).
_SILENT_SINCE = "GREATEST(heartbeat_at, CAST(:reconnected_at AS timestamptz), pg_postmaster_start_time())"

_LOCK_STUCK = text(
    f"""
    SELECT id, attempt, max_retries, retry_base_attempt,
           {_SILENT_SINCE} < {_NOW} - make_interval(secs => :heartbeat_timeout_sec) AS by_heartbeat
    FROM tasks
    WHERE status = 'STARTED'
      AND ({_SILENT_SINCE} < {_NOW} - make_interval(secs => :heartbeat_timeout_sec)
           OR started_at < {_NOW} - make_interval(secs => COALESCE(timeout_sec, :default_timeout_sec)))
    ORDER BY started_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
)


def lock_stuck(
    conn: Connection,
    *,
    heartbeat_timeout_sec: float,
    default_timeout_sec: float,
    limit: int,
    reconnected_at: datetime | None = None,
    now: datetime | None = None,
) -> list[Started]:
    """STARTED tasks whose worker went silent or that ran past their timeout, locked for this transaction.

    Silent means no heartbeat for `heartbeat_timeout_sec` counted from the last heartbeat, but never
    from before `reconnected_at` (when the caller last regained the database) or the database
    server's start: a heartbeat missed while the database was away is not a dead worker.
    """
    rows = conn.execute(
        _LOCK_STUCK,
        {
            "now": now,
            "heartbeat_timeout_sec": heartbeat_timeout_sec,
            "default_timeout_sec": default_timeout_sec,
            "reconnected_at": reconnected_at,
            "limit": limit,
        },
    )
    return [
        Started(
            id=r.id,
            attempt=r.attempt,
            max_retries=r.max_retries,
            retry_base_attempt=r.retry_base_attempt,
            by_heartbeat=bool(r.by_heartbeat),
        )
        for r in rows
    ]


_CLOCK = text(f"SELECT {_NOW}")


def database_now(conn: Connection, *, now: datetime | None = None) -> datetime:
    """The database's clock (or `now`, in tests): the scheduler notes on it when the database came back."""
    value: datetime = conn.execute(_CLOCK, {"now": now}).scalar_one()
    return value


# A lost message is published again only while the broker holds fewer messages for the queue than
# the queue has unclaimed tasks (`waiting`, read from the broker just before): with the queue's
# workers away the messages wait there, and publishing them again every ENQUEUE_TIMEOUT_SEC would
# only pile up duplicates. The budget is counted in the statement, with the sweep.
_REPUBLISH_ENQUEUED = text(
    f"""
    WITH lost AS (
        SELECT id FROM tasks
        WHERE status = 'ENQUEUED' AND queue = :queue
          AND published_at < {_NOW} - make_interval(secs => :timeout_sec)
        ORDER BY published_at
        LIMIT GREATEST(0, LEAST(:limit,
            (SELECT count(*) FROM tasks WHERE status = 'ENQUEUED' AND queue = :queue) - :waiting))
        FOR UPDATE SKIP LOCKED
    )
    UPDATE tasks t SET published_at = {_NOW}
    FROM lost WHERE t.id = lost.id AND t.status = 'ENQUEUED'
    RETURNING t.id, t.attempt, t.queue, t.timeout_sec, t.name
    """
)


def take_lost_enqueued(
    conn: Connection, *, queue: str, timeout_sec: float, limit: int, waiting: int = 0, now: datetime | None = None
) -> list[Dispatched]:
    """ENQUEUED tasks of `queue` unclaimed for `timeout_sec`; marks them published again (same attempt).

    At most as many as the queue has unclaimed tasks beyond the `waiting` messages the broker holds
    for it, so that the broker never holds more messages for a queue than it has unclaimed tasks.
    """
    params = {"now": now, "queue": queue, "timeout_sec": timeout_sec, "limit": limit, "waiting": waiting}
    rows = conn.execute(_REPUBLISH_ENQUEUED, params)
    return [Dispatched(id=r.id, attempt=r.attempt, queue=r.queue, timeout_sec=r.timeout_sec, name=r.name) for r in rows]


# As for lost task messages: one DLQ message per DEAD task still waiting in the broker is enough.
_REPUBLISH_DEAD = text(
    f"""
    WITH lost AS (
        SELECT id FROM tasks
        WHERE status = 'DEAD' AND NOT dlq_recorded
          AND published_at < {_NOW} - make_interval(secs => :timeout_sec)
        ORDER BY published_at
        LIMIT GREATEST(0, LEAST(:limit,
            (SELECT count(*) FROM tasks WHERE status = 'DEAD' AND NOT dlq_recorded) - :waiting))
        FOR UPDATE SKIP LOCKED
    )
    UPDATE tasks t SET published_at = {_NOW}
    FROM lost WHERE t.id = lost.id AND t.status = 'DEAD'
    RETURNING t.id, t.attempt, t.name, t.dead_reason, t.last_error
    """
)


def take_unrecorded_dead(
    conn: Connection, *, timeout_sec: float, limit: int, waiting: int = 0, now: datetime | None = None
) -> list[DeadUnrecorded]:
    """DEAD tasks whose DLQ record has not appeared within `timeout_sec`; marks them published again.

    At most as many as there are such tasks beyond the `waiting` messages the DLQ queue holds: with
    the DLQ worker down, each DEAD task has one message waiting and none is published again.
    """
    params = {"now": now, "timeout_sec": timeout_sec, "limit": limit, "waiting": waiting}
    rows = conn.execute(_REPUBLISH_DEAD, params)
    return [
        DeadUnrecorded(id=r.id, attempt=r.attempt, name=r.name, reason=r.dead_reason, error=r.last_error) for r in rows
    ]


# --- operators: list, cancel, retry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskFilter:
    statuses: Sequence[TaskStatus] = ()
    name: str | None = None
    queue: str | None = None
    created_after: datetime | None = None  # inclusive
    created_before: datetime | None = None  # exclusive
    schedule_id: uuid.UUID | None = None


_LIST_COLUMNS = (
    "id, name, priority, queue, status, run_at, attempt, max_retries, timeout_sec, last_error, dead_reason,"
    " idempotency_key, created_at, updated_at, started_at, finished_at, schedule_id, scheduled_for"
)


def list_tasks(
    conn: Connection, where: TaskFilter, *, limit: int, after: tuple[datetime, uuid.UUID] | None = None
) -> list[RowMapping]:
    """Tasks newest first, without payload and result, ordered by (created_at, id) descending.

    `after` is the (created_at, id) of the last task of the previous page (keyset pagination: a page
    never shifts when tasks are created meanwhile, and costs the same however deep it is).
    """
    clauses: list[str] = []
    params: dict[str, Any] = {"limit": limit}
    if where.statuses:
        clauses.append("status = ANY(:statuses)")
        params["statuses"] = [str(s) for s in where.statuses]
    if where.name is not None:
        clauses.append("name = :name")
        params["name"] = where.name
    if where.queue is not None:
        clauses.append("queue = :queue")
        params["queue"] = where.queue
    if where.schedule_id is not None:
        clauses.append("schedule_id = :schedule_id")
        params["schedule_id"] = where.schedule_id
    if where.created_after is not None:
        clauses.append("created_at >= :created_after")
        params["created_after"] = where.created_after
    if where.created_before is not None:
        clauses.append("created_at < :created_before")
        params["created_before"] = where.created_before
    if after is not None:
        clauses.append("(created_at, id) < (:after_created_at, :after_id)")
        params["after_created_at"], params["after_id"] = after
    sql = f"SELECT {_LIST_COLUMNS} FROM tasks"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY created_at DESC, id DESC LIMIT :limit"
    return list(conn.execute(text(sql), params).mappings())


def _sql_list(statuses: frozenset[TaskStatus]) -> str:
    return ", ".join(f"'{s.value}'" for s in sorted(statuses))


@dataclass(frozen=True)
class Moved:
    """The outcome of an operator's transition: `row` when it happened, else the status that prevented it."""

    row: RowMapping | None
    status: TaskStatus | None  # the status the task is in now; None: no such task


def _by_id(set_clause: str, *, src: frozenset[TaskStatus], dst: TaskStatus) -> str:
    """One statement: move the task `:id` from any status in `src` to `dst` and append its event.

    The task's row is locked first (FOR UPDATE waits for a transition in flight, then sees its
    result), so the status the event records as `from_status` is the one the update replaced.
    The statement returns the task's status either way, to tell "not found" from "not allowed".
    """
    return f"""
    WITH cur AS (
        SELECT id, status FROM tasks WHERE id = :id FOR UPDATE
    ), moved AS (
        UPDATE tasks t SET status = '{dst.value}', updated_at = now(), {set_clause}
        FROM cur
        WHERE t.id = cur.id AND cur.status IN ({_sql_list(src)}) AND t.status = cur.status
        RETURNING t.id, t.attempt, t.queue, cur.status AS from_status
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)
        SELECT id, from_status, '{dst.value}', attempt, :detail FROM moved
    )
    SELECT cur.status AS current_status, moved.queue AS moved_queue
    FROM cur LEFT JOIN moved ON moved.id = cur.id
    """


_CANCEL = text(_by_id("finished_at = now()", src=CANCELLABLE, dst=TaskStatus.CANCELLED))

# A fresh retry budget from the current attempt (never reset: it is the fencing token), due now.
_RETRY_SET = (
    "run_at = now(), retry_base_attempt = t.attempt, finished_at = NULL, dead_reason = NULL, dlq_recorded = false"
)
_RETRY = text(_by_id(_RETRY_SET, src=RETRYABLE, dst=TaskStatus.PENDING))


def _moved(conn: Connection, statement: Any, task_id: uuid.UUID, detail: str, dst: TaskStatus) -> Moved:
    result = conn.execute(statement, {"id": task_id, "detail": detail}).one_or_none()
    if result is None:
        return Moved(row=None, status=None)
    if result.moved_queue is None:
        return Moved(row=None, status=TaskStatus(result.current_status))
    metrics.transition(result.current_status, dst, result.moved_queue)
    return Moved(row=get_task(conn, task_id), status=dst)


def cancel(conn: Connection, task_id: uuid.UUID, *, detail: str = "cancelled") -> Moved:
    """PENDING, FAILED or ENQUEUED -> CANCELLED. A message already published for it is then dropped by
    the worker's guarded claim; a STARTED or finished task is left alone (`row` None, `status` says why)."""
    return _moved(conn, _CANCEL, task_id, detail, TaskStatus.CANCELLED)


def retry(conn: Connection, task_id: uuid.UUID, *, detail: str = "retried") -> Moved:
    """DEAD or CANCELLED -> PENDING, due now, with a fresh retry budget; the events so far are kept."""
    return _moved(conn, _RETRY, task_id, detail, TaskStatus.PENDING)


_RETRY_DEAD = text(
    f"""
    WITH picked AS (
        SELECT id FROM tasks
        WHERE status = 'DEAD'
          AND (CAST(:name AS text) IS NULL OR name = :name)
          AND (CAST(:reason AS text) IS NULL OR dead_reason = :reason)
          AND (CAST(:since AS timestamptz) IS NULL OR finished_at >= :since)
          AND finished_at <= :until
        ORDER BY finished_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    ), moved AS (
        UPDATE tasks t SET status = 'PENDING', updated_at = now(), {_RETRY_SET}
        FROM picked
        WHERE t.id = picked.id AND t.status = 'DEAD'
        RETURNING t.id, t.attempt, t.queue
    ), event AS (
        INSERT INTO task_events (task_id, from_status, to_status, attempt, detail)
        SELECT id, 'DEAD', 'PENDING', attempt, :detail FROM moved
    )
    SELECT queue, count(*) AS n FROM moved GROUP BY queue
    """
)


def retry_dead(
    conn: Connection,
    *,
    name: str | None,
    reason: str | None,
    since: datetime | None,
    until: datetime,
    limit: int,
    detail: str = "retried from the DLQ",
) -> int:
    """Up to `limit` DEAD tasks (by name, DLQ reason, finished at or after `since` and not after `until`)
    -> PENDING, as `retry` does. Returns how many. Tasks locked by another transaction are skipped."""
    params = {"name": name, "reason": reason, "since": since, "until": until, "limit": limit, "detail": detail}
    total = 0
    for row in conn.execute(_RETRY_DEAD, params):
        metrics.transition(TaskStatus.DEAD, TaskStatus.PENDING, row.queue, row.n)
        total += row.n
    return total


def task_counts(conn: Connection) -> list[tuple[str, str, int]]:
    """(status, queue, count) of every task now: one GROUP BY, for /metrics."""
    conn.execute(text("SET LOCAL statement_timeout = '5s'"))
    rows = conn.execute(text("SELECT status, queue, count(*) FROM tasks GROUP BY status, queue"))
    return [(r[0], r[1], int(r[2])) for r in rows]


# --- retention ----------------------------------------------------------------------------------------------------

_DELETE_FINISHED = text(
    f"""
    WITH old AS (
        SELECT id FROM tasks
        WHERE status IN ({_sql_list(TERMINAL)})
          AND finished_at < {_NOW} - make_interval(secs => :older_than_sec)
          AND (status <> 'DEAD' OR dlq_recorded)
        ORDER BY finished_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    DELETE FROM tasks t USING old
    WHERE t.id = old.id AND t.status IN ({_sql_list(TERMINAL)}) AND (t.status <> 'DEAD' OR t.dlq_recorded)
    """
)


def delete_finished(conn: Connection, *, older_than_sec: float, limit: int, now: datetime | None = None) -> int:
    """Delete up to `limit` SUCCEEDED, DEAD or CANCELLED tasks finished more than `older_than_sec` ago, and
    their events (ON DELETE CASCADE). Not a transition: the task is gone. Returns how many.

    A DEAD task whose `dlq_events` row is not written yet is kept: the sweep still owes it its DLQ
    message, and deleting it would lose the only record that it died."""
    params = {"older_than_sec": older_than_sec, "limit": limit, "now": now}
    return conn.execute(_DELETE_FINISHED, params).rowcount
