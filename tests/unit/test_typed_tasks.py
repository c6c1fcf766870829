"""Typed tasks without servers: what `@task` makes, what a handler is called with, and how a
submission is checked (the API's rules and messages) before it goes anywhere."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from taskscheduler import Client, SubmissionError, Task, handlers, sdk
from taskscheduler.config import Settings

pytestmark = pytest.mark.usefixtures("typed_tasks")


def _settings(**changes: Any) -> Settings:
    return Settings(**{"database_url": "", "redis_url": "", **changes})


def _refused(task: Any, payload: Any = None, **options: Any) -> list[dict[str, Any]]:
    with pytest.raises(SubmissionError) as raised:
        sdk.prepare(task, payload, sdk._options(**options), _settings(), local=True)
    return raised.value.errors


def test_task_returns_a_task_that_is_still_the_function(typed_tasks: ModuleType) -> None:
    send_email = typed_tasks.send_email
    assert isinstance(send_email, Task) and handlers.get_handler("send_email") is send_email
    assert send_email.__name__ == "send_email" and send_email.__wrapped__ is send_email.fn
    # Called directly, it is the plain function, with whatever it is given.
    assert send_email(typed_tasks.Email(to="a@b.c"))["to"] == "a@b.c"
    assert send_email.payload_model is typed_tasks.Email
    assert send_email.defaults() == {"priority": 7, "max_retries": 5}
    assert typed_tasks.record_dict.payload_model is None and typed_tasks.record_dict.defaults() == {}


class Point(BaseModel):
    x: int


def test_the_payload_model_is_read_from_the_annotation_even_as_a_string() -> None:
    class Local(BaseModel):
        n: int

    def typed(payload: Point) -> None: ...  # a string here (`from __future__ import annotations`)
    def untyped(payload: dict[str, Any]) -> None: ...
    def bare(payload) -> None: ...  # type: ignore[no-untyped-def]
    def local(payload: Local) -> None: ...

    assert handlers.payload_model(typed) is Point
    assert handlers.payload_model(untyped) is None
    assert handlers.payload_model(bare) is None
    assert handlers.payload_model(lambda payload: payload) is None
    # A string naming a class the function's module does not hold cannot be resolved: a dict then.
    assert handlers.payload_model(local) is None
    local.__annotations__["payload"] = Local  # as without `from __future__ import annotations`
    assert handlers.payload_model(local) is Local


@pytest.mark.parametrize(
    ("options", "message"),
    [({"priority": 11}, "priority must be 1-10"), ({"max_retries": -1}, "max_retries must be >= 0"),
     ({"timeout_sec": 0}, "timeout_sec must be > 0")],
)  # fmt: skip
def test_defaults_out_of_range_are_refused_at_import(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        handlers.task("bad_defaults", **options)(lambda payload: None)
    assert handlers.get_handler("bad_defaults") is None


def test_a_typed_handler_gets_its_model_read_as_json_and_a_dict_handler_a_dict(typed_tasks: ModuleType) -> None:
    # Stored JSON: a strict model still reads the datetime from its string.
    stored = {"to": "a@b.c", "subject": "hi", "send_after": "2030-01-01T00:00:00Z"}
    assert handlers.run(typed_tasks.send_email, stored) == {
        "type": "Email", "to": "a@b.c", "subject": "hi", "send_after": "datetime",
    }  # fmt: skip
    seen: list[Any] = []
    assert handlers.run(lambda payload: seen.append(payload), {"x": 1}) is None
    assert seen == [{"x": 1}]
    with pytest.raises(ValidationError):  # a payload the model refuses now fails the attempt
        handlers.run(typed_tasks.send_email, {"to": 5})


def test_a_model_returned_is_stored_as_json(typed_tasks: ModuleType) -> None:
    echo = handlers.Task("echo_model", lambda payload: payload)
    echo.payload_model = typed_tasks.Email
    assert handlers.run(echo, {"to": "a@b.c"}) == {"to": "a@b.c", "subject": "hello", "send_after": None}


# --- checked before it goes anywhere: the API's rules, in its words ----------------------------------------------


def test_a_payload_that_breaks_the_model_is_refused_with_loc_into_the_payload(typed_tasks: ModuleType) -> None:
    errors = _refused(typed_tasks.send_email, {"subject": 5, "cc": "x"})
    assert [(e["loc"], e["type"]) for e in errors] == [
        (["body", "payload", "to"], "missing"),
        (["body", "payload", "subject"], "string_type"),
        (["body", "payload", "cc"], "extra_forbidden"),
    ]
    assert str(_exc(typed_tasks.send_email, {"to": "ab"})) == "payload.to: String should have at least 3 characters"


def _exc(task: Any, payload: Any, **options: Any) -> SubmissionError:
    with pytest.raises(SubmissionError) as raised:
        sdk.prepare(task, payload, sdk._options(**options), _settings(), local=True)
    return raised.value


def test_the_model_instance_and_its_dict_make_the_same_request(typed_tasks: ModuleType) -> None:
    settings = _settings()
    by_model = sdk.prepare(typed_tasks.send_email, typed_tasks.Email(to="a@b.c"), sdk._options(), settings, local=True)
    by_dict = sdk.prepare("send_email", {"to": "a@b.c"}, sdk._options(), settings, local=True)
    for request in (by_model, by_dict):
        # The task's defaults, and the payload in its model's form.
        assert (request.task.priority, request.task.max_retries) == (7, 5)
        assert request.task.payload == {"to": "a@b.c", "subject": "hello", "send_after": None}
    assert by_model.task.request_hash() == by_dict.task.request_hash()


@pytest.mark.parametrize(
    ("options", "loc", "message"),
    [
        ({"priority": 11}, ["body", "priority"], "Input should be less than or equal to 10"),
        ({"priority": True}, ["body", "priority"], "Input should be a valid integer"),
        ({"run_at": datetime(2030, 1, 1)}, ["body", "run_at"], "Input should have timezone info"),
        ({"run_at": datetime.now(UTC) - timedelta(hours=1)}, ["body", "run_at"],
         "run_at is in the past (more than 60s ago)"),
        ({"run_at": datetime.now(UTC), "delay": 5}, ["body", "run_at"], "give run_at or delay, not both"),
        ({"idempotency_key": ""}, ["body", "idempotency_key"], "String should have at least 1 character"),
        ({"timeout_sec": -1}, ["body", "timeout_sec"], "Input should be greater than 0"),
    ],
)  # fmt: skip
def test_the_api_s_rules_apply(options: dict[str, Any], loc: list[str], message: str) -> None:
    (error,) = _refused("record_dict", {}, **options)
    assert (error["loc"], error["msg"]) == (loc, message)


def test_json_the_api_refuses_is_refused_with_its_message() -> None:
    (nan,) = _refused("record_dict", {"x": float("nan")})
    assert nan == {"loc": ["body"], "msg": "invalid JSON: NaN is not valid JSON", "type": "json_invalid"}
    (nul,) = _refused("record_dict", {"x": "a\x00b"})
    assert nul["msg"] == "invalid JSON: the NUL character (\\u0000) is not supported"
    (surrogate,) = _refused("record_dict", {"x": "\ud800"})
    assert "lone UTF-16 surrogates" in surrogate["msg"]
    (unserialisable,) = _refused("record_dict", {"x": object()})
    assert unserialisable["loc"] == ["body", "payload"] and "not JSON-serialisable" in unserialisable["msg"]


def test_a_request_over_max_body_bytes_is_refused() -> None:
    with pytest.raises(SubmissionError) as raised:
        sdk.prepare("record_dict", {"x": "y" * 2000}, sdk._options(), _settings(max_body_bytes=1024), local=True)
    assert raised.value.status_code == 413
    assert raised.value.errors[0]["msg"] == "request body over 1024 bytes"


def test_an_unknown_name_is_refused_here_only_when_stored_from_here() -> None:
    (error,) = _refused("no_such_task", {})
    assert error["loc"] == ["body", "name"] and error["msg"].startswith("unknown task name 'no_such_task'")
    # Over HTTP the API knows its own tasks: nothing to say here.
    request = sdk.prepare("no_such_task", {}, sdk._options(), _settings(), local=False)
    assert request.known is False and request.errors == []


def test_with_an_idempotency_key_the_checks_wait_for_the_replay_lookup(typed_tasks: ModuleType) -> None:
    # A request sent again after its run_at passed gets the task it made (as from the API).
    past = datetime.now(UTC) - timedelta(hours=1)
    request = sdk.prepare("record_dict", {}, sdk._options(run_at=past, idempotency_key="k"), _settings(), local=True)
    assert [e["loc"] for e in request.errors] == [["body", "run_at"]]
    with pytest.raises(SubmissionError):
        request.raise_errors()


def test_the_default_client_reads_the_url_else_the_database(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKSCHEDULER_URL", "http://api.example:8000")
    monkeypatch.setenv("TASKSCHEDULER_API_KEY", "k")
    client = Client(settings=_settings(database_url="postgresql://u@db/x"))
    assert (client.url, client.api_key, client.database) == ("http://api.example:8000", "k", None)
    monkeypatch.delenv("TASKSCHEDULER_URL")
    client = Client(settings=_settings(database_url="postgresql://u@db/x"))
    assert client.url is None and client.database is not None and client.database.describe_server() == "db:5432"
    with pytest.raises(sdk.ClientError, match="nowhere to submit to"):
        Client(settings=_settings())
    with pytest.raises(ValueError, match="not both"):
        Client("http://a", database_url="postgresql://u@db/x")
