"""Typed tasks for the tests: imported by the `typed_tasks` fixture (which takes them out of the
registry again afterwards) and, as TASK_MODULES=tests.typed_tasks, by the processes of e2e tests."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from taskscheduler.handlers import task


class Email(BaseModel):
    """What `send_email` takes."""

    model_config = ConfigDict(extra="forbid", strict=True)

    to: str = Field(min_length=3, description="The address.")
    subject: str = Field("hello", description="The subject line.")
    send_after: datetime | None = Field(None, description="Not before this time.")


class Record(BaseModel):
    """What `record_typed` takes: a file to append a line to, and the line's key."""

    path: str = Field(description="The file.")
    key: str = Field(description="The line's key.")


@task("send_email", priority=7, max_retries=5)
def send_email(payload: Email) -> dict[str, Any]:
    return {"type": type(payload).__name__, "to": payload.to, "subject": payload.subject,
            "send_after": type(payload.send_after).__name__}  # fmt: skip


def _record(path: str, key: str) -> None:
    with Path(path).open("a") as f:  # O_APPEND: one line per run, whichever process runs it
        f.write(f"{key} {os.getpid()}\n")


@task("record_typed")
def record_typed(payload: Record) -> dict[str, Any]:
    """Appends `key` to `path` (one line per execution), and says what it was given."""
    _record(payload.path, payload.key)
    return {"type": type(payload).__name__}


@task("record_dict")
def record_dict(payload: dict[str, Any]) -> dict[str, Any]:
    """`record_typed` for a handler of a dict."""
    _record(payload["path"], payload["key"])
    return {"type": type(payload).__name__}


TASKS = (send_email, record_typed, record_dict)
