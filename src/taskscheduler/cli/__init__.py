"""The `taskscheduler` command: one CLI, one role per subcommand (`roles`), and the commands people
type against the API (`tasks`)."""

from __future__ import annotations

import typer

from taskscheduler.cli import roles, tasks
from taskscheduler.cli.errors import OneLineErrors

app = typer.Typer(
    cls=OneLineErrors,
    help="A fault-tolerant distributed task scheduler.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(roles.app)
app.add_typer(tasks.app)


def main() -> None:
    app()
