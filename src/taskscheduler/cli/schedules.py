"""`taskscheduler schedules ...`: recurring schedules through the API (list, show, create, pause, resume,
trigger, backfill, delete). A schedule is named by its name or its id."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from taskscheduler.cli import render
from taskscheduler.cli.errors import EXIT_USAGE, fail
from taskscheduler.cli.tasks import ApiKeyOption, UrlOption, call_api, parse_payload
from taskscheduler.client import DEFAULT_URL

app = typer.Typer(help="Recurring schedules: list, show, create, pause, resume, trigger, backfill, delete.")

Ref = Annotated[str, typer.Argument(metavar="SCHEDULE", help="The schedule's name (or id).")]


def _path(ref: str, action: str = "") -> str:
    from urllib.parse import quote

    return f"/schedules/{quote(ref, safe='')}" + (f"/{action}" if action else "")


def _when_fires(schedule: dict[str, Any]) -> str:
    if schedule["cron"] is not None:
        return f"{schedule['cron']} ({schedule['timezone']})"
    return f"every {schedule['every_sec']} s"


def _print(schedule: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    state = "paused" + (f": {schedule['note']}" if schedule["note"] else "") if schedule["paused"] else "active"
    rows = [
        ("id", schedule["id"]),
        ("name", schedule["name"]),
        ("task", f"{schedule['task']} (priority {schedule['priority']}, max_retries {schedule['max_retries']})"),
        ("fires", _when_fires(schedule)),
        ("state", state),
        ("overlap", f"{schedule['overlap']}, catch-up window {schedule['catchup_window_sec']:g} s"),
        ("source", schedule["source"]),
        ("payload", json.dumps(schedule["payload"])),
        ("next fires", ", ".join(render.when(t) for t in schedule["next_fire_times"]) or "none (ended)"),
        ("last fire", render.when(schedule["last_fire_at"])),
        ("counts", f"{schedule['fires']} fired, {schedule['skips']} skipped, {schedule['misses']} missed"),
    ]
    if schedule["last_skipped_at"]:
        rows.append(("last skip", f"{render.when(schedule['last_skipped_at'])} ({schedule['last_skip_reason']})"))
    for key, value in rows:
        table.add_row(key, render.plain(str(value)))
    render.console().print(table)


@app.command("list")
def list_(
    source: Annotated[str | None, typer.Option(help="Only `api` or `code` schedules.")] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Every schedule, by name, with its next fire and counts."""
    from rich import box
    from rich.table import Table

    params: dict[str, Any] = {"limit": 500}
    if source is not None:
        params["source"] = source
    schedules: list[dict[str, Any]] = []
    while True:
        page = call_api(url, api_key, lambda client: client.request("GET", "/schedules", params=params))
        schedules += page["schedules"]
        if not page["next_cursor"]:
            break
        params["cursor"] = page["next_cursor"]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for column in ("name", "task", "fires", "next fire (UTC)", "state", "fired/skipped/missed", "source"):
        table.add_column(column, no_wrap=column != "name", overflow="ellipsis")
    for s in schedules:
        state = "paused" if s["paused"] else "active"
        counts = f"{s['fires']}/{s['skips']}/{s['misses']}"
        name, task = render.plain(s["name"]), render.plain(s["task"])
        table.add_row(name, task, _when_fires(s), render.when(s["next_fire_at"]), state, counts, s["source"])
    out = render.console()
    out.print(table)
    if not schedules:
        out.print("no schedules")


@app.command()
def show(ref: Ref, url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None) -> None:
    """One schedule: when it fires next, its policies and counts."""
    _print(call_api(url, api_key, lambda client: client.request("GET", _path(ref))))


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="A unique name.")],
    task: Annotated[str, typer.Option(help="The handler each task runs.")],
    cron: Annotated[
        str | None, typer.Option(help="5-field cron, or @hourly, @daily, ... (in --timezone).", show_default=False)
    ] = None,
    every: Annotated[
        str | None, typer.Option(help="Or an interval: 30s, 10m, 1h, 1d (exact, in UTC).", show_default=False)
    ] = None,
    timezone: Annotated[str, typer.Option(help="IANA zone of --cron, e.g. Europe/Berlin.")] = "UTC",
    payload: Annotated[str, typer.Option(help="Each task's payload, a JSON object.")] = "{}",
    priority: Annotated[int, typer.Option(min=1, max=10, help="8-10 high, 4-7 default, 1-3 low.")] = 5,
    overlap: Annotated[str, typer.Option(help="skip, allow or buffer_one.")] = "skip",
    jitter: Annotated[float, typer.Option(min=0, help="Seconds of random delay after each fire time.")] = 0,
    catchup_window: Annotated[float, typer.Option(min=1, help="Seconds of missed fires made up after downtime.")] = 300,
    max_retries: Annotated[int, typer.Option(min=0, help="Of each task.")] = 3,
    start_at: Annotated[str | None, typer.Option(help="No fire before (ISO 8601).", show_default=False)] = None,
    end_at: Annotated[str | None, typer.Option(help="No fire after (ISO 8601).", show_default=False)] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Create a schedule (one of --cron and --every); prints it."""
    from taskscheduler.client import ClientError, parse_duration

    if (cron is None) == (every is None):
        fail("give exactly one of --cron and --every", EXIT_USAGE)
    body: dict[str, Any] = {"name": name, "task": task, "payload": parse_payload(payload)}
    if every is not None:
        try:
            seconds = parse_duration(every).total_seconds()
        except ClientError as exc:
            fail(str(exc), EXIT_USAGE)
        if seconds < 1 or not seconds.is_integer():
            fail(f"--every must be a whole number of seconds, at least 1 (got {seconds:g} s)", EXIT_USAGE)
        body["every_sec"] = int(seconds)
    else:
        body["cron"] = cron
    body |= {"timezone": timezone, "priority": priority, "overlap": overlap, "jitter_sec": jitter,
             "catchup_window_sec": catchup_window, "max_retries": max_retries}  # fmt: skip
    for key, value in (("start_at", start_at), ("end_at", end_at)):
        if value is not None:
            body[key] = value
    _print(call_api(url, api_key, lambda client: client.request("POST", "/schedules", json=body)))


@app.command()
def pause(
    ref: Ref,
    note: Annotated[str | None, typer.Option(help="Why.", show_default=False)] = None,
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """Stop firing until resumed."""
    schedule = call_api(url, api_key, lambda client: client.request("POST", _path(ref, "pause"), json={"note": note}))
    typer.echo(f"{schedule['name']} paused")


@app.command()
def resume(ref: Ref, url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None) -> None:
    """Fire again, from the next fire time on."""
    schedule = call_api(url, api_key, lambda client: client.request("POST", _path(ref, "resume")))
    typer.echo(f"{schedule['name']} active; next fire {render.when(schedule['next_fire_at'])}")


@app.command()
def trigger(ref: Ref, url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None) -> None:
    """Create one task of the schedule now; prints its id."""
    task = call_api(url, api_key, lambda client: client.request("POST", _path(ref, "trigger")))
    typer.echo(task["id"])


@app.command()
def backfill(
    ref: Ref,
    start: Annotated[str, typer.Option(help="From this time (ISO 8601 with offset), included.")],
    end: Annotated[str, typer.Option(help="To this time (ISO 8601 with offset), included.")],
    url: UrlOption = DEFAULT_URL,
    api_key: ApiKeyOption = None,
) -> None:
    """A task for every fire time in the range that has none (safe to repeat)."""
    body = {"start": start, "end": end}
    result = call_api(url, api_key, lambda client: client.request("POST", _path(ref, "backfill"), json=body))
    typer.echo(f"{result['created']} created, {result['existing']} existed already")


@app.command()
def delete(ref: Ref, url: UrlOption = DEFAULT_URL, api_key: ApiKeyOption = None) -> None:
    """Delete the schedule (its tasks stay)."""
    call_api(url, api_key, lambda client: client.request("DELETE", _path(ref)))
    typer.echo(f"{ref} deleted")
