"""What the store's statements share, and how they are written.

Every statement is a public module-level constant of its section (`create.CREATE_TASKS`,
`transitions.CLAIM`, `sweeps.DISPATCH_DUE`, ...), in psycopg's `%(name)s` parameter style, with one
text for both paths: the sync one runs it on a SQLAlchemy Connection as
`conn.exec_driver_sql(STATEMENT, params)`, the async one on a psycopg AsyncConnection as
`await conn.execute(STATEMENT, params)`. JSON values go in wrapped as `Jsonb(value)`. Print a
statement to read it; `benchmarks/scale.py` EXPLAINs them by name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from taskscheduler.lifecycle import TaskStatus

# The database clock decides every time question; tests pass an explicit `now` to travel in time.
NOW = "COALESCE(CAST(%(now)s AS timestamptz), now())"

_PARAMETER = re.compile(r"%\((\w+)\)s")


def status_guard(column: str, status: TaskStatus) -> str:
    """`column = 'STATUS'` for a row already found by its primary key.

    Written as `(...) IS TRUE` so that no index on the status can serve it: with statistics taken
    when, say, no task was ENQUEUED, the planner would otherwise walk a status index (or a partial
    index on that status) and read every row in that status for each single-row transition.
    """
    return f"({column} = '{status.value}') IS TRUE"


def in_list(statuses: Iterable[TaskStatus]) -> str:
    """`'A', 'B'` for `status IN (...)`: constants, so that a partial index on them can serve it."""
    return ", ".join(f"'{s.value}'" for s in sorted(statuses))


def parameters(statement: str) -> list[str]:
    """The names of a statement's parameters, each once, in the order they first appear."""
    return list(dict.fromkeys(_PARAMETER.findall(statement)))


def named_style(statement: str) -> str:
    """`statement` with `:name` parameters, for SQLAlchemy's `text()`: the same statement for a
    caller's connection of any driver (psycopg, psycopg2, asyncpg), each in its own style."""
    return _PARAMETER.sub(r":\1", statement)
