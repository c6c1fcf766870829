"""The server roles (api, scheduler, worker, migrate, dev) and the tools around them (check, env,
psql): what compose, the Procfile and `taskscheduler dev` run."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from taskscheduler.cli.errors import EXIT_USAGE, fail
from taskscheduler.config import Settings, get_settings
from taskscheduler.dev import DEFAULT_DATA_DIR, DevError, dev_api_url, run_dev
from taskscheduler.lifecycle import Queue
from taskscheduler.logs import configure_logging

if TYPE_CHECKING:
    from taskscheduler.embedded import RunningServers
    from taskscheduler.store.db import Database

log = logging.getLogger("taskscheduler")

app = typer.Typer()


def _settings(*, urls: bool = True) -> Settings:
    """The settings, with logging configured; with ``urls``, DATABASE_URL and REDIS_URL must be set."""
    try:
        settings = get_settings()
        if urls:
            settings.require_urls()
    except Exception as exc:  # pydantic ValidationError or a missing URL: say it plainly, no traceback
        typer.secho(f"configuration error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(EXIT_USAGE) from None
    configure_logging(settings.log_format, settings.log_level)
    return settings


def _load_task_modules(settings: Settings) -> None:
    """TASK_MODULES, imported as `celery -A` would (the working directory first); a module that
    cannot be imported is a configuration error, one line, exit 2."""
    from taskscheduler import handlers

    try:
        handlers.load_task_modules(settings.task_module_list)
    except RuntimeError as exc:
        fail(str(exc), EXIT_USAGE)


def _wait_for_database(settings: Settings) -> Database:
    """This process's Database, once it answers: wait up to DB_WAIT_SEC for the database (it may
    start after us, as under compose); then one line and exit 1. Nothing listens meanwhile: the API
    binds its port only once this returns."""
    from taskscheduler.store.db import Database

    database = Database.from_settings(settings)
    where = database.describe_server()
    log.info("waiting up to %g s for the database at %s (DB_WAIT_SEC)", settings.db_wait_sec, where)
    try:
        database.wait_until_up(timeout_sec=settings.db_wait_sec)
    except RuntimeError as exc:
        fail(f"the database at {where} did not answer within {settings.db_wait_sec:g} s (DB_WAIT_SEC): {exc}")
    return database


@app.command()
def migrate() -> None:
    """Wait for the database, then apply the migrations (alembic upgrade head). Safe to run twice."""
    from taskscheduler.migrations import migrate_database

    settings = _settings()
    _wait_for_database(settings).dispose()
    created = migrate_database(
        settings.database_url,
        events_partition_sec=settings.events_partition_sec,
        events_partitions_ahead=settings.events_partitions_ahead,
    )
    log.info("database schema is up to date (task_events partitions created: %d)", created)


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address (default API_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default API_PORT).")] = None,
) -> None:
    """Serve the HTTP API (Swagger at /docs)."""
    from taskscheduler.api import create_app
    from taskscheduler.api.server import serve
    from taskscheduler.auth import warn_if_open

    settings = _settings()
    _load_task_modules(settings)
    host, port = host or settings.api_host, port or settings.api_port
    warn_if_open("the API", host, port, settings.api_key_list)
    database = _wait_for_database(settings)
    serve(create_app(settings, database=database), settings, host=host, port=port)


@app.command()
def scheduler() -> None:
    """Dispatch due tasks to the queues and rescue stuck and lost ones, every POLL_INTERVAL_SEC."""
    from taskscheduler import metrics
    from taskscheduler.broker import configure_celery
    from taskscheduler.liveness import ProcessHeartbeat
    from taskscheduler.scheduler.publisher import CeleryPublisher
    from taskscheduler.scheduler.service import SchedulerService

    settings = _settings()
    database = _wait_for_database(settings)
    configure_celery(settings)
    heartbeat = ProcessHeartbeat("scheduler", interval_sec=settings.process_heartbeat_sec, database=database)
    service = SchedulerService(settings, CeleryPublisher(settings), database=database, heartbeat=heartbeat)
    if settings.metrics_port:
        metrics.serve(settings.metrics_host, settings.metrics_port, settings.api_key_list)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: finishing the current batch, then stopping", signum)
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.run_forever()


@app.command()
def worker(
    queues: Annotated[Queue, typer.Option(help="The queue this worker consumes.")] = Queue.DEFAULT,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Pool processes (default WORKER_CONCURRENCY).")] = None,
) -> None:
    """Run a Celery worker for one queue (high, default, low, or dlq for the dead-letter recorder).

    SIGTERM is a warm shutdown: the worker takes no new task, finishes the one it runs, and exits."""
    settings = _settings()
    if settings.metrics_port:
        # Before prometheus_client is imported: the pool processes write their samples to files.
        _enable_multiprocess_metrics()

    import taskscheduler.worker  # noqa: F401  (registers the worker's Celery tasks and boot step)
    from taskscheduler.broker import configure_celery

    _load_task_modules(settings)
    # The worker's processes build their own as they start (worker.process).
    _wait_for_database(settings).dispose()
    app_ = configure_celery(settings)
    argv = [
        "worker",
        f"--queues={queues.value}",
        f"--concurrency={concurrency or settings.worker_concurrency}",
        "--pool=prefork",
        f"--hostname={queues.value}-{os.getpid()}@%h",
        f"--loglevel={settings.log_level}",
        "--without-gossip",
        "--without-mingle",
    ]
    # Worker heartbeats are events too: with TASK_EVENTS, Flower and `celery events` see the worker
    # online through them; without, nothing here reads them, so they are not sent.
    if not settings.task_events:
        argv.append("--without-heartbeat")
    app_.worker_main(argv)


def _enable_multiprocess_metrics() -> None:
    """prometheus-client's multiprocess mode for this worker and its pool processes: each writes its
    samples to files in PROMETHEUS_MULTIPROC_DIR (a private temporary directory unless set), and the
    main process serves their sum on METRICS_PORT."""
    import atexit
    import shutil
    import tempfile

    if "prometheus_client" in sys.modules:
        log.warning("prometheus_client was imported before the worker started: pool metrics are not collected")
        return
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        os.makedirs(path, exist_ok=True)
        for entry in Path(path).glob("*.db"):  # stale samples of an earlier run would be summed in
            entry.unlink()
    else:
        path = tempfile.mkdtemp(prefix="taskscheduler-metrics-")
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


DataDirOption = Annotated[
    Path, typer.Option("--data-dir", help="The data dir of the `taskscheduler dev` to use (as given to dev).")
]


def _running_dev(data_dir: Path) -> RunningServers | None:
    """The embedded servers of the `taskscheduler dev` running in ``data_dir``, if one runs."""
    from taskscheduler.embedded import EmbeddedError, find_running

    try:
        return find_running(data_dir)
    except EmbeddedError as exc:
        fail(str(exc))


def _require_dev(data_dir: Path) -> RunningServers:
    servers = _running_dev(data_dir)
    if servers is None:
        fail(
            f"DATABASE_URL is not set and no `taskscheduler dev` runs in {data_dir.resolve()}:"
            " start `taskscheduler dev` here (or pass its --data-dir), or set DATABASE_URL"
        )
    return servers


class Role(StrEnum):
    api = "api"
    scheduler = "scheduler"
    worker = "worker"


@app.command()
def check(
    role: Annotated[Role, typer.Argument(help="api, scheduler or worker.")],
    queue: Annotated[
        Queue | None, typer.Option("--queue", help="For a worker: only one that consumes this queue.")
    ] = None,
    max_age: Annotated[
        float | None,
        typer.Option(min=0, help="Seconds; default 3 x PROCESS_HEARTBEAT_SEC."),
    ] = None,
    any_host: Annotated[bool, typer.Option(help="Accept a process on any host, not only this one.")] = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
) -> None:
    """Exit 0 if a process of ROLE on this host heartbeated recently, else 1: for healthchecks.

    Every api, scheduler and worker process records that it is alive every PROCESS_HEARTBEAT_SEC in
    the `process_heartbeats` table (the scheduler from its loop, so a hung loop goes stale) and
    deletes its row when it stops. Without DATABASE_URL, it asks the `taskscheduler dev` running in
    --data-dir (default ./.taskscheduler).
    """
    import socket

    from sqlalchemy.exc import SQLAlchemyError

    from taskscheduler.store import db
    from taskscheduler.store import processes as process_store

    settings = _settings(urls=False)
    database_url = settings.database_url or _require_dev(data_dir).database_url
    limit = max_age if max_age is not None else 3 * settings.process_heartbeat_sec
    hostname = None if any_host else socket.gethostname()
    where = f"{role.value}{f' (queue {queue.value})' if queue else ''}{f' on {hostname}' if hostname else ''}"
    try:
        with db.transaction(database_url) as conn:
            seen = process_store.last_seen(
                conn, role=role.value, hostname=hostname, queue=queue.value if queue else None
            )
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        typer.secho(f"unhealthy: cannot read the heartbeats from the database: {reason}", err=True, fg="red")
        raise typer.Exit(1) from None
    if seen is None:
        typer.secho(f"unhealthy: no {where} has recorded a heartbeat (not running?)", err=True, fg="red")
        raise typer.Exit(1)
    if seen.age_sec > limit:
        typer.secho(
            f"unhealthy: the last heartbeat of a {where} (pid {seen.pid}) is {seen.age_sec:.1f}s old"
            f" (more than {limit:g}s)",
            err=True,
            fg="red",
        )
        raise typer.Exit(1)
    typer.echo(f"ok: {role.value} pid {seen.pid} on {seen.hostname}, last heartbeat {seen.age_sec:.1f}s ago")


@app.command()
def dev(
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the API.")] = 8000,
    data_dir: Annotated[Path, typer.Option(help="Where the embedded servers keep their data.")] = DEFAULT_DATA_DIR,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="The roles' output on this terminal, not in DATA_DIR/logs/.")
    ] = False,
) -> None:
    """Run everything on this machine: embedded PostgreSQL and Valkey (unless DATABASE_URL and
    REDIS_URL are set), migrations, the API, the scheduler and the four workers. Ctrl-C stops all.

    A role that dies is restarted; one that exits with a configuration error, or dies 3 times in
    30 s, stops everything (exit non-zero) with its last output shown."""
    from taskscheduler.embedded import EmbeddedError

    def say(message: str) -> None:
        # After SIGHUP the terminal is gone: writing fails, and the clean stop must still happen.
        with contextlib.suppress(OSError):
            typer.secho(f"[dev] {message}", err=True, fg=typer.colors.CYAN)

    try:
        code = run_dev(port=port, data_dir=data_dir.resolve(), environ=os.environ, say=say, verbose=verbose)
    except (DevError, EmbeddedError) as exc:
        with contextlib.suppress(OSError):
            typer.secho(f"[dev] {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(exc.exit_code if isinstance(exc, DevError) else 1) from None
    raise typer.Exit(code)


@app.command("env")
def env_(data_dir: DataDirOption = DEFAULT_DATA_DIR) -> None:
    """Print `export` lines for the `taskscheduler dev` running in --data-dir: `eval "$(taskscheduler env)"`
    points the CLI, `check`, psql and Celery's tools at it. They hold its password."""
    import shlex

    from taskscheduler.store.db import libpq_url

    servers = _running_dev(data_dir)
    if servers is None:
        fail(f"no `taskscheduler dev` runs in {data_dir.resolve()}: start it there, or pass its --data-dir")
    exports = {
        # The libpq form: we accept it, and so do psql and every other PostgreSQL client.
        "DATABASE_URL": libpq_url(servers.database_url),
        "REDIS_URL": servers.redis_url,
    }
    api_url = dev_api_url(servers.data_dir)
    if api_url:
        exports["TASKSCHEDULER_URL"] = api_url
    for name, value in exports.items():
        typer.echo(f"export {name}={shlex.quote(value)}")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Example: taskscheduler psql -- -c 'select count(*) from dlq_events'",
)
def psql(ctx: typer.Context, data_dir: DataDirOption = DEFAULT_DATA_DIR) -> None:
    """Open psql on DATABASE_URL's database, else on the `taskscheduler dev` running in --data-dir.
    Arguments after `--` go to psql."""
    import shutil

    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from taskscheduler.embedded import psql_program
    from taskscheduler.store.db import libpq_url

    settings = _settings(urls=False)
    url = settings.database_url or _require_dev(data_dir).database_url
    # The embedded server's own psql when installed: it is as new as that server and, like any
    # psql, also reads older servers (an older psql cannot read a newer server's catalogs).
    program = psql_program() or shutil.which("psql")
    if program is None:
        fail("no psql found: install the PostgreSQL client (psql)")
    params = {k: str(v) for k, v in conninfo_to_dict(libpq_url(url)).items()}
    env = dict(os.environ)
    password = params.pop("password", None)
    if password:
        env["PGPASSWORD"] = password  # not on the command line, which every user can read
    argv = [str(program), "-d", make_conninfo(**params), *ctx.args]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(program, argv, env)  # psql takes over this process: the terminal, signals, exit code
    except OSError as exc:
        fail(f"cannot run {program}: {exc}")
