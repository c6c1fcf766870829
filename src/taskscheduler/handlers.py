"""The handler registry, and the built-in demo handlers.

A handler is a plain function of the payload, registered under a name:

    from taskscheduler.handlers import task

    @task("send_email")
    def send_email(payload: dict) -> dict: ...

Its JSON-serialisable return value is stored as the task's `result`; an exception fails the attempt.
A payload annotated with a pydantic model (`payload: Email`) is checked against it at submission,
and the worker passes the validated model. `task` returns a `Task`: still the function when called,
with `.submit` / `.submit_async` to create tasks of it (see `taskscheduler.sdk`).
Modules with handlers are listed in `TASK_MODULES` and imported by the API (to validate names) and
the workers (to run them).

The same modules may declare recurring schedules, which the scheduler upserts at start (by name):

    schedule("nightly-report", task="send_report", cron="0 3 * * *", timezone="Europe/Berlin")
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import time
import typing
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import pydantic_core
from pydantic import BaseModel

from taskscheduler.lifecycle import MAX_PRIORITY, MIN_PRIORITY
from taskscheduler.schedule_spec import Overlap, Spec

if TYPE_CHECKING:
    from taskscheduler.api.schemas import TaskOut

Handler = Callable[[Any], Any]
P = TypeVar("P")
R = TypeVar("R")

_registry: dict[str, Handler] = {}

# The attempt being run (counted from the last replay), for handlers that care; set by the worker.
current_attempt: ContextVar[int] = ContextVar("current_attempt", default=1)


class HandlerError(Exception):
    """A handler raised: the attempt failed."""


class Task(Generic[P, R]):
    """A registered handler: called, it is the function; `submit` creates a task that runs it.

    `payload_model` is the pydantic model its payload parameter is annotated with (None: a dict);
    `priority`, `max_retries` and `timeout_sec` are the defaults of its submissions (None: the API's).
    """

    def __init__(
        self,
        name: str,
        fn: Callable[[P], R],
        *,
        priority: int | None = None,
        max_retries: int | None = None,
        timeout_sec: float | None = None,
    ) -> None:
        if priority is not None and not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise ValueError(f"task {name!r}: priority must be {MIN_PRIORITY}-{MAX_PRIORITY}, got {priority}")
        if max_retries is not None and max_retries < 0:
            raise ValueError(f"task {name!r}: max_retries must be >= 0, got {max_retries}")
        if timeout_sec is not None and not timeout_sec > 0:
            raise ValueError(f"task {name!r}: timeout_sec must be > 0, got {timeout_sec}")
        self.name = name
        self.fn = fn
        self.payload_model = payload_model(fn)
        self.priority = priority
        self.max_retries = max_retries
        self.timeout_sec = timeout_sec
        functools.update_wrapper(self, fn)

    def __call__(self, payload: P) -> R:
        return self.fn(payload)

    def __repr__(self) -> str:
        return f"<Task {self.name!r} of {self.fn.__module__}.{self.fn.__qualname__}>"

    def defaults(self) -> dict[str, Any]:
        """The submission fields this task sets a default for."""
        fields = {"priority": self.priority, "max_retries": self.max_retries, "timeout_sec": self.timeout_sec}
        return {k: v for k, v in fields.items() if v is not None}

    def submit(self, payload: P | Mapping[str, Any] | None = None, **options: Any) -> TaskOut:
        """Create a task of this handler; see `taskscheduler.sdk.Client.submit` for the options
        (and `connection=` to create it in your own transaction)."""
        from taskscheduler import sdk

        return sdk.submit(self, payload, **options)  # type: ignore[arg-type]  # P is a model or a dict

    async def submit_async(self, payload: P | Mapping[str, Any] | None = None, **options: Any) -> TaskOut:
        """`submit` for asyncio."""
        from taskscheduler import sdk

        return await sdk.submit_async(self, payload, **options)  # type: ignore[arg-type]


def payload_model(fn: Callable[..., Any]) -> type[BaseModel] | None:
    """The pydantic model `fn`'s first parameter is annotated with, if any."""
    try:
        first = next(iter(inspect.signature(fn).parameters.values()), None)
    except (TypeError, ValueError):  # a callable without a signature: takes the dict
        return None
    if first is None:
        return None
    annotation = first.annotation
    if isinstance(annotation, str):
        # `from __future__ import annotations`: resolved in the function's module. One that does
        # not resolve there (a name defined inside a function) cannot be a model we could find.
        try:
            annotation = typing.get_type_hints(fn).get(first.name)
        except Exception:  # any error evaluating someone else's annotation means "not a model"
            return None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def run(handler: Handler, payload: dict[str, Any]) -> Any:
    """Call `handler` with a stored payload: a typed task's validated into its model, else the dict.

    The payload was checked when it was submitted; it is checked again here since the model may have
    changed since (a payload it refuses now fails the attempt, saying why). It is read as JSON, the
    form it was stored in, so that a strict model takes dates and UUIDs from their strings. A model
    returned is stored as its JSON form.
    """
    model = handler.payload_model if isinstance(handler, Task) else None
    argument = payload if model is None else model.model_validate_json(pydantic_core.to_json(payload))
    result = handler(argument)
    return result.model_dump(mode="json") if isinstance(result, BaseModel) else result


def task(
    name: str, *, priority: int | None = None, max_retries: int | None = None, timeout_sec: float | None = None
) -> Callable[[Callable[[P], R]], Task[P, R]]:
    """Register `fn` as the handler for tasks called `name`; the keywords are the defaults of its
    submissions (from `submit`, the API and the CLI alike)."""
    if not name or len(name) > 200:
        raise ValueError("a handler name must be 1-200 characters")

    def register(fn: Callable[[P], R]) -> Task[P, R]:
        existing = _registry.get(name)
        if existing is not None and existing is not fn and getattr(existing, "fn", None) is not fn:
            raise ValueError(f"handler {name!r} is registered twice ({existing.__module__} and {fn.__module__})")
        registered = Task(name, fn, priority=priority, max_retries=max_retries, timeout_sec=timeout_sec)
        _registry[name] = registered
        return registered

    return register


def get_handler(name: str) -> Handler | None:
    return _registry.get(name)


def registered_names() -> list[str]:
    return sorted(_registry)


@dataclass(frozen=True)
class ScheduleDeclaration:
    """A schedule declared in code (see `schedule`)."""

    name: str
    task: str
    cron: str | None = None
    every_sec: int | None = None
    timezone: str = "UTC"
    payload: dict[str, Any] = field(default_factory=dict)
    priority: int = 5
    max_retries: int = 3
    timeout_sec: float | None = None
    start_at: datetime | None = None
    end_at: datetime | None = None
    jitter_sec: float = 0.0
    overlap: Overlap = Overlap.SKIP
    catchup_window_sec: float = 300.0

    def fields(self) -> dict[str, Any]:
        """The schedule's settable fields, as the store takes them."""
        spec = Spec(self.cron, self.every_sec, self.timezone, self.start_at, self.end_at)
        return {
            "name": self.name,
            "task": self.task,
            "payload": self.payload,
            "priority": self.priority,
            "max_retries": self.max_retries,
            "timeout_sec": self.timeout_sec,
            "cron": spec.cron,
            "every_sec": self.every_sec,
            "timezone": self.timezone,
            "start_at": self.start_at,
            "end_at": self.end_at,
            "jitter_sec": self.jitter_sec,
            "overlap": self.overlap.value,
            "catchup_window_sec": self.catchup_window_sec,
        }


_schedules: dict[str, ScheduleDeclaration] = {}


def schedule(name: str, *, task: str, cron: str | None = None, every_sec: int | None = None, **options: Any) -> None:
    """Declare a recurring schedule of `task` (by its handler name): `cron` (5 fields or an alias such
    as `@hourly`) or `every_sec`, and the options of `POST /schedules` (`timezone`, `payload`,
    `priority`, `overlap`, `catchup_window_sec`, ...). The scheduler upserts it by name at start; one
    removed from the code is paused there, not deleted. A bad declaration raises here, at import."""
    if "overlap" in options:
        options["overlap"] = Overlap(options["overlap"])
    declared = ScheduleDeclaration(name=name, task=task, cron=cron, every_sec=every_sec, **options)
    declared.fields()  # checks the spec
    if not 1 <= len(name) <= 200 or not 1 <= declared.priority <= 10:
        raise ValueError("a schedule's name must be 1-200 characters and its priority 1-10")
    existing = _schedules.get(name)
    if existing is not None and existing != declared:
        raise ValueError(f"schedule {name!r} is declared twice, differently")
    _schedules[name] = declared


def declared_schedules() -> list[ScheduleDeclaration]:
    return [_schedules[name] for name in sorted(_schedules)]


def load_task_modules(modules: list[str]) -> None:
    """Import the user's handler modules; a bad name is a clear startup error, not a silent gap.

    The working directory comes first on `sys.path`, as under `python -m` and `celery -A`: the
    console script `taskscheduler` otherwise sees only its own directory, so `myapp/` next to the
    user would import under `dev` (whose children run with `python -m`) and nowhere else. Celery's
    pool processes fork after this and inherit both the path and the imported modules.
    """
    if modules:
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.insert(0, cwd)
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise RuntimeError(
                f"TASK_MODULES: cannot import {module!r} (looked in the working directory {os.getcwd()}"
                f" and the installed packages): {exc}"
            ) from exc


@task("demo_ok")
def demo_ok(payload: dict[str, Any]) -> dict[str, Any]:
    """Returns its payload."""
    return payload


@task("demo_fail")
def demo_fail(payload: dict[str, Any]) -> dict[str, Any]:
    """Raises when `payload.fail` is true."""
    if payload.get("fail"):
        raise HandlerError("demo_fail: asked to fail")
    return {"ok": True}


@task("demo_hang")
def demo_hang(payload: dict[str, Any]) -> dict[str, Any]:
    """Sleeps `payload.sleep_sec` seconds (default 60): a stand-in for a hung task."""
    sleep_sec = float(payload.get("sleep_sec", 60))
    time.sleep(sleep_sec)
    return {"slept_sec": sleep_sec}


@task("demo_flaky")
def demo_flaky(payload: dict[str, Any]) -> dict[str, Any]:
    """Fails its first `payload.failures` attempts (default 1), then succeeds."""
    failures = int(payload.get("failures", 1))
    attempt = current_attempt.get()
    if attempt <= failures:
        raise HandlerError(f"demo_flaky: failing attempt {attempt} of the first {failures}")
    return {"succeeded_on_attempt": attempt}
