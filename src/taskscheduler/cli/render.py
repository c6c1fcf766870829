"""The client commands' output: tasks, their events and pages of tasks as rich tables.

User data (names, payloads, errors) is shown as it is, never read as rich markup."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

STATUS_STYLE = {
    "PENDING": "cyan",
    "ENQUEUED": "blue",
    "STARTED": "yellow",
    "SUCCEEDED": "green",
    "FAILED": "magenta",
    "DEAD": "bold red",
    "CANCELLED": "dim",
}


def console() -> Console:
    """A terminal's width on a terminal; piped or captured, wide enough that ids are never cut."""
    from rich.console import Console

    on_terminal = Console()
    return on_terminal if on_terminal.is_terminal else Console(width=200)


def styled(status: str) -> Text:
    from rich.text import Text

    return Text(status, style=STATUS_STYLE.get(status, ""))


def plain(value: str) -> Text:
    from rich.text import Text

    return Text(value)


def when(value: str | None) -> str:
    if not value:
        return "-"
    return value.replace("T", " ")[:19] + (" UTC" if value.endswith(("Z", "+00:00")) else value[26:])


def print_task(task: dict[str, Any]) -> None:
    import json

    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    rows: list[tuple[str, str | Text]] = [
        ("id", task["id"]),
        ("name", task["name"]),
        ("status", styled(task["status"])),
        ("queue", f"{task['queue']} (priority {task['priority']})"),
        ("attempt", f"{task['attempt']} (max_retries {task['max_retries']})"),
        ("run_at", when(task["run_at"])),
        ("created_at", when(task["created_at"])),
        ("started_at", when(task.get("started_at"))),
        ("finished_at", when(task.get("finished_at"))),
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
        table.add_row(key, plain(value) if isinstance(value, str) else value)
    console().print(table)


def print_events(events: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="events", title_justify="left")
    table.add_column("at", no_wrap=True)
    table.add_column("from")
    table.add_column("to")
    table.add_column("attempt", justify="right")
    table.add_column("detail", overflow="fold")
    for event in events:
        table.add_row(
            when(event["at"]),
            event["from_status"] or "-",
            styled(event["to_status"]),
            str(event["attempt"]),
            plain(event["detail"] or ""),
        )
    console().print(table)


def print_task_page(page: dict[str, Any]) -> None:
    """A page of `GET /tasks`, and how to ask for the next one."""
    from rich import box
    from rich.table import Table

    out = console()
    # Narrow terminals get the essentials: the queue from 100 columns, the last error from 120.
    with_queue, with_error = out.width >= 100, out.width >= 120
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
        row: list[str | Text] = [task["id"], plain(task["name"]), styled(task["status"])]
        if with_queue:
            row.append(task["queue"])
        row += [str(task["attempt"]), task["created_at"].replace("T", " ")[5:19]]
        if with_error:
            error = (task.get("last_error") or "").strip()
            row.append(plain(error.splitlines()[0][:200] if error else ""))
        table.add_row(*row)
    out.print(table)
    if not page["tasks"]:
        out.print("no tasks")
    if page.get("next_cursor"):
        out.print(f"more: --cursor {page['next_cursor']}", soft_wrap=True)
