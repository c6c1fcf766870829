"""Creating tasks: many in one statement, idempotency keys, and the NOTIFY for a task due now."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import psycopg
import pydantic_core
from psycopg.types.json import Jsonb
from sqlalchemy import Connection, RowMapping
from sqlalchemy.exc import IntegrityError

from taskscheduler import metrics
from taskscheduler.store.db import Database
from taskscheduler.store.operations import GET_TASK
from taskscheduler.store.statement_pool import AsyncConn

Row = TypeVar("Row", bound=Mapping[Any, Any])


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

    def __init__(self, key: str, task_id: uuid.UUID | None, *, message: str | None = None) -> None:
        where = f" (task {task_id})" if task_id else " in this batch"
        super().__init__(message or f"idempotency key {key!r} was already used for a different request{where}")
        self.key = key
        self.task_id = task_id


class IdempotencyKeyInFlux(Exception):
    """The task holding an idempotency key was deleted while the key was being looked up: try again."""

    def __init__(self, key: str) -> None:
        super().__init__(f"idempotency key {key!r} was just released (its task was deleted); send the request again")


# The channel on which a scheduler waits between polls; NOTIFY is delivered when the transaction
# that sent it commits, so a task due now is dispatched at once instead of at the next poll.
DUE_CHANNEL = "taskscheduler_due"

# One notification per statement that created a task due now, carrying the earliest such run_at (epoch
# seconds): a transaction that committed long after it took `now()` created a task due further back
# than the scheduler's dispatch horizon (scheduler.horizons), which the scheduler then moves back.
# A CTE over `created` (the rows inserted, with run_at and created_at).
NOTIFY_DUE = f"""SELECT pg_notify('{DUE_CHANNEL}', extract(epoch FROM min(run_at))::text)
        FROM created WHERE run_at <= created_at HAVING count(*) > 0"""


def notified_due_at(payload: str) -> datetime | None:
    """The earliest run_at a NOTIFY_DUE notification carries; None for one without (an older sender)."""
    try:
        return datetime.fromtimestamp(float(payload), UTC)
    except (ValueError, OverflowError):
        return None


# Many tasks in one statement. A task whose idempotency key exists already is skipped (ON CONFLICT DO
# NOTHING waits for a concurrent insert of the same key to commit or roll back, then decides), and
# only the rows inserted get their 'created' event. The NOTIFY for a task due now rides in the same
# statement (`due`, joined so that it runs), which saves a round trip and lets a single task be
# created in autocommit mode.
CREATE_TASKS = f"""
    WITH input AS (
        SELECT * FROM jsonb_to_recordset(%(rows)s) AS r(
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
        {NOTIFY_DUE}
    )
    SELECT created.* FROM created LEFT JOIN due ON true
    """

TASKS_BY_IDEMPOTENCY_KEYS = "SELECT * FROM tasks WHERE idempotency_key = ANY(%(keys)s)"


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
    inserted: dict[str, RowMapping] = {}
    if rows:
        created = conn.exec_driver_sql(CREATE_TASKS, {"rows": Jsonb(rows)}).mappings()
        inserted = {str(row["id"]): row for row in created}
    taken = _not_inserted(ids, first_with_key, inserted)
    existing: dict[str, RowMapping] = {}
    if taken:
        found = conn.exec_driver_sql(TASKS_BY_IDEMPOTENCY_KEYS, {"keys": taken}).mappings()
        existing = {row["idempotency_key"]: row for row in found}
    return _results(specs, ids, first_with_key, inserted, existing)


async def create_tasks_async(conn: AsyncConn, specs: Sequence[NewTask]) -> list[CreateResult]:
    """`create_tasks` on a psycopg connection of the event loop (in a transaction, see
    `Database.run_transaction_async`); the rows are plain dicts."""
    rows, ids, first_with_key = _plan(specs)
    inserted: dict[str, dict[str, Any]] = {}
    if rows:
        cursor = await conn.execute(CREATE_TASKS, {"rows": Jsonb(rows)})
        inserted = {str(row["id"]): row for row in await cursor.fetchall()}
    taken = _not_inserted(ids, first_with_key, inserted)
    existing: dict[str, dict[str, Any]] = {}
    if taken:
        existing = await get_by_idempotency_keys_async(conn, taken)
    return _results(specs, ids, first_with_key, inserted, existing)


async def get_by_idempotency_keys_async(conn: AsyncConn, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The tasks holding these keys, by key (keys no task holds are left out)."""
    rows = await (await conn.execute(TASKS_BY_IDEMPOTENCY_KEYS, {"keys": list(keys)})).fetchall()
    return {row["idempotency_key"]: row for row in rows}


async def find_replays_async(conn: AsyncConn, requests: Iterable[tuple[str, str | None]]) -> dict[str, dict[str, Any]]:
    """The tasks that earlier requests created with these idempotency keys, by key, for requests
    given as (key, request_hash): a request sent again gets the task it created; a key that an
    earlier request with another hash used is an IdempotencyConflict."""
    requests = list(requests)
    existing = await get_by_idempotency_keys_async(conn, sorted({key for key, _ in requests}))
    return check_replays(requests, existing)


def find_replays(conn: Connection, requests: Iterable[tuple[str, str | None]]) -> dict[str, RowMapping]:
    """`find_replays_async` on a SQLAlchemy connection."""
    requests = list(requests)
    keys = sorted({key for key, _ in requests})
    found = conn.exec_driver_sql(TASKS_BY_IDEMPOTENCY_KEYS, {"keys": keys}).mappings()
    return check_replays(requests, {row["idempotency_key"]: row for row in found})


def check_replays(requests: Iterable[tuple[str, str | None]], existing: dict[str, Row]) -> dict[str, Row]:
    """`existing` (the tasks found by key), once each was found made from the same request."""
    for key, request_hash in requests:
        found = existing.get(key)
        if found is not None and found["request_hash"] != request_hash:
            raise IdempotencyConflict(key, found["id"])
    return existing


async def create_task_async(database: Database, spec: NewTask) -> dict[str, Any]:
    """Create one task without an idempotency key, from the event loop: one autocommit statement,
    one round trip (see `Database.run_statement_async`).

    Nothing else has to be atomic with it, so BEGIN/COMMIT and a ping per checkout would only add
    round trips. After a dead connection the statement is sent once more with the same id: if the
    first one did commit, the second meets its row in the primary key, and that row is the answer,
    so a retry never creates the task twice.
    """
    if spec.idempotency_key is not None:
        raise ValueError("a task with an idempotency key needs create_tasks, in a transaction")
    task_id = str(uuid.uuid4())
    params = {"rows": Jsonb([_insert_row(task_id, spec, 0)])}

    async def insert(conn: AsyncConn) -> dict[str, Any] | None:
        try:
            return await (await conn.execute(CREATE_TASKS, params)).fetchone()
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name != "tasks_pkey":
                raise
            return await (await conn.execute(GET_TASK, {"id": task_id})).fetchone()

    created = await database.run_statement_async(insert)
    assert created is not None
    _count_created([created])
    return created


# Runs a statement (with `%(name)s` parameters, JSON values given as JSON text) on a connection the
# caller owns, and returns its rows as dicts: see `store.caller`.
RunStatement = Callable[[str, dict[str, Any]], list[dict[str, Any]]]
RunStatementAsync = Callable[[str, dict[str, Any]], Awaitable[list[dict[str, Any]]]]


def _json_rows(rows: list[dict[str, Any]]) -> str:
    # JSON text, not Jsonb: every driver passes a string on for jsonb_to_recordset to read.
    return pydantic_core.to_json(rows).decode()


def create_tasks_with(run: RunStatement, specs: Sequence[NewTask]) -> list[CreateResult]:
    """`create_tasks` through `run`, on the caller's connection and in its transaction: the tasks
    exist, and the scheduler is notified, only once that transaction commits."""
    rows, ids, first_with_key = _plan(specs)
    inserted = {str(row["id"]): row for row in run(CREATE_TASKS, {"rows": _json_rows(rows)})} if rows else {}
    taken = _not_inserted(ids, first_with_key, inserted)
    existing = {row["idempotency_key"]: row for row in run(TASKS_BY_IDEMPOTENCY_KEYS, {"keys": taken})} if taken else {}
    return _results(specs, ids, first_with_key, inserted, existing)


async def create_tasks_with_async(run: RunStatementAsync, specs: Sequence[NewTask]) -> list[CreateResult]:
    """`create_tasks_with` for an async connection of the caller."""
    rows, ids, first_with_key = _plan(specs)
    inserted = {str(row["id"]): row for row in await run(CREATE_TASKS, {"rows": _json_rows(rows)})} if rows else {}
    taken = _not_inserted(ids, first_with_key, inserted)
    found = await run(TASKS_BY_IDEMPOTENCY_KEYS, {"keys": taken}) if taken else []
    return _results(specs, ids, first_with_key, inserted, {row["idempotency_key"]: row for row in found})


def find_replays_with(run: RunStatement, requests: Iterable[tuple[str, str | None]]) -> dict[str, dict[str, Any]]:
    """`find_replays` through `run`, on the caller's connection."""
    requests = list(requests)
    found = run(TASKS_BY_IDEMPOTENCY_KEYS, {"keys": sorted({key for key, _ in requests})})
    return check_replays(requests, {row["idempotency_key"]: row for row in found})


async def find_replays_with_async(
    run: RunStatementAsync, requests: Iterable[tuple[str, str | None]]
) -> dict[str, dict[str, Any]]:
    """`find_replays_with` for an async connection of the caller."""
    requests = list(requests)
    found = await run(TASKS_BY_IDEMPOTENCY_KEYS, {"keys": sorted({key for key, _ in requests})})
    return check_replays(requests, {row["idempotency_key"]: row for row in found})


def create_task_autocommit(database: Database, spec: NewTask) -> RowMapping:
    """`create_task_async` for a thread (the SDK's direct submit): one autocommit statement, sent
    once more with the same id after a dead connection."""
    if spec.idempotency_key is not None:
        raise ValueError("a task with an idempotency key needs create_tasks, in a transaction")
    task_id = str(uuid.uuid4())
    params = {"rows": Jsonb([_insert_row(task_id, spec, 0)])}

    def insert(conn: Connection) -> RowMapping:
        try:
            return conn.exec_driver_sql(CREATE_TASKS, params).mappings().one()
        except IntegrityError as exc:
            if not (
                isinstance(exc.orig, psycopg.errors.UniqueViolation) and exc.orig.diag.constraint_name == "tasks_pkey"
            ):
                raise
            return conn.exec_driver_sql(GET_TASK, {"id": task_id}).mappings().one()

    created = database.run_statement(insert)
    _count_created([created])
    return created


def create_task(conn: Connection, **fields: Any) -> RowMapping:
    """Create one task from the fields of a `NewTask` (see `create_tasks`); returns its row, or that
    of the task holding its key."""
    # The sync path's rows are SQLAlchemy's.
    return cast(RowMapping, create_tasks(conn, [NewTask(**fields)])[0].row)
