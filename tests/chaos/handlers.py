"""Handlers for fault tests, loaded by the processes through TASK_MODULES=tests.chaos.handlers."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from taskscheduler.handlers import task


@task("chaos_crash")
def chaos_crash(payload: dict[str, Any]) -> None:
    """Kills the worker process that runs it, as a segfault or the OOM killer would."""
    os._exit(1)


@task("chaos_record")
def chaos_record(payload: dict[str, Any]) -> dict[str, Any]:
    """Appends one line per execution to `payload.path` (O_APPEND: safe across processes), then
    sleeps `payload.sleep_sec`."""
    with Path(payload["path"]).open("a") as f:
        f.write(f"{payload.get('key', '')} {os.getpid()}\n")
    time.sleep(float(payload.get("sleep_sec", 0)))
    return {"pid": os.getpid()}
