"""Creating tasks from Python: `send_email.submit(...)`, `Client(...).submit("send_email", ...)`, and
`submit(..., connection=conn)` inside the application's own transaction.

    @task("send_email", priority=7)
    def send_email(payload: Email) -> dict: ...

    send_email.submit(Email(to="a@b.c"), delay=timedelta(minutes=5), idempotency_key="order-42")
    with engine.begin() as conn:            # committed or rolled back with the application's work
        conn.execute(insert(orders), ...)
        send_email.submit({"to": "a@b.c"}, connection=conn)

A submission is checked as the API checks `POST /tasks` (`taskscheduler.submission`: size, strict
JSON, the schema, the name, run_at, a typed task's payload against its model), with the same
messages, and refused with a SubmissionError before anything is stored. It then goes where the
client points: `Client(url=...)` posts it to the API, `Client(database_url=...)` runs the API's own
statement on the database, and `connection=` runs that statement on the caller's connection. The
default client reads TASKSCHEDULER_URL (and TASKSCHEDULER_API_KEY), else DATABASE_URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pydantic_core
from pydantic import BaseModel

from taskscheduler import handlers
from taskscheduler.api.schemas import TaskCreate, TaskOut
from taskscheduler.client import ClientError
from taskscheduler.config import Settings, get_settings
from taskscheduler.store import caller, creation
from taskscheduler.store.creation import IdempotencyConflict
from taskscheduler.submission import SubmissionError, check_new_task, field_error, new_task_spec, parse_request

if TYPE_CHECKING:
    from taskscheduler.client import ApiClient, AsyncApiClient
    from taskscheduler.store.db import Database
    from taskscheduler.store.statement_pool import AsyncConn

__all__ = ["Client", "IdempotencyConflict", "SubmissionError", "TaskOut", "default_client", "submit", "submit_async"]

TaskRef = str | handlers.Task[Any, Any]
Payload = BaseModel | Mapping[str, Any] | None


@dataclass
class _Request:
    """A submission, checked: the JSON document `POST /tasks` would get, and what it says."""

    body: bytes
    task: TaskCreate
    known: bool  # checked here against a registered handler (else only the API can tell)
    errors: list[dict[str, Any]]

    @property
    def key(self) -> str | None:
        return self.task.idempotency_key

    def raise_errors(self) -> None:
        if self.errors:
            raise SubmissionError(self.errors)


def _json_default(value: Any) -> Any:
    # Dates, UUIDs, decimals, enums, sets... as pydantic writes them; what it cannot write is an error.
    return pydantic_core.to_jsonable_python(value)


def _body(task: TaskRef, payload: Payload, options: dict[str, Any]) -> bytes:
    """The JSON document of `POST /tasks` for these arguments (fields left out take the defaults)."""
    name = task.name if isinstance(task, handlers.Task) else task
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json", by_alias=True)
    elif isinstance(payload, Mapping):
        payload = dict(payload)
    run_at, delay = options.pop("run_at", None), options.pop("delay", None)
    if run_at is not None and delay is not None:
        raise SubmissionError([field_error(["body", "run_at"], "give run_at or delay, not both")])
    if delay is not None:
        delay = delay if isinstance(delay, timedelta) else timedelta(seconds=delay)
        run_at = datetime.now(UTC) + delay
    if isinstance(run_at, datetime):
        run_at = run_at.isoformat()  # without an offset it is refused, as the API refuses it
    body = {"name": name, "payload": {} if payload is None else payload, "run_at": run_at, **options}
    try:
        # As httpx would send it: NaN, NUL and lone surrogates are written out for the checks to refuse.
        return json.dumps({k: v for k, v in body.items() if v is not None}, default=_json_default).encode()
    except (TypeError, ValueError, pydantic_core.PydanticSerializationError) as exc:
        raise SubmissionError([field_error(["body", "payload"], f"not JSON-serialisable: {exc}")]) from None


def prepare(task: TaskRef, payload: Payload, options: dict[str, Any], settings: Settings, *, local: bool) -> _Request:
    """Check a submission as the API would. `local`: it is stored from here, so the name must be
    registered in this process (TASK_MODULES, or the module that defines it imported); over HTTP
    the API checks what this process does not know. Errors of the schema are raised at once; the
    others are left in `errors` to raise after a replay of its idempotency key was looked for."""
    body = _body(task, payload, dict(options))
    parsed = parse_request(body, max_body_bytes=settings.max_body_bytes)
    known = local or handlers.get_handler(parsed.name) is not None
    request = _Request(body, parsed, known, check_new_task(parsed, settings, ["body"]) if known else [])
    if request.key is None:
        request.raise_errors()
    return request


class Client:
    """Where submissions go: the API over HTTP (`url`, `api_key`) or the database (`database_url`).

    With neither, TASKSCHEDULER_URL and TASKSCHEDULER_API_KEY, else DATABASE_URL. A database client
    imports TASK_MODULES, as the API does, to know the tasks it is asked for by name.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        database_url: str | None = None,
        settings: Settings | None = None,
        pool_size: int = 4,
        timeout: float = 30.0,
    ) -> None:
        if url is not None and database_url is not None:
            raise ValueError("give url or database_url, not both")
        self.settings = settings or get_settings()
        if url is None and database_url is None:
            url = os.environ.get("TASKSCHEDULER_URL") or None
            api_key = api_key or os.environ.get("TASKSCHEDULER_API_KEY") or None
            database_url = None if url else (self.settings.database_url or None)
            if url is None and database_url is None:
                raise ClientError(
                    "nowhere to submit to: set TASKSCHEDULER_URL (and TASKSCHEDULER_API_KEY) or DATABASE_URL,"
                    " or make a Client(url=...) or Client(database_url=...)"
                )
        self.url, self.api_key, self.timeout = url, api_key, timeout
        self.database: Database | None = None
        if database_url is not None:
            from taskscheduler.store.db import Database

            handlers.load_task_modules(self.settings.task_module_list)
            self.database = Database(database_url, pool_size=pool_size, max_overflow=pool_size)
        self._http: ApiClient | None = None
        # An event loop's connections serve that loop only: the loop they were opened on.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_http: AsyncApiClient | None = None

    def __repr__(self) -> str:
        return f"Client(url={self.url!r})" if self.url else f"Client({self.database!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.database is not None:
            self.database.dispose()

    async def aclose(self) -> None:
        """Close the connections of the event loop they were made on (and `close()` the others)."""
        if self._loop is asyncio.get_running_loop():
            if self._async_http is not None:
                await self._async_http.aclose()
            if self.database is not None:
                await self.database.close_statement_pool()
        self._forget_loop()
        self.close()

    def _forget_loop(self) -> None:
        # Connections of a loop that is gone cannot be closed from another: they are dropped.
        self._loop, self._async_http = None, None
        if self.database is not None:
            self.database.statement_pool = None

    # --- submitting ----------------------------------------------------------------------------------------------

    def submit(
        self,
        task: TaskRef,
        payload: Payload = None,
        *,
        run_at: datetime | str | None = None,
        delay: timedelta | float | None = None,
        priority: int | None = None,
        max_retries: int | None = None,
        timeout_sec: float | None = None,
        idempotency_key: str | None = None,
        connection: Any = None,
    ) -> TaskOut:
        """Create a task of `task` (a name, or a `@task`) with `payload` (a dict, or its model);
        returns it. `run_at` (an aware datetime or ISO 8601 with an offset) or `delay` (a timedelta
        or seconds) from now; left out, the task's defaults (`@task(priority=...)`), else the API's.
        The same `idempotency_key` with the same request returns the first task; with another,
        IdempotencyConflict. `connection`: create it in that transaction (see `store.caller`).
        Refused before anything is stored: SubmissionError, with the API's errors."""
        options = _options(run_at, delay, priority, max_retries, timeout_sec, idempotency_key)
        if connection is not None:
            return _submit_on(connection, task, payload, options, self.settings)
        request = prepare(task, payload, options, self.settings, local=self.database is not None)
        if self.database is None:
            return _task_out(_over_http(request, lambda: self._api().submit(request.body)))
        return _task_out(_create_in(self.database, request))

    async def submit_async(
        self,
        task: TaskRef,
        payload: Payload = None,
        *,
        run_at: datetime | str | None = None,
        delay: timedelta | float | None = None,
        priority: int | None = None,
        max_retries: int | None = None,
        timeout_sec: float | None = None,
        idempotency_key: str | None = None,
        connection: Any = None,
    ) -> TaskOut:
        """`submit` for asyncio; `connection` is then an async one (SQLAlchemy's AsyncConnection or
        AsyncSession, psycopg's AsyncConnection)."""
        options = _options(run_at, delay, priority, max_retries, timeout_sec, idempotency_key)
        if connection is not None:
            return await _submit_on_async(connection, task, payload, options, self.settings)
        request = prepare(task, payload, options, self.settings, local=self.database is not None)
        on_loop = await self._on_this_loop()
        if self.database is None:
            if on_loop:
                return _task_out(await _over_http_async(request, self._async_api()))
            from taskscheduler.client import AsyncApiClient

            async with contextlib.aclosing(
                AsyncApiClient(self._require_url(), self.api_key, timeout=self.timeout)
            ) as own:
                return _task_out(await _over_http_async(request, own))
        if on_loop:
            return _task_out(await _create_in_async(self.database, request))
        from taskscheduler.store.db import Database

        # Without a pool: a connection of its own per statement.
        return _task_out(await _create_in_async(Database(self.database.url), request))

    # --- connections ----------------------------------------------------------------------------------------------

    def _require_url(self) -> str:
        assert self.url is not None
        return self.url

    def _api(self) -> ApiClient:
        if self._http is None:
            from taskscheduler.client import ApiClient

            self._http = ApiClient(self._require_url(), self.api_key, timeout=self.timeout)
        return self._http

    def _async_api(self) -> AsyncApiClient:
        if self._async_http is None:
            from taskscheduler.client import AsyncApiClient

            self._async_http = AsyncApiClient(self._require_url(), self.api_key, timeout=self.timeout)
        return self._async_http

    async def _on_this_loop(self) -> bool:
        """Whether this event loop may use the client's loop-bound connections: those are made on
        the first loop that submits (again once that loop has closed, as after `asyncio.run`); a
        second loop running meanwhile opens connections of its own per call instead."""
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop.is_closed():  # the first loop, or one after the last has ended
            self._forget_loop()
            self._loop = loop
            if self.database is not None:
                await self.database.open_statement_pool(size=self.database.pool_size)
        return self._loop is loop


def _options(
    run_at: datetime | str | None = None,
    delay: timedelta | float | None = None,
    priority: int | None = None,
    max_retries: int | None = None,
    timeout_sec: float | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    return {
        "run_at": run_at, "delay": delay, "priority": priority, "max_retries": max_retries,
        "timeout_sec": timeout_sec, "idempotency_key": idempotency_key,
    }  # fmt: skip


def _task_out(row: Mapping[Any, Any]) -> TaskOut:
    return TaskOut.model_validate(dict(row))


# --- where a submission goes ------------------------------------------------------------------------------------


def _create_in(database: Database, request: _Request) -> Mapping[Any, Any]:
    """The API's `POST /tasks`, run here: one autocommit statement, or with a key, a transaction
    that returns the task an earlier request with it created."""
    key = request.key
    if key is None:
        return creation.create_task_autocommit(database, new_task_spec(request.task, None))
    with database.transaction() as conn:
        existing = creation.find_replays(conn, [(key, request.task.request_hash())]).get(key)
        if existing is not None:
            return existing
        request.raise_errors()
        (result,) = creation.create_tasks(conn, [new_task_spec(request.task, key)])
        return result.row


async def _create_in_async(database: Database, request: _Request) -> Mapping[Any, Any]:
    key = request.key
    if key is None:
        return await creation.create_task_async(database, new_task_spec(request.task, None))

    async def create_keyed(conn: AsyncConn) -> Mapping[Any, Any]:
        existing = (await creation.find_replays_async(conn, [(key, request.task.request_hash())])).get(key)
        if existing is not None:
            return existing
        request.raise_errors()
        (result,) = await creation.create_tasks_async(conn, [new_task_spec(request.task, key)])
        return result.row

    return await database.run_transaction_async(create_keyed)


def _submit_on(
    connection: Any, task: TaskRef, payload: Payload, options: dict[str, Any], settings: Settings
) -> TaskOut:
    run = caller.statement_runner(connection)
    request = prepare(task, payload, options, settings, local=True)
    key = request.key
    if key is not None:
        existing = creation.find_replays_with(run, [(key, request.task.request_hash())]).get(key)
        if existing is not None:
            return _task_out(existing)
        request.raise_errors()
    (result,) = creation.create_tasks_with(run, [new_task_spec(request.task, key)])
    return _task_out(result.row)


async def _submit_on_async(
    connection: Any, task: TaskRef, payload: Payload, options: dict[str, Any], settings: Settings
) -> TaskOut:
    run = caller.async_statement_runner(connection)
    request = prepare(task, payload, options, settings, local=True)
    key = request.key
    if key is not None:
        existing = (await creation.find_replays_with_async(run, [(key, request.task.request_hash())])).get(key)
        if existing is not None:
            return _task_out(existing)
        request.raise_errors()
    (result,) = await creation.create_tasks_with_async(run, [new_task_spec(request.task, key)])
    return _task_out(result.row)


def _refused(exc: ClientError, request: _Request) -> Exception:
    """The API's refusal as the exception a local check raises for the same reason."""
    if exc.status_code in (413, 422):
        detail = exc.detail
        errors = detail if isinstance(detail, list) else [field_error(["body"], str(detail))]
        return SubmissionError(errors, status_code=exc.status_code)
    if exc.status_code == 409 and request.key is not None:
        return IdempotencyConflict(request.key, None, message=str(exc.detail))
    return exc


def _over_http(request: _Request, send: Any) -> Any:
    try:
        return send()
    except ClientError as exc:
        raise _refused(exc, request) from None


async def _over_http_async(request: _Request, api: AsyncApiClient) -> Any:
    try:
        return await api.submit(request.body)
    except ClientError as exc:
        raise _refused(exc, request) from None


# --- the default client -----------------------------------------------------------------------------------------

_default: Client | None = None


def default_client() -> Client:
    """The client of `Task.submit` without `client=`: TASKSCHEDULER_URL / TASKSCHEDULER_API_KEY,
    else DATABASE_URL; made on first use."""
    global _default
    if _default is None:
        _default = Client()
    return _default


def submit(task: TaskRef, payload: Payload = None, *, client: Client | None = None, **options: Any) -> TaskOut:
    """`client.submit(task, payload, **options)` (default: `default_client()`). With `connection=`,
    no client is needed: the task is created on that connection."""
    if client is None and options.get("connection") is not None:
        connection = options.pop("connection")
        return _submit_on(connection, task, payload, _options(**options), get_settings())
    return (client or default_client()).submit(task, payload, **options)


async def submit_async(
    task: TaskRef, payload: Payload = None, *, client: Client | None = None, **options: Any
) -> TaskOut:
    """`submit` for asyncio."""
    if client is None and options.get("connection") is not None:
        connection = options.pop("connection")
        return await _submit_on_async(connection, task, payload, _options(**options), get_settings())
    return await (client or default_client()).submit_async(task, payload, **options)
