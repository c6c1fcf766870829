"""The commands people type against a running API (submit, status, list, retry, cancel): over HTTP,
through `taskscheduler.client`, with their output drawn by `render`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from taskscheduler.cli import render
from taskscheduler.cli.errors import EXIT_USAGE, fail
from taskscheduler.client import DEFAULT_URL
from taskscheduler.lifecycle import TASK_QUEUES, TaskStatus

if TYPE_CHECKING:
    from taskscheduler.client import ApiClient

app = typer.Typer()
PANEL = "Using the API"

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


def _task_id(value: str) -> str:
    import uuid

    try:
        return str(uuid.UUID(value))
    except ValueError:
        fail(f"{value!r} is not a task id (a UUID such as 6f1c2d3e-...)", EXIT_USAGE)


def call_api(url: str, api_key: str | None, action: Callable[[ApiClient], Any]) -> Any:
    """`action(client)` on an ApiClient of `url`; an unreachable API or an error answer ends the command
    with one line."""
    from taskscheduler.client import ApiClient, ClientError, Unreachable

    try:
        with ApiClient(url, api_key) as client:
            return action(client)
    except Unreachable as exc:
        fail(
            f"{exc} (is `taskscheduler dev` or `taskscheduler api` running? point the CLI at it with --url"
            " or TASKSCHEDULER_URL)"
        )
    except ClientError as exc:
        fail(str(exc))


@app.command(rich_help_panel=PANEL)
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
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Create a task: prints its id (and its details on stderr)."""
    body_payload = parse_payload(payload)
    if in_ is not None and at is not None:
        fail("give --in or --at, not both", EXIT_USAGE)
    body: dict[str, Any] = {"name": name, "payload": body_payload, "priority": priority}
    if in_ is not None:
        body["run_at"] = _run_in(in_)
    if at is not None:
        body["run_at"] = _run_at(at)
    if max_retries is not None:
        body["max_retries"] = max_retries
    if timeout is not None:
        body["timeout_sec"] = timeout
    task = call_api(url, api_key, lambda client: client.submit(body, idempotency_key))
    typer.echo(task["id"])
    typer.secho(f"{task['name']} {task['status']} on {task['queue']}, run_at {render.when(task['run_at'])}", err=True)


def parse_payload(payload: str) -> dict[str, Any]:
    """`--payload`: a JSON object."""
    import json

    try:
        value = json.loads(payload)
    except json.JSONDecodeError as exc:
        fail(f"--payload is not valid JSON: {exc}", EXIT_USAGE)
    if not isinstance(value, dict):
        fail('--payload must be a JSON object, e.g. \'{"msg": "hi"}\'', EXIT_USAGE)
    return value


def _run_in(delay: str) -> str:
    """`--in`: now plus the delay, as ISO 8601."""
    from datetime import UTC, datetime

    from taskscheduler.client import ClientError, parse_duration

    try:
        return (datetime.now(UTC) + parse_duration(delay)).isoformat()
    except ClientError as exc:
        fail(f"--in: {exc}", EXIT_USAGE)


def _run_at(at: str) -> str:
    """`--at`: an ISO 8601 time with its offset (Z too), as ISO 8601."""
    from datetime import datetime

    try:
        moment = datetime.fromisoformat(at.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        fail(f"--at {at!r} is not an ISO 8601 time, e.g. 2030-01-01T12:00:00Z", EXIT_USAGE)
    if moment.tzinfo is None:
        fail(f"--at {at!r} has no UTC offset: add Z or e.g. +02:00", EXIT_USAGE)
    return moment.isoformat()


@app.command(rich_help_panel=PANEL)
def status(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="The task's id.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Show a task and every transition it went through."""
    task_id = _task_id(task_id)
    task, events = call_api(url, api_key, lambda client: (client.get(task_id), client.events(task_id)))
    render.print_task(task)
    render.print_events(events)


@app.command("list", rich_help_panel=PANEL)
def list_(
    status_: Annotated[
        list[str] | None,
        typer.Option("--status", help="Only tasks in this status (repeat for several), e.g. DEAD.", show_default=False),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Only tasks of this name.")] = None,
    queue: Annotated[str | None, typer.Option(help="Only tasks of this queue: high, default or low.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="How many (newest first).")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Continue after a previous page (printed below it).")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """List tasks, newest first."""
    statuses = [s.upper() for s in status_ or []]
    unknown = [s for s in statuses if s not in TaskStatus.__members__]
    if unknown:
        fail(f"unknown status {unknown[0]!r}; one of {', '.join(TaskStatus)}", EXIT_USAGE)
    if queue is not None and queue not in TASK_QUEUES:
        fail(f"unknown queue {queue!r}; one of {', '.join(TASK_QUEUES)}", EXIT_USAGE)
    params: dict[str, Any] = {"status": statuses, "limit": limit}
    for key, value in (("name", name), ("queue", queue), ("cursor", cursor)):
        if value is not None:
            params[key] = value
    render.print_task_page(call_api(url, api_key, lambda client: client.list(params)))


@app.command(rich_help_panel=PANEL)
def retry(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="A DEAD or CANCELLED task's id.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Run a DEAD or CANCELLED task again, with a fresh retry budget."""
    _act(task_id, url, api_key, lambda client, task_id: client.retry(task_id))


@app.command(rich_help_panel=PANEL)
def cancel(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="A PENDING, FAILED or ENQUEUED task's id.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Cancel a task that has not started."""
    _act(task_id, url, api_key, lambda client, task_id: client.cancel(task_id))


def _act(task_id: str, url: str, api_key: str | None, action: Callable[[ApiClient, str], Any]) -> None:
    """An operator action on one task: prints the task's id and its new status."""
    task_id = _task_id(task_id)
    task = call_api(url, api_key, lambda client: action(client, task_id))
    typer.echo(f"{task['id']} {task['status']}")
