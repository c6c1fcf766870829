"""The rules a task to create must meet, for the API (`POST /tasks`, `/tasks/batch`) and the Python
SDK alike, so that both refuse the same submissions with the same messages.

A request body is checked in the API's order: its size, strict JSON, the `TaskCreate` schema (types
and ranges), then what the schema cannot know (`check_new_task`): a registered name, a run_at not in
the past, and a typed task's payload against its model. Errors are dicts shaped like FastAPI's 422
entries (`loc`, `msg`, `type`), `loc` starting with "body".
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pydantic_core
from pydantic import ValidationError

from taskscheduler import handlers
from taskscheduler.api.body_guard import NotStrictJSON, parse_strict_json
from taskscheduler.api.schemas import TaskCreate
from taskscheduler.config import Settings
from taskscheduler.lifecycle import MAX_PRIORITY, MIN_PRIORITY, queue_for_priority
from taskscheduler.store import creation


class SubmissionError(ValueError):
    """The task was refused before anything was stored: `errors` lists why, as the API's 422 does
    (`{"loc": ["body", "payload", "to"], "msg": "Field required", "type": "missing"}`)."""

    def __init__(self, errors: list[dict[str, Any]], *, status_code: int = 422) -> None:
        super().__init__(describe(errors))
        self.errors = errors
        self.status_code = status_code


def describe(errors: list[dict[str, Any]]) -> str:
    """`payload.to: Field required; priority: ...`, the way the CLI words an API's 422."""
    parts = []
    for error in errors:
        loc = ".".join(str(p) for p in error.get("loc", []) if p not in ("body", "header"))
        parts.append(f"{loc}: {error.get('msg')}" if loc else str(error.get("msg")))
    return "; ".join(parts)


def field_error(loc: list[str | int], message: str) -> dict[str, Any]:
    return {"loc": loc, "msg": message, "type": "value_error"}


def unknown_task(loc: list[str | int], name: str) -> dict[str, Any]:
    """The error of a task name no handler is registered under (a task's `name`, a schedule's `task`)."""
    return field_error(loc, f"unknown task name {name!r}; registered: {', '.join(handlers.registered_names())}")


def pydantic_errors(exc: ValidationError, loc: list[str | int]) -> list[dict[str, Any]]:
    """A ValidationError's entries under `loc`, as the API words them."""
    return [{"loc": [*loc, *error["loc"]], "msg": error["msg"], "type": error["type"]} for error in exc.errors()]


def parse_request(body: bytes, *, max_body_bytes: int) -> TaskCreate:
    """The `TaskCreate` in a request body, checked as the API checks `POST /tasks` before its route
    runs (BodyGuard's size and strict JSON, then the schema); SubmissionError otherwise."""
    if len(body) > max_body_bytes:
        raise SubmissionError([field_error(["body"], f"request body over {max_body_bytes} bytes")], status_code=413)
    try:
        document = parse_strict_json(body)
    except NotStrictJSON as exc:
        raise SubmissionError([{"loc": ["body"], "msg": f"invalid JSON: {exc}", "type": "json_invalid"}]) from None
    try:
        return TaskCreate.model_validate(document)
    except ValidationError as exc:
        raise SubmissionError(pydantic_errors(exc, ["body"])) from None


def check_new_task(body: TaskCreate, settings: Settings, loc: list[str | int]) -> list[dict[str, Any]]:
    """What the schema cannot check about a task to create: a registered name, a run_at not in the
    past, and a typed task's payload against its model.

    A typed task's fields left out of the request take its defaults (`@task(priority=...)`), and its
    payload becomes the model's JSON form (defaults filled in), so that two requests meaning the
    same task store, and hash, the same.
    """
    errors = []
    handler = handlers.get_handler(body.name)
    if handler is None:
        errors.append(unknown_task([*loc, "name"], body.name))
    elif isinstance(handler, handlers.Task):
        errors += _apply_task(body, handler, loc)
    if body.run_at is not None:
        earliest = datetime.now(UTC) - timedelta(seconds=settings.run_at_grace_sec)
        if body.run_at < earliest:
            message = f"run_at is in the past (more than {settings.run_at_grace_sec:g}s ago)"
            errors.append(field_error([*loc, "run_at"], message))
    return errors


def _apply_task(body: TaskCreate, task: handlers.Task[Any, Any], loc: list[str | int]) -> list[dict[str, Any]]:
    for field, value in task.defaults().items():
        if field not in body.model_fields_set:
            setattr(body, field, value)
    if task.payload_model is None:
        return []
    try:
        # As JSON, the form the payload arrives and is stored in (a strict model takes a date from its string).
        value = task.payload_model.model_validate_json(pydantic_core.to_json(body.payload))
    except ValidationError as exc:
        return pydantic_errors(exc, [*loc, "payload"])
    body.payload = value.model_dump(mode="json", by_alias=True)
    return []


# The schema has checked the range; a lookup per task instead of an enum's `.value`.
_QUEUE_OF_PRIORITY = {p: queue_for_priority(p).value for p in range(MIN_PRIORITY, MAX_PRIORITY + 1)}


def new_task_spec(body: TaskCreate, idempotency_key: str | None) -> creation.NewTask:
    return creation.NewTask(
        name=body.name,
        payload=body.payload,
        priority=body.priority,
        queue=_QUEUE_OF_PRIORITY[body.priority],
        run_at=body.run_at,
        max_retries=body.max_retries,
        timeout_sec=body.timeout_sec,
        idempotency_key=idempotency_key,
        request_hash=None if idempotency_key is None else body.request_hash(),
    )
