"""Tasks from Python on a real PostgreSQL: typed payloads checked at the API's door and the SDK's,
the SDK over HTTP and directly, and `submit(..., connection=...)` inside the caller's transaction."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session
from tests.harness import Services
from tests.helpers import dispatch_all, events, task_row, wait_until
from tests.integration.conftest import LiveApi

from taskscheduler import Client, SubmissionError, worker
from taskscheduler.sdk import IdempotencyConflict
from taskscheduler.store import creation, db
from taskscheduler.store.db import libpq_url

pytestmark = pytest.mark.usefixtures("settings", "typed_tasks")

# What a task's fields are, whichever way it was created (ids and times aside).
SAME = ("name", "payload", "priority", "queue", "status", "run_at", "max_retries", "timeout_sec", "attempt")


def _count(table: str = "tasks") -> int:
    with db.transaction() as conn:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())


def _detail(errors: list[dict[str, Any]]) -> list[tuple[list[Any], str, str]]:
    return [(e["loc"], e["msg"], e["type"]) for e in errors]


@pytest.fixture
def direct(services: Services) -> Iterator[Client]:
    with Client(database_url=services.database_url) as client:
        yield client


@pytest.fixture
def over_http(live_api: LiveApi) -> Iterator[Client]:
    with Client(live_api.url) as client:
        yield client


# --- the API's door ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "loc", "kind"),
    [
        ({"subject": "hi"}, ["body", "payload", "to"], "missing"),
        ({"to": 42}, ["body", "payload", "to"], "string_type"),
        ({"to": "a@b.c", "cc": "d@e.f"}, ["body", "payload", "cc"], "extra_forbidden"),
    ],
    ids=["missing", "wrong-type", "extra"],
)
def test_the_api_refuses_a_payload_that_breaks_the_model_and_stores_nothing(
    client: TestClient, payload: dict[str, Any], loc: list[str], kind: str
) -> None:
    response = client.post("/tasks", json={"name": "send_email", "payload": payload})
    assert response.status_code == 422, response.text
    assert [(e["loc"], e["type"]) for e in response.json()["detail"]] == [(loc, kind)]
    keyed = client.post("/tasks", json={"name": "send_email", "payload": payload, "idempotency_key": "k"})
    assert keyed.status_code == 422 and keyed.json()["detail"] == response.json()["detail"]
    assert _count() == 0 and _count("task_events") == 0


def test_the_batch_route_names_the_bad_item_and_creates_none(client: TestClient) -> None:
    tasks = [
        {"name": "send_email", "payload": {"to": "a@b.c"}},
        {"name": "send_email", "payload": {"to": 1}},
        {"name": "record_dict", "payload": {"anything": True}},
    ]
    response = client.post("/tasks/batch", json={"tasks": tasks})
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["detail"]] == [["body", "tasks", 1, "payload", "to"]]
    assert _count() == 0
    tasks[1]["payload"] = {"to": "d@e.f"}
    created = client.post("/tasks/batch", json={"tasks": tasks})
    assert created.status_code == 201, created.text
    assert [t["payload"].get("subject") for t in created.json()["tasks"]] == ["hello", "hello", None]


def test_the_api_gives_a_typed_task_its_defaults_and_its_model_s_form(client: TestClient) -> None:
    task = client.post("/tasks", json={"name": "send_email", "payload": {"to": "a@b.c"}}).json()
    assert (task["priority"], task["queue"], task["max_retries"]) == (7, "default", 5)
    assert task["payload"] == {"to": "a@b.c", "subject": "hello", "send_after": None}
    # What the request says wins over the task's defaults.
    explicit = client.post("/tasks", json={"name": "send_email", "payload": {"to": "a@b.c"}, "priority": 9}).json()
    assert (explicit["priority"], explicit["queue"], explicit["max_retries"]) == (9, "high", 5)


def test_the_schema_carries_each_typed_task_s_payload_and_still_validates(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    validate(schema, cls=OpenAPIV31SpecValidator)
    components = schema["components"]["schemas"]
    assert components["Email"]["properties"]["to"]["minLength"] == 3
    assert "Record" in components
    rules = {
        rule["if"]["properties"]["name"]["const"]: rule["then"]["properties"]["payload"]["$ref"]
        for rule in components["TaskCreate"]["allOf"]
    }
    assert rules == {"send_email": "#/components/schemas/Email", "record_typed": "#/components/schemas/Record"}
    assert "`send_email` takes `Email`" in components["TaskCreate"]["properties"]["payload"]["description"]


# --- the SDK: the same rules, the same tasks, over HTTP or directly ---------------------------------------------


BAD = [
    ({"to": 42}, {}),
    ({"to": "a@b.c"}, {"priority": 0}),
    ({"to": "a@b.c"}, {"run_at": "2030-01-01T00:00:00"}),
    ({"to": "a@b.c"}, {"run_at": (datetime.now(UTC) - timedelta(hours=2)).isoformat()}),
]


@pytest.mark.parametrize(("payload", "options"), BAD, ids=["payload", "priority", "naive-run_at", "past-run_at"])
def test_the_sdk_refuses_what_the_api_refuses_in_the_same_words(
    client: TestClient, direct: Client, payload: dict[str, Any], options: dict[str, Any]
) -> None:
    api = client.post("/tasks", json={"name": "send_email", "payload": payload, **options})
    assert api.status_code == 422
    with pytest.raises(SubmissionError) as raised:
        direct.submit("send_email", payload, **options)
    assert _detail(raised.value.errors) == _detail(api.json()["detail"])
    assert _count() == 0


def test_over_http_the_api_s_refusal_is_the_same_exception(over_http: Client) -> None:
    # A name this process does not know is for the API to judge.
    with pytest.raises(SubmissionError) as raised:
        over_http.submit("not_here", {})
    assert raised.value.errors[0]["loc"] == ["body", "name"]
    assert raised.value.errors[0]["msg"].startswith("unknown task name 'not_here'")


def test_over_http_and_directly_the_same_arguments_make_the_same_task(
    typed_tasks: ModuleType, direct: Client, over_http: Client
) -> None:
    run_at = datetime.now(UTC) + timedelta(hours=1)
    arguments: dict[str, Any] = {"run_at": run_at, "timeout_sec": 30}
    made = [
        client.submit(typed_tasks.send_email, typed_tasks.Email(to="a@b.c"), **arguments)
        for client in (direct, over_http)
    ]
    made.append(typed_tasks.send_email.submit({"to": "a@b.c"}, client=direct, **arguments))
    first, *others = (task.model_dump(include=set(SAME)) for task in made)
    assert all(other == first for other in others)
    assert first["payload"] == {"to": "a@b.c", "subject": "hello", "send_after": None}
    assert (first["priority"], first["max_retries"], first["run_at"]) == (7, 5, run_at)
    assert len({task.id for task in made}) == 3
    assert [task_row(task.id)["status"] for task in made] == ["PENDING"] * 3


def test_idempotency_keys_work_through_both(typed_tasks: ModuleType, direct: Client, over_http: Client) -> None:
    first = over_http.submit("send_email", {"to": "a@b.c"}, idempotency_key="order-42")
    again = direct.submit(typed_tasks.send_email, typed_tasks.Email(to="a@b.c"), idempotency_key="order-42")
    assert again.id == first.id
    assert over_http.submit("send_email", {"to": "a@b.c"}, idempotency_key="order-42").id == first.id
    for client in (direct, over_http):
        with pytest.raises(IdempotencyConflict, match="order-42"):
            client.submit("send_email", {"to": "x@y.z"}, idempotency_key="order-42")
    assert _count() == 1


def test_a_replayed_key_returns_its_task_even_after_its_run_at_passed(direct: Client) -> None:
    direct.settings = direct.settings.model_copy(update={"run_at_grace_sec": 0.0})
    run_at = datetime.now(UTC) + timedelta(seconds=0.2)
    first = direct.submit("record_dict", {"n": 1}, run_at=run_at, idempotency_key="late")
    wait_until(lambda: datetime.now(UTC) > run_at, timeout=5, what="run_at to pass")
    # Sent again (after a timeout, say): the task it made, as the API answers it.
    assert direct.submit("record_dict", {"n": 1}, run_at=run_at, idempotency_key="late").id == first.id
    with pytest.raises(SubmissionError, match="run_at is in the past"):
        direct.submit("record_dict", {"n": 1}, run_at=run_at, idempotency_key="never-used")
    assert _count() == 1


def test_a_direct_submit_sent_again_after_a_lost_reply_creates_one_task(services: Services) -> None:
    class SentTwice(db.Database):
        """As `run_statement` does after a connection died once the statement had committed."""

        def run_statement(self, statement: Callable[[Any], Any]) -> Any:
            with self.autocommit_engine.connect() as conn:
                statement(conn)
                return statement(conn)

    database = SentTwice(services.database_url)
    try:
        spec = creation.NewTask("record_dict", {}, 5, "default", None, 3, None)
        row = creation.create_task_autocommit(database, spec)
    finally:
        database.dispose()
    assert _count() == 1 and task_row(row["id"])["status"] == "PENDING"


def test_a_direct_submit_survives_a_database_restart(direct: Client) -> None:
    direct.submit("record_dict", {})
    with db.transaction() as conn:  # every other connection to the database dies, as in a restart
        conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    direct.submit("record_dict", {})
    assert _count() == 2


def test_the_async_variants(services: Services, live_api: LiveApi, typed_tasks: ModuleType) -> None:
    async def submit_all(direct: Client, over_http: Client) -> list[Any]:
        return [
            await direct.submit_async(typed_tasks.send_email, {"to": "a@b.c"}),
            await direct.submit_async("send_email", {"to": "a@b.c"}, idempotency_key="k"),
            await over_http.submit_async("send_email", {"to": "a@b.c"}, idempotency_key="k"),
            await over_http.submit_async(typed_tasks.send_email, {"to": "d@e.f"}, delay=60),
        ]

    direct, over_http = Client(database_url=services.database_url), Client(live_api.url)

    async def in_one_loop(close: bool) -> list[Any]:
        made = await submit_all(direct, over_http)
        if close:
            await direct.aclose()
            await over_http.aclose()
        return made

    made = asyncio.run(in_one_loop(close=True))
    # Another loop later (a script's second asyncio.run): the client opens its connections again.
    made += asyncio.run(in_one_loop(close=True))
    assert made[1].id == made[2].id == made[5].id == made[6].id
    assert made[3].run_at > datetime.now(UTC) + timedelta(seconds=50)
    assert _count() == 5
    with pytest.raises(SubmissionError):
        asyncio.run(Client(database_url=services.database_url).submit_async("send_email", {"to": 1}))


def test_a_typed_handler_gets_its_model_and_a_dict_handler_its_dict(direct: Client, tmp_path: Any) -> None:
    typed = direct.submit("send_email", {"to": "a@b.c", "send_after": "2030-01-01T00:00:00Z"})
    plain = direct.submit("record_dict", {"path": str(tmp_path / "lines"), "key": "k"})
    attempts = {item.id: item.attempt for item in dispatch_all()}
    assert worker.run_attempts([(typed.id, attempts[typed.id]), (plain.id, attempts[plain.id])]) == ["succeeded"] * 2
    assert task_row(typed.id)["result"] == {
        "type": "Email",
        "to": "a@b.c",
        "subject": "hello",
        "send_after": "datetime",
    }
    assert task_row(plain.id)["result"] == {"type": "dict"}


# --- in the caller's transaction --------------------------------------------------------------------------------


def _url(services: Services, driver: str) -> str:
    return services.database_url.replace("postgresql+psycopg://", f"postgresql+{driver}://")


@contextlib.contextmanager
def _sync_connection(kind: str, services: Services) -> Iterator[tuple[Any, Callable[[], None], Callable[[], None]]]:
    """A connection of `kind` in an open transaction, with its commit and rollback."""
    if kind == "psycopg":
        with psycopg.connect(libpq_url(services.database_url)) as pg:
            yield pg, pg.commit, pg.rollback
        return
    if kind == "psycopg2-dbapi":
        import psycopg2

        raw = psycopg2.connect(libpq_url(services.database_url))
        try:
            yield raw, raw.commit, raw.rollback
        finally:
            raw.close()
        return
    engine = create_engine(_url(services, "psycopg2" if kind.endswith("psycopg2") else "psycopg"))
    try:
        if kind == "session":
            with Session(engine) as session:
                yield session, session.commit, session.rollback
        else:
            with engine.connect() as conn:
                yield conn, conn.commit, conn.rollback
    finally:
        engine.dispose()


SYNC_KINDS = ["sqlalchemy-psycopg", "sqlalchemy-psycopg2", "session", "psycopg", "psycopg2-dbapi"]


@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_submit_in_a_transaction_commits_and_rolls_back_with_it(
    typed_tasks: ModuleType, services: Services, kind: str
) -> None:
    with _sync_connection(kind, services) as (conn, commit, rollback):
        dropped = typed_tasks.send_email.submit({"to": "rolled@back"}, connection=conn)
        assert dropped.status == "PENDING" and dropped.priority == 7
        assert _count() == 0, "visible before its transaction committed"
        rollback()
        kept = typed_tasks.send_email.submit({"to": "kept@x"}, connection=conn, idempotency_key="tx-1")
        assert typed_tasks.send_email.submit({"to": "kept@x"}, connection=conn, idempotency_key="tx-1").id == kept.id
        commit()
    assert _count() == 1 and _count("task_events") == 1
    assert task_row(kept.id)["payload"]["to"] == "kept@x"
    assert events(kept.id) == [(None, "PENDING", 0)]


@contextlib.asynccontextmanager
async def _async_connection(kind: str, services: Services) -> AsyncIterator[tuple[Any, Any, Any]]:
    if kind == "async-psycopg":
        async with await psycopg.AsyncConnection.connect(libpq_url(services.database_url)) as pg:
            yield pg, pg.commit, pg.rollback
        return
    engine = create_async_engine(_url(services, "asyncpg" if kind.endswith("asyncpg") else "psycopg"))
    try:
        if kind == "async-session":
            async with AsyncSession(engine) as session:
                yield session, session.commit, session.rollback
        else:
            async with engine.connect() as conn:
                yield conn, conn.commit, conn.rollback
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "kind", ["async-sqlalchemy-psycopg", "async-sqlalchemy-asyncpg", "async-session", "async-psycopg"]
)
def test_submit_async_in_a_transaction_commits_and_rolls_back_with_it(
    typed_tasks: ModuleType, services: Services, kind: str
) -> None:
    async def scenario() -> Any:
        async with _async_connection(kind, services) as (conn, commit, rollback):
            await typed_tasks.send_email.submit_async({"to": "rolled@back"}, connection=conn)
            await rollback()
            kept = await typed_tasks.send_email.submit_async({"to": "kept@x"}, connection=conn, idempotency_key="k")
            again = await typed_tasks.send_email.submit_async({"to": "kept@x"}, connection=conn, idempotency_key="k")
            assert again.id == kept.id
            with pytest.raises(SubmissionError):
                await typed_tasks.send_email.submit_async({"to": 1}, connection=conn)
            await commit()
            return kept

    kept = asyncio.run(scenario())
    assert _count() == 1 and events(kept.id) == [(None, "PENDING", 0)]
    assert task_row(kept.id)["payload"] == {"to": "kept@x", "subject": "hello", "send_after": None}


def test_submit_on_django_s_connection_in_an_atomic_block(typed_tasks: ModuleType, services: Services) -> None:
    import django
    from django.conf import settings as django_settings
    from sqlalchemy.engine import make_url

    url = make_url(services.database_url)
    database = {"ENGINE": "django.db.backends.postgresql", "NAME": url.database, "USER": url.username,
                "PASSWORD": url.password or "", "HOST": url.host, "PORT": str(url.port or 5432)}  # fmt: skip
    if not django_settings.configured:
        django_settings.configure(DATABASES={"default": database}, INSTALLED_APPS=[], USE_TZ=True)
        django.setup()
    from django.db import connection, transaction

    assert connection.settings_dict["NAME"] == url.database
    try:
        with pytest.raises(RuntimeError), transaction.atomic():
            typed_tasks.send_email.submit({"to": "rolled@back"}, connection=connection)
            raise RuntimeError("the order could not be saved")
        with transaction.atomic():
            kept = typed_tasks.send_email.submit({"to": "kept@x"}, connection=connection)
    finally:
        connection.close()
    assert _count() == 1 and task_row(kept.id)["payload"]["to"] == "kept@x"


def test_a_connection_of_the_wrong_kind_is_refused_before_anything(typed_tasks: ModuleType) -> None:
    with pytest.raises(TypeError, match=r"cannot submit on a builtins\.object"):
        typed_tasks.send_email.submit({"to": "a@b.c"}, connection=object())


def test_the_scheduler_is_notified_at_commit_and_cannot_dispatch_before(
    typed_tasks: ModuleType, services: Services
) -> None:
    with psycopg.connect(libpq_url(services.database_url), autocommit=True) as listener:
        listener.execute(f"LISTEN {creation.DUE_CHANNEL}")
        with _sync_connection("sqlalchemy-psycopg", services) as (conn, commit, rollback):
            typed_tasks.send_email.submit({"to": "never@x"}, connection=conn)
            rollback()
            assert list(listener.notifies(timeout=0.5)) == [], "a rolled-back task woke the scheduler"
            task = typed_tasks.send_email.submit({"to": "later@x"}, connection=conn)
            assert list(listener.notifies(timeout=0.5)) == [], "notified before the commit"
            assert dispatch_all() == [], "dispatched a task its transaction had not committed"
            commit()
            (note,) = list(listener.notifies(timeout=5, stop_after=1))
            assert note.channel == creation.DUE_CHANNEL
    assert [item.id for item in dispatch_all()] == [task.id]
