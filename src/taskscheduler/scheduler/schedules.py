"""Recurring schedules: create the tasks of the fires that are due, and upsert the schedules declared
in code.

One transaction per batch: lock the due schedules (SKIP LOCKED, so several schedulers share them),
plan each one's fires on the database clock (catch-up window, overlap policy), insert their tasks,
advance the schedules. A scheduler killed in between leaves nothing half done (the transaction rolls
back and another scheduler fires the schedule), and the unique (schedule_id, scheduled_for) index
keeps a fire that was already made from being made again, whatever else went wrong.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from taskscheduler import handlers, metrics
from taskscheduler.config import Settings
from taskscheduler.schedule_spec import Overlap, Plan, State, plan
from taskscheduler.store import fires
from taskscheduler.store import schedules as schedule_store
from taskscheduler.store.db import Database

log = logging.getLogger(__name__)

# Schedules one batch takes at most.
BATCH_SIZE = 500
# Batches one tick takes at most, so that the rest of the tick still runs under a pile of due schedules.
MAX_BATCHES_PER_TICK = 20
# Test-only fault point (FAULT_POINT): the scheduler is SIGKILLed after inserting a batch's tasks and
# before advancing its schedules.
FAULT_AFTER_INSERT = "schedule_after_insert"


@dataclass(frozen=True)
class ScheduleCounts:
    schedules: int = 0
    fired: int = 0
    skipped: int = 0
    missed: int = 0

    def __bool__(self) -> bool:
        return any((self.fired, self.skipped, self.missed))

    def __add__(self, other: ScheduleCounts) -> ScheduleCounts:
        return ScheduleCounts(
            self.schedules + other.schedules,
            self.fired + other.fired,
            self.skipped + other.skipped,
            self.missed + other.missed,
        )


def _state(row: Any) -> State:
    return State(
        next_fire_at=row["next_fire_at"],
        buffered_for=row["buffered_for"],
        busy=bool(row["busy"]),
        overlap=Overlap(row["overlap"]),
        catchup_window_sec=row["catchup_window_sec"],
    )


def run_once(
    *, database: Database, settings: Settings, now: datetime | None = None, batch_size: int = BATCH_SIZE
) -> ScheduleCounts:
    """Fire one batch of due schedules (at most `batch_size`). `now` (tests): the database clock otherwise."""
    with database.transaction() as conn:
        rows = fires.lock_due(conn, limit=batch_size, now=now)
        if not rows:
            return ScheduleCounts()
        plans = []
        to_fire: list[fires.Fire] = []
        for row in rows:
            try:
                fire_plan = plan(schedule_store.spec_of(row), _state(row), row["db_now"])
            except ValueError as exc:
                # A row the API would have refused (written by hand, or by an older version): paused
                # with the reason, rather than failing every batch it is in, forever.
                schedule_store.pause(conn, row["id"], f"paused: cannot compute its fire times: {exc}"[:1000])
                log.error("schedule %r paused: %s", row["name"], exc, extra={"event": "schedule_invalid"})
                continue
            plans.append((row, fire_plan))
            to_fire += [fires.fire_of(row, t) for t in fire_plan.fires]
        created = fires.create_fired_tasks(conn, to_fire)
        if settings.fault_point == FAULT_AFTER_INSERT and created:
            os.kill(os.getpid(), signal.SIGKILL)
        fired_per_schedule: dict[Any, list[datetime]] = {}
        for task in created:
            fired_per_schedule.setdefault(task.schedule_id, []).append(task.scheduled_for)
        advances = [_advance(row, fire_plan, fired_per_schedule.get(row["id"], [])) for row, fire_plan in plans]
        fires.advance(conn, advances)
    counts = ScheduleCounts(
        schedules=len(rows),
        fired=len(created),
        skipped=sum(a.skipped for a in advances),
        missed=sum(a.missed for a in advances),
    )
    for outcome, n in (("fired", counts.fired), ("skipped", counts.skipped), ("missed", counts.missed)):
        if n:
            metrics.SCHEDULE_FIRES.labels(outcome=outcome).inc(n)
    return counts


def _advance(row: Any, fire_plan: Plan, fired: list[datetime]) -> fires.Advance:
    last_skip = fire_plan.last_skip
    return fires.Advance(
        id=row["id"],
        next_fire_at=fire_plan.next_fire_at,
        buffered_for=fire_plan.buffered_for,
        last_fire_at=max(fire_plan.fires) if fire_plan.fires else None,
        fired=len(fired),
        skipped=len(fire_plan.skipped),
        missed=fire_plan.missed,
        last_skipped_at=last_skip[0] if last_skip else None,
        last_skip_reason=last_skip[1].value if last_skip else None,
    )


def run_due(
    *, database: Database, settings: Settings, should_stop: Callable[[], bool] = lambda: False
) -> ScheduleCounts:
    """Batches until no schedule is due (at most MAX_BATCHES_PER_TICK); logs what it did."""
    total = ScheduleCounts()
    for _ in range(MAX_BATCHES_PER_TICK):
        counts = run_once(database=database, settings=settings)
        total += counts
        if counts.schedules < BATCH_SIZE or should_stop():
            break
    if total:
        log.info(
            "schedules: %d tasks created, %d fires skipped (overlap), %d missed",
            total.fired,
            total.skipped,
            total.missed,
            extra={"event": "schedules", "count": total.fired},
        )
    return total


# --- schedules declared in code -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyncCounts:
    created: int = 0
    updated: int = 0
    paused: int = 0


def sync_code_schedules(
    declarations: list[handlers.ScheduleDeclaration], *, database: Database, now: datetime | None = None
) -> SyncCounts:
    """Upsert the schedules declared in code (by name) and pause the code schedules no longer declared.

    One scheduler at a time (an advisory lock): the others wait, then find everything in place. A
    schedule of that name created through the API is left alone (and said so in the log). A declared
    schedule paused because it had been removed from the code is resumed.
    """
    created = updated = 0
    with database.transaction() as conn:
        schedule_store.lock_code_sync(conn)
        for declared in declarations:
            if handlers.get_handler(declared.task) is None:
                log.error(
                    "schedule %r not synced: no handler is registered as %r",
                    declared.name,
                    declared.task,
                    extra={"event": "code_schedule_invalid"},
                )
                continue
            fields = declared.fields()
            current = schedule_store.get_schedule(conn, declared.name, lock=True)
            if current is None:
                schedule_store.create_schedule(conn, fields, source="code", now=now)
                created += 1
                continue
            if current["source"] != "code":
                log.warning(
                    "schedule %r is declared in code but was created through the API: left as it is",
                    declared.name,
                    extra={"event": "code_schedule_conflict"},
                )
                continue
            changes = {k: v for k, v in fields.items() if current[k] != v}
            if current["paused"] and current["note"] == schedule_store.REMOVED_FROM_CODE:
                changes |= {"paused": False, "note": None}
            if changes:
                was_paused = current["paused"]
                row = schedule_store.update_schedule(conn, current, changes, now=now)
                if was_paused and not row["paused"]:
                    schedule_store.resume(conn, row, now=now)
                updated += 1
        paused = schedule_store.pause_undeclared(conn, [d.name for d in declarations])
    for name in paused:
        log.info("schedule %r paused: no longer declared in code", name, extra={"event": "code_schedule_paused"})
    if created or updated:
        log.info("code schedules: %d created, %d updated", created, updated, extra={"event": "code_schedules"})
    return SyncCounts(created=created, updated=updated, paused=len(paused))


class ScheduleStep:
    """The scheduler loop's part: upsert the code schedules once (again at each tick until that
    worked: the database may be away at start), then fire what is due."""

    def __init__(self, settings: Settings, database: Database) -> None:
        self.settings = settings
        self.database = database
        self._synced = False
        self._declarations: list[handlers.ScheduleDeclaration] | None = None

    def _load(self) -> list[handlers.ScheduleDeclaration] | None:
        try:
            handlers.load_task_modules(self.settings.task_module_list)
        except RuntimeError as exc:
            # Without the modules the declarations are unknown: pausing every code schedule as
            # "removed" would be wrong, so nothing is synced.
            log.error("code schedules not synced: %s", exc, extra={"event": "code_schedules_failed"})
            return None
        return handlers.declared_schedules()

    def tick(self, should_stop: Callable[[], bool] = lambda: False) -> ScheduleCounts:
        if not self._synced:
            if self._declarations is None:
                self._declarations = self._load()
            if self._declarations is not None:
                sync_code_schedules(self._declarations, database=self.database)
            self._synced = True
        return run_due(database=self.database, settings=self.settings, should_stop=should_stop)
