"""How every command fails: one line on stderr (`error: ...`; `configuration error: ...` for the
settings), never a traceback or a usage box, and an exit code that says whose move it is."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

EXIT_FAILURE = 1  # the command was right but did not succeed: an HTTP error, an unreachable server, unhealthy
EXIT_USAGE = 2  # the command line or the configuration is wrong: running it again as it is cannot help


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


class OneLineErrors(TyperGroup):
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
