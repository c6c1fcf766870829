"""The `taskscheduler` command: one CLI, one role per subcommand."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from taskscheduler.config import Settings, get_settings
from taskscheduler.logs import configure_logging

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from taskscheduler.client import ApiClient
    from taskscheduler.embedded import RunningServers

log = logging.getLogger("taskscheduler")

# One rule for every command's errors: one line on stderr (`error: ...`; `configuration error: ...` for
# the settings), never a traceback or a usage box, and the exit code says whose move it is:
EXIT_FAILURE = 1  # the command was right but did not succeed: an HTTP error, an unreachable server, unhealthy
EXIT_USAGE = 2  # the command line or the configuration is wrong: running it again as it is cannot help


def _fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


class _OneLineErrors(TyperGroup):
    """Typer's group, with click's usage errors (an unknown option, a value out of range, a missing
    argument) shown as one `error:` line, exit 2, instead of a boxed usage message."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            # Not standalone: errors come back to us instead of being printed; an Exit comes back
            # as its code, a command's normal end as its return value (None).
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's ClickException and UsageError derive from it
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `taskscheduler`: the help, as before
                if exc.format_message().strip():  # rich has printed the help itself
                    typer.echo(exc.format_message(), err=True)
                sys.exit(EXIT_USAGE)
            code = getattr(exc, "exit_code", EXIT_FAILURE)
            context = getattr(exc, "ctx", None)
            hint = f" (see: {context.command_path} --help)" if code == EXIT_USAGE and context is not None else ""
            typer.secho(f"error: {exc.format_message()}{hint}", err=True, fg=typer.colors.RED)
            sys.exit(code)
        except typer.Abort:
            typer.secho("error: aborted", err=True, fg=typer.colors.RED)
            sys.exit(EXIT_FAILURE)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="A fault-tolerant distributed task scheduler.",
    no_args_is_help=True,
    add_completion=False,
)


class QueueName(StrEnum):
    high = "high"
    default = "default"
    low = "low"
    dlq = "dlq"


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
        _fail(str(exc), EXIT_USAGE)


def _wait_for_database(settings: Settings) -> None:
    """Wait up to DB_WAIT_SEC for the database (it may start after us, as under compose); then one
    line and exit 1. Nothing listens meanwhile: the API binds its port only once this returns."""
    from taskscheduler.store import db

    where = db.describe_server(settings.database_url)
    log.info("waiting up to %g s for the database at %s (DB_WAIT_SEC)", settings.db_wait_sec, where)
    try:
        db.wait_for_database(settings.database_url, timeout_sec=settings.db_wait_sec)
    except RuntimeError as exc:
        _fail(f"the database at {where} did not answer within {settings.db_wait_sec:g} s (DB_WAIT_SEC): {exc}")


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
    from taskscheduler.api import create_app
    from taskscheduler.api.server import serve
    from taskscheduler.auth import warn_if_open

    settings = _settings()
    _load_task_modules(settings)
    host, port = host or settings.api_host, port or settings.api_port
    warn_if_open("the API", host, port, settings.api_key_list)
    _wait_for_database(settings)
    serve(create_app(settings), settings, host=host, port=port)


@app.command()
def scheduler() -> None:
    """Dispatch due tasks to the queues and rescue stuck and lost ones, every POLL_INTERVAL_SEC."""
    from taskscheduler import metrics
    from taskscheduler.liveness import ProcessHeartbeat
    from taskscheduler.scheduler.publisher import CeleryPublisher
    from taskscheduler.scheduler.service import SchedulerService
    from taskscheduler.worker import configure_celery

    settings = _settings()
    _wait_for_database(settings)
    configure_celery(settings)
    heartbeat = ProcessHeartbeat("scheduler", interval_sec=settings.process_heartbeat_sec)
    service = SchedulerService(settings, CeleryPublisher(settings), heartbeat=heartbeat)
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
    queues: Annotated[QueueName, typer.Option(help="The queue this worker consumes.")] = QueueName.default,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Pool processes (default WORKER_CONCURRENCY).")] = None,
) -> None:
    """Run a Celery worker for one queue (high, default, low, or dlq for the dead-letter recorder).

    SIGTERM is a warm shutdown: the worker takes no new task, finishes the one it runs, and exits."""
    settings = _settings()
    if settings.metrics_port:
        # Before prometheus_client is imported: the pool processes write their samples to files.
        _enable_multiprocess_metrics()

    from taskscheduler.worker import configure_celery

    _load_task_modules(settings)
    _wait_for_database(settings)
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
    import sys
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


DEFAULT_DATA_DIR = Path(".taskscheduler")
DataDirOption = Annotated[
    Path, typer.Option("--data-dir", help="The data dir of the `taskscheduler dev` to use (as given to dev).")
]


def _running_dev(data_dir: Path) -> RunningServers | None:
    """The embedded servers of the `taskscheduler dev` running in ``data_dir``, if one runs."""
    from taskscheduler.embedded import EmbeddedError, find_running

    try:
        return find_running(data_dir)
    except EmbeddedError as exc:
        _fail(str(exc))


def _require_dev(data_dir: Path) -> RunningServers:
    servers = _running_dev(data_dir)
    if servers is None:
        _fail(
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
        QueueName | None, typer.Option("--queue", help="For a worker: only one that consumes this queue.")
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
    from taskscheduler.dev import DevError, run_dev
    from taskscheduler.embedded import EmbeddedError

    def say(message: str) -> None:
        # After SIGHUP the terminal is gone: writing fails, and the clean stop must still happen.
        with contextlib.suppress(OSError):
            typer.secho(f"[dev] {message}", err=True, fg=typer.colors.CYAN)

    try:
        code = run_dev(port=port, data_dir=data_dir.resolve(), environ=os.environ, say=say, verbose=verbose)
    except DevError as exc:
        with contextlib.suppress(OSError):
            typer.secho(f"[dev] {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(exc.exit_code) from None
    except EmbeddedError as exc:
        with contextlib.suppress(OSError):
            typer.secho(f"[dev] {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@app.command("env")
def env_(data_dir: DataDirOption = DEFAULT_DATA_DIR) -> None:
    """Print `export` lines for the `taskscheduler dev` running in --data-dir: `eval "$(taskscheduler env)"`
    points the CLI, `check`, psql and Celery's tools at it. They hold its password."""
    import shlex

    from taskscheduler.dev import dev_api_url
    from taskscheduler.store.db import libpq_url

    servers = _running_dev(data_dir)
    if servers is None:
        _fail(f"no `taskscheduler dev` runs in {data_dir.resolve()}: start it there, or pass its --data-dir")
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
        _fail("no psql found: install the PostgreSQL client (psql)")
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
        _fail(f"cannot run {program}: {exc}")


# --- commands for people: they talk to the API over HTTP ------------------------------------------------------------

UrlOption = Annotated[
    str, typer.Option("--url", envvar="TASKSCHEDULER_URL", help="The API's base URL.", rich_help_panel="API")
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="TASKSCHEDULER_API_KEY",
        help="A key of the API's API_KEYS, if it sets any.",
        show_default=False,
        rich_help_panel="API",
    ),
]
DEFAULT_API_URL = "http://127.0.0.1:8000"
TASK_QUEUES = ("high", "default", "low")

STATUS_STYLE = {
    "PENDING": "cyan",
    "ENQUEUED": "blue",
    "STARTED": "yellow",
    "SUCCEEDED": "green",
    "FAILED": "magenta",
    "DEAD": "bold red",
    "CANCELLED": "dim",
}


def _task_id(value: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(value))
    except ValueError:
        _fail(f"{value!r} is not a task id (a UUID such as 6f1c2d3e-...)", EXIT_USAGE)


def _call(url: str, api_key: str | None, action: Callable[[ApiClient], Any]) -> Any:
    from taskscheduler.client import ApiClient, ClientError, Unreachable

    try:
        with ApiClient(url, api_key) as client:
            return action(client)
    except Unreachable as exc:
        _fail(
            f"{exc} (is `taskscheduler dev` or `taskscheduler api` running? point the CLI at it with --url"
            " or TASKSCHEDULER_URL)"
        )
    except ClientError as exc:
        _fail(str(exc))


def _console() -> Console:
    """A terminal's width on a terminal; piped or captured, wide enough that ids are never cut."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def _styled(status: str) -> Text:
    from rich.text import Text

    return Text(status, style=STATUS_STYLE.get(status, ""))


def _plain(value: str) -> Text:
    """User data (names, payloads, errors) as it is: never read as rich markup."""
    from rich.text import Text

    return Text(value)


def _when(value: str | None) -> str:
    if not value:
        return "-"
    return value.replace("T", " ")[:19] + (" UTC" if value.endswith(("Z", "+00:00")) else value[26:])


def _print_task(task: dict[str, Any]) -> None:
    import json

    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    rows: list[tuple[str, str | Text]] = [
        ("id", task["id"]),
        ("name", task["name"]),
        ("status", _styled(task["status"])),
        ("queue", f"{task['queue']} (priority {task['priority']})"),
        ("attempt", f"{task['attempt']} (max_retries {task['max_retries']})"),
        ("run_at", _when(task["run_at"])),
        ("created_at", _when(task["created_at"])),
        ("started_at", _when(task.get("started_at"))),
        ("finished_at", _when(task.get("finished_at"))),
    ]
    if "payload" in task:
        rows.append(("payload", json.dumps(task["payload"])))
    if task.get("result") is not None:
        rows.append(("result", json.dumps(task["result"])))
    if task.get("last_error"):
        rows.append(("last_error", task["last_error"]))
    if task.get("dead_reason"):
        rows.append(("dead_reason", task["dead_reason"]))
    if task.get("idempotency_key"):
        rows.append(("idempotency_key", task["idempotency_key"]))
    for key, value in rows:
        table.add_row(key, _plain(value) if isinstance(value, str) else value)
    _console().print(table)


@app.command(rich_help_panel="Using the API")
def submit(
    name: Annotated[str, typer.Argument(help="A registered handler name, e.g. demo_ok.")],
    payload: Annotated[str, typer.Option(help="The payload, a JSON object.")] = "{}",
    priority: Annotated[int, typer.Option(min=1, max=10, help="8-10 high, 4-7 default, 1-3 low.")] = 5,
    in_: Annotated[
        str | None, typer.Option("--in", help="Run after this delay: 30s, 10m, 1h30m, 2d.", show_default=False)
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at", help="Run at this time: ISO 8601 with an offset, e.g. 2030-01-01T12:00:00Z.", show_default=False
        ),
    ] = None,
    max_retries: Annotated[
        int | None, typer.Option(min=0, help="Retries after the first attempt (API default 3).")
    ] = None,
    timeout: Annotated[float | None, typer.Option(min=0.001, help="Run-time limit in seconds.")] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Submitting again with the same key returns the first task.")
    ] = None,
    url: UrlOption = DEFAULT_API_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Create a task: prints its id (and its details on stderr)."""
    import json
    from datetime import UTC, datetime

    from taskscheduler.client import ClientError, parse_duration

    try:
        body_payload = json.loads(payload)
    except json.JSONDecodeError as exc:
        _fail(f"--payload is not valid JSON: {exc}", EXIT_USAGE)
    if not isinstance(body_payload, dict):
        _fail('--payload must be a JSON object, e.g. \'{"msg": "hi"}\'', EXIT_USAGE)
    if in_ is not None and at is not None:
        _fail("give --in or --at, not both", EXIT_USAGE)
    body: dict[str, Any] = {"name": name, "payload": body_payload, "priority": priority}
    if in_ is not None:
        try:
            body["run_at"] = (datetime.now(UTC) + parse_duration(in_)).isoformat()
        except ClientError as exc:
            _fail(f"--in: {exc}", EXIT_USAGE)
    if at is not None:
        try:
            moment = datetime.fromisoformat(at.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            _fail(f"--at {at!r} is not an ISO 8601 time, e.g. 2030-01-01T12:00:00Z", EXIT_USAGE)
        if moment.tzinfo is None:
            _fail(f"--at {at!r} has no UTC offset: add Z or e.g. +02:00", EXIT_USAGE)
        body["run_at"] = moment.isoformat()
    if max_retries is not None:
        body["max_retries"] = max_retries
    if timeout is not None:
        body["timeout_sec"] = timeout
    task = _call(url, api_key, lambda client: client.submit(body, idempotency_key))
    typer.echo(task["id"])
    typer.secho(f"{task['name']} {task['status']} on {task['queue']}, run_at {_when(task['run_at'])}", err=True)


@app.command(rich_help_panel="Using the API")
def status(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="The task's id.")],
    url: UrlOption = DEFAULT_API_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Show a task and every transition it went through."""
    from rich.table import Table

    task_id = _task_id(task_id)
    task, events = _call(url, api_key, lambda client: (client.get(task_id), client.events(task_id)))
    _print_task(task)
    table = Table(title="events", title_justify="left")
    table.add_column("at", no_wrap=True)
    table.add_column("from")
    table.add_column("to")
    table.add_column("attempt", justify="right")
    table.add_column("detail", overflow="fold")
    for event in events:
        table.add_row(
            _when(event["at"]),
            event["from_status"] or "-",
            _styled(event["to_status"]),
            str(event["attempt"]),
            _plain(event["detail"] or ""),
        )
    _console().print(table)


@app.command("list", rich_help_panel="Using the API")
def list_(
    status_: Annotated[
        list[str] | None,
        typer.Option("--status", help="Only tasks in this status (repeat for several), e.g. DEAD.", show_default=False),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Only tasks of this name.")] = None,
    queue: Annotated[str | None, typer.Option(help="Only tasks of this queue: high, default or low.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="How many (newest first).")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Continue after a previous page (printed below it).")] = None,
    url: UrlOption = DEFAULT_API_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """List tasks, newest first."""
    from rich import box
    from rich.table import Table

    from taskscheduler.lifecycle import TaskStatus

    statuses = [s.upper() for s in status_ or []]
    unknown = [s for s in statuses if s not in TaskStatus.__members__]
    if unknown:
        _fail(f"unknown status {unknown[0]!r}; one of {', '.join(TaskStatus)}", EXIT_USAGE)
    if queue is not None and queue not in TASK_QUEUES:
        _fail(f"unknown queue {queue!r}; one of {', '.join(TASK_QUEUES)}", EXIT_USAGE)
    params: dict[str, Any] = {"status": statuses, "limit": limit}
    for key, value in (("name", name), ("queue", queue), ("cursor", cursor)):
        if value is not None:
            params[key] = value
    page = _call(url, api_key, lambda client: client.list(params))
    console = _console()
    # Narrow terminals get the essentials: the queue from 100 columns, the last error from 120.
    with_queue, with_error = console.width >= 100, console.width >= 120
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("id", no_wrap=True)
    table.add_column("name", overflow="ellipsis", no_wrap=True, ratio=1)
    table.add_column("status", no_wrap=True)
    if with_queue:
        table.add_column("queue", no_wrap=True)
    table.add_column("att", justify="right", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True)
    if with_error:
        table.add_column("last error", overflow="ellipsis", no_wrap=True, ratio=2)
    for task in page["tasks"]:
        row: list[str | Text] = [task["id"], _plain(task["name"]), _styled(task["status"])]
        if with_queue:
            row.append(task["queue"])
        row += [str(task["attempt"]), task["created_at"].replace("T", " ")[5:19]]
        if with_error:
            error = (task.get("last_error") or "").strip()
            row.append(_plain(error.splitlines()[0][:200] if error else ""))
        table.add_row(*row)
    console.print(table)
    if not page["tasks"]:
        console.print("no tasks")
    if page.get("next_cursor"):
        console.print(f"more: --cursor {page['next_cursor']}", soft_wrap=True)


@app.command(rich_help_panel="Using the API")
def retry(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="A DEAD or CANCELLED task's id.")],
    url: UrlOption = DEFAULT_API_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Run a DEAD or CANCELLED task again, with a fresh retry budget."""
    task_id = _task_id(task_id)
    task = _call(url, api_key, lambda client: client.retry(task_id))
    typer.echo(f"{task['id']} {task['status']}")


@app.command(rich_help_panel="Using the API")
def cancel(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="A PENDING, FAILED or ENQUEUED task's id.")],
    url: UrlOption = DEFAULT_API_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Cancel a task that has not started."""
    task_id = _task_id(task_id)
    task = _call(url, api_key, lambda client: client.cancel(task_id))
    typer.echo(f"{task['id']} {task['status']}")


# Last: that module builds on the helpers above.
from taskscheduler.schedules_cli import app as schedules_app  # noqa: E402

app.add_typer(schedules_app, name="schedules", rich_help_panel="Using the API")


def main() -> None:
    app()
