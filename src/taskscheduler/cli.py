"""The `taskscheduler` command: one CLI, one role per subcommand."""

from __future__ import annotations

import logging
import os
import signal
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from taskscheduler.config import Settings, get_settings
from taskscheduler.logs import configure_logging

app = typer.Typer(help="A fault-tolerant distributed task scheduler.", no_args_is_help=True, add_completion=False)
log = logging.getLogger("taskscheduler")


class QueueName(StrEnum):
    high = "high"
    default = "default"
    low = "low"
    dlq = "dlq"


def _settings() -> Settings:
    try:
        settings = get_settings()
        settings.require_urls()
    except Exception as exc:  # pydantic ValidationError or a missing URL: say it plainly, no traceback
        typer.secho(f"configuration error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    configure_logging(settings.log_format, settings.log_level)
    return settings


def _wait_for_database(settings: Settings) -> None:
    from taskscheduler.store import db

    try:
        db.wait_for_database(settings.database_url)
    except RuntimeError as exc:
        typer.secho(str(exc), err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None


@app.command()
def migrate() -> None:
    """Wait for the database, then apply the migrations (alembic upgrade head). Safe to run twice."""
    from taskscheduler.migrations import run_migrations

    settings = _settings()
    _wait_for_database(settings)
    run_migrations(settings.database_url)
    log.info("database schema is up to date")


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (default API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default API_PORT).")] = None,
) -> None:
    """Serve the HTTP API (Swagger at /docs)."""
    import uvicorn

    from taskscheduler.api import create_app

    settings = _settings()
    _wait_for_database(settings)
    uvicorn.run(
        create_app(settings),
        host=host or settings.api_host,
        port=port or settings.api_port,
        log_config=None,
        access_log=False,
    )


@app.command()
def scheduler() -> None:
    """Dispatch due tasks to the queues and rescue stuck and lost ones, every POLL_INTERVAL_SEC."""
    from taskscheduler.scheduler.publisher import CeleryPublisher
    from taskscheduler.scheduler.service import SchedulerService
    from taskscheduler.worker import configure_celery

    settings = _settings()
    _wait_for_database(settings)
    configure_celery(settings)
    service = SchedulerService(settings, CeleryPublisher(settings.stuck_after_sec))

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: finishing the current batch, then stopping", signum)
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.run_forever()


@app.command()
def worker(
    queues: Annotated[QueueName, typer.Option(help="The queue this worker consumes.")] = QueueName.default,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Pool processes (default WORKER_CONCURRENCY).")] = None,
) -> None:
    """Run a Celery worker for one queue (high, default, low, or dlq for the dead-letter recorder)."""
    from taskscheduler import handlers
    from taskscheduler.worker import configure_celery

    settings = _settings()
    try:
        handlers.load_task_modules(settings.task_module_list)
    except RuntimeError as exc:
        typer.secho(str(exc), err=True, fg=typer.colors.RED)
        raise typer.Exit(2) from None
    _wait_for_database(settings)
    app_ = configure_celery(settings)
    app_.worker_main(
        [
            "worker",
            f"--queues={queues.value}",
            f"--concurrency={concurrency or settings.worker_concurrency}",
            "--pool=prefork",
            f"--hostname={queues.value}-{os.getpid()}@%h",
            f"--loglevel={settings.log_level}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


@app.command()
def dev(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the API.")] = 8000,
    data_dir: Annotated[Path, typer.Option(help="Where the embedded servers keep their data.")] = Path(
        ".taskscheduler"
    ),
) -> None:
    """Run everything on this machine: embedded PostgreSQL and Valkey (unless DATABASE_URL and
    REDIS_URL are set), migrations, the API, the scheduler and the four workers. Ctrl-C stops all."""
    from taskscheduler.dev import run_dev
    from taskscheduler.embedded import EmbeddedError

    def say(message: str) -> None:
        typer.secho(f"[dev] {message}", err=True, fg=typer.colors.CYAN)

    try:
        code = run_dev(port=port, data_dir=data_dir.resolve(), environ=os.environ, say=say)
    except EmbeddedError as exc:
        typer.secho(f"[dev] {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def main() -> None:
    app()
