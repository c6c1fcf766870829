"""The `taskscheduler` command: one CLI, one role per subcommand (`roles`), and the commands people
type against the API (`tasks`, `schedules`)."""

from __future__ import annotations

import typer

from taskscheduler.cli import roles, schedules, tasks
from taskscheduler.cli.errors import OneLineErrors

app = typer.Typer(
    cls=OneLineErrors,
    help="A fault-tolerant distributed task scheduler.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(roles.app)
app.add_typer(tasks.app)
app.add_typer(schedules.app, name="schedules", rich_help_panel=tasks.PANEL)


def main() -> None:
    app()
