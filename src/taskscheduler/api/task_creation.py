"""Creating tasks: `POST /tasks` and `POST /tasks/batch`, on the event loop's own connections.

Both are async and run their statements on psycopg's async connections (`Database.run_*_async`): a
sync route costs a thread hop for each sync dependency, the endpoint and the response validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Header, Request, Response, status

from taskscheduler.api.deps import protected_router
from taskscheduler.api.errors import field_error, validation_error
from taskscheduler.api.schemas import IDEMPOTENCY_KEY_MAX, NoNul, TaskBatchCreate, TaskBatchOut, TaskCreate, TaskOut
from taskscheduler.config import Settings
from taskscheduler.store import creation
from taskscheduler.store.db import Database
from taskscheduler.store.statement_pool import AsyncConn
from taskscheduler.submission import check_new_task, new_task_spec

router = protected_router("tasks")


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=IDEMPOTENCY_KEY_MAX,
        description="The same as the body's `idempotency_key`; when both are given they must be equal.",
    ),
    NoNul,
]


def _task_response(row: Mapping[Any, Any], status_code: int) -> Response:
    # Validated once here; returning a Response keeps FastAPI from validating the model a second
    # time. response_model still documents the body.
    body = TaskOut.model_validate(dict(row)).model_dump_json()
    return Response(body, status_code=status_code, media_type="application/json")


# The answers besides a 201.
ONE_REPLAYED: dict[int | str, dict[str, Any]] = {
    200: {"description": "An earlier request with this idempotency key and the same body created the task.",
          "model": TaskOut},
    409: {"description": "The idempotency key was used before with a different request."},
}  # fmt: skip
BATCH_REPLAYED: dict[int | str, dict[str, Any]] = {
    200: {"description": "Every task already existed (found by its idempotency key).", "model": TaskBatchOut},
    409: {"description": "A task's idempotency key was used before with a different request."},
}


@router.post("/tasks", summary="Create a task", status_code=201, response_model=TaskOut, responses=ONE_REPLAYED)
async def create_task(
    request: Request,
    body: TaskCreate,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Create a task that runs `name` with `payload` at `run_at` (default now): 201 with the task.

    With an idempotency key (the `idempotency_key` field or the `Idempotency-Key` header), sending
    the same request again returns the task the first one created, with 200: safe to retry after a
    timeout. The same key with a different request is a 409.
    """
    # The hot route reads these from the app's state, not through dependencies: FastAPI inspects a
    # dependency override's signature on every request.
    settings: Settings = request.app.state.settings
    database: Database = request.app.state.database
    if idempotency_key is not None and body.idempotency_key not in (None, idempotency_key):
        message = "the Idempotency-Key header and the body's idempotency_key differ"
        raise validation_error([field_error(["header", "Idempotency-Key"], message)])
    key = idempotency_key or body.idempotency_key
    # Before the key's lookup: a typed task's payload (and so the request's hash) takes its model's form.
    errors = check_new_task(body, settings, ["body"])
    if key is None:
        if errors:
            raise validation_error(errors)
        # One statement with nothing to be atomic with: autocommit, one round trip.
        row = await creation.create_task_async(database, new_task_spec(body, None))
        return _task_response(row, status.HTTP_201_CREATED)

    async def create_keyed(conn: AsyncConn) -> tuple[Mapping[Any, Any], bool]:
        # A replay returns the first task even if its run_at has passed since.
        existing = (await creation.find_replays_async(conn, [(key, body.request_hash())])).get(key)
        if existing is not None:
            return existing, False
        if errors:
            raise validation_error(errors)
        (result,) = await creation.create_tasks_async(conn, [new_task_spec(body, key)])
        return result.row, result.created

    found, created = await database.run_transaction_async(create_keyed)
    return _task_response(found, status.HTTP_201_CREATED if created else status.HTTP_200_OK)


@router.post(
    "/tasks/batch", summary="Create up to 1,000 tasks at once", status_code=201, response_model=TaskBatchOut,
    responses=BATCH_REPLAYED,
)  # fmt: skip
async def create_tasks(
    request: Request,
    body: TaskBatchCreate,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Create up to 1,000 tasks in one transaction: all or none.

    Every task is checked as `POST /tasks` checks it before any is created; any error is a 422 that
    names each bad task by its index (`loc: ["body", "tasks", 3, "name"]`). Tasks may carry their
    own `idempotency_key`: those found (with the same request) are returned as they are, unchecked,
    as `POST /tasks` returns them, even if their run_at has passed since; `created` counts the new
    ones. A key found with a different request is a 409. 201, or 200 when every task already existed.
    """
    settings: Settings = request.app.state.settings
    database: Database = request.app.state.database
    if idempotency_key is not None:
        message = "a batch has no Idempotency-Key header: give each task its own idempotency_key"
        raise validation_error([field_error(["header", "Idempotency-Key"], message)])
    errors = {i: check_new_task(task, settings, ["body", "tasks", i]) for i, task in enumerate(body.tasks)}
    errors = {i: e for i, e in errors.items() if e}
    # Keys are looked up only when a task with one fails its checks: a replay of a batch sent
    # earlier must not be refused because its run_at has passed (or its handler has gone) since.
    keyed = {i: key for i in errors if (key := body.tasks[i].idempotency_key) is not None}
    if errors and not keyed:
        raise validation_error([e for i in sorted(errors) for e in errors[i]])
    specs = [new_task_spec(t, t.idempotency_key) for t in body.tasks]

    async def create(conn: AsyncConn) -> list[creation.CreateResult]:
        if keyed:
            existing = await creation.find_replays_async(
                conn, [(key, specs[i].request_hash) for i, key in keyed.items()]
            )
            still_bad = [e for i in sorted(errors) if keyed.get(i) not in existing for e in errors[i]]
            if still_bad:
                raise validation_error(still_bad)
        results = await creation.create_tasks_async(conn, specs)
        if any(results[i].created for i in keyed):
            # The task holding a replayed key was deleted (retention) between the lookup and the
            # insert: the unchecked task would have been created anew.
            raise creation.IdempotencyKeyInFlux(next(keyed[i] for i in keyed if results[i].created))
        return results

    results = await database.run_transaction_async(create)
    created = sum(r.created for r in results)
    # One validation of all the rows at once, and the JSON written by pydantic: per task, this is
    # most of the route's work.
    out = TaskBatchOut.model_validate({"tasks": [r.row for r in results], "created": created})
    return Response(
        out.model_dump_json(),
        status_code=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        media_type="application/json",
    )
