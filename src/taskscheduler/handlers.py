"""The handler registry, and the built-in demo handlers.

A handler is a plain function of the payload, registered under a name:

    from taskscheduler.handlers import task

    @task("send_email")
    def send_email(payload: dict) -> dict: ...

Its JSON-serialisable return value is stored as the task's `result`; an exception fails the attempt.
Modules with handlers are listed in `TASK_MODULES` and imported by the API (to validate names) and
the workers (to run them).

The same modules may declare recurring schedules, which the scheduler upserts at start (by name):

    schedule("nightly-report", task="send_report", cron="0 3 * * *", timezone="Europe/Berlin")
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from taskscheduler.schedule_spec import Overlap, Spec

Handler = Callable[[dict[str, Any]], Any]

_registry: dict[str, Handler] = {}

# The attempt being run (counted from the last replay), for handlers that care; set by the worker.
current_attempt: ContextVar[int] = ContextVar("current_attempt", default=1)


class HandlerError(Exception):
    """A handler raised: the attempt failed."""


def task(name: str) -> Callable[[Handler], Handler]:
    """Register `fn` as the handler for tasks called `name`."""
    if not name or len(name) > 200:
        raise ValueError("a handler name must be 1-200 characters")

    def register(fn: Handler) -> Handler:
        existing = _registry.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(f"handler {name!r} is registered twice ({existing.__module__} and {fn.__module__})")
        _registry[name] = fn
        return fn

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
