"""The schedule step against real PostgreSQL, with time injected: catch-up after downtime, the overlap
policies, end_at, pause/resume, backfill meeting live fires, code schedules upserted by racing schedulers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import text
from tests.helpers import dispatch_all

from taskscheduler import handlers
from taskscheduler.config import Settings
from taskscheduler.lifecycle import TaskStatus
from taskscheduler.scheduler import schedules as step
from taskscheduler.store import db, operations, transitions
from taskscheduler.store import schedules as schedule_store

T0 = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)  # a Monday, on the minute; in the past, so its tasks are due


def make_schedule(now: datetime = T0 - timedelta(seconds=1), **fields: Any) -> dict[str, Any]:
    fields = {"name": "s1", "task": "demo_ok", "priority": 5, "max_retries": 0, "overlap": "allow"} | fields
    if "cron" not in fields and "every_sec" not in fields:
        fields["cron"] = "* * * * *"
    with db.transaction() as conn:
        return dict(schedule_store.create_schedule(conn, fields, now=now))


def schedule_row(name: str = "s1") -> dict[str, Any]:
    with db.transaction() as conn:
        row = schedule_store.get_schedule(conn, name)
    assert row is not None
    return dict(row)


def fire_times(name: str = "s1") -> list[datetime]:
    with db.transaction() as conn:
        return list(
            conn.execute(
                text(
                    "SELECT t.scheduled_for FROM tasks t JOIN schedules s ON s.id = t.schedule_id"
                    " WHERE s.name = :name ORDER BY t.scheduled_for"
                ),
                {"name": name},
            ).scalars()
        )


def finish_all() -> None:
    """Every task of every schedule through ENQUEUED and STARTED to SUCCEEDED, by the store's transitions."""
    for item in dispatch_all():
        with db.transaction() as conn:
            assert transitions.claim(conn, task_id=item.id, attempt=item.attempt) is not None
            assert transitions.succeed(conn, task_id=item.id, attempt=item.attempt, result=None)


def tick(settings: Settings, now: datetime) -> step.ScheduleCounts:
    return step.run_once(database=db.database_for(), settings=settings, now=now)


def sync(declared: list[handlers.ScheduleDeclaration]) -> step.SyncCounts:
    return step.sync_code_schedules(declared, database=db.database_for(), now=T0)


def at_once(action: Callable[[], object], n: int) -> None:
    """`action` in `n` threads released together (real connections, real races); none may raise."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(n)

    def run() -> None:
        try:
            barrier.wait()
            action()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_a_new_schedule_fires_at_its_first_fire_time_after_creation(settings):
    row = make_schedule(now=T0 + timedelta(seconds=10))
    assert row["next_fire_at"] == T0 + timedelta(minutes=1)
    assert tick(settings, T0 + timedelta(seconds=59)).schedules == 0
    counts = tick(settings, T0 + timedelta(minutes=1, milliseconds=5))
    assert (counts.fired, counts.skipped, counts.missed) == (1, 0, 0)
    assert fire_times() == [T0 + timedelta(minutes=1)]
    again = schedule_row()
    assert again["next_fire_at"] == T0 + timedelta(minutes=2)
    assert again["last_fire_at"] == T0 + timedelta(minutes=1) and again["fires"] == 1


def test_tasks_of_a_schedule_carry_its_fields_and_their_creation_event(settings):
    make_schedule(payload={"k": 1}, priority=9, max_retries=2, timeout_sec=30.0, jitter_sec=10.0)
    tick(settings, T0)
    with db.transaction() as conn:
        task = conn.execute(text("SELECT * FROM tasks")).mappings().one()
        event = operations.list_events(conn, task["id"])
    assert (task["name"], task["payload"], task["priority"], task["queue"]) == ("demo_ok", {"k": 1}, 9, "high")
    assert (task["max_retries"], task["timeout_sec"], task["status"]) == (2, 30.0, "PENDING")
    assert task["scheduled_for"] == T0
    # Jitter: within [0, 10 s], and the same whenever the fire is derived again.
    delay = (task["run_at"] - task["scheduled_for"]).total_seconds()
    assert 0 <= delay <= 10
    from taskscheduler.schedule_spec import jitter_sec

    assert delay == pytest.approx(jitter_sec(task["schedule_id"], task["scheduled_for"], 10.0), abs=1e-5)
    assert [(e["from_status"], e["to_status"]) for e in event] == [(None, "PENDING")]


def test_downtime_fires_the_last_fire_times_within_the_window_and_counts_the_rest_missed(settings):
    # A 1-minute schedule, a 5-minute window, the scheduler away for 10 minutes.
    make_schedule(catchup_window_sec=300)
    tick(settings, T0 + timedelta(minutes=1))
    counts = tick(settings, T0 + timedelta(minutes=11, seconds=30))
    assert (counts.fired, counts.missed) == (5, 5)
    assert fire_times()[2:] == [T0 + timedelta(minutes=m) for m in range(7, 12)]
    row = schedule_row()
    assert (row["fires"], row["misses"], row["skips"]) == (7, 5, 0)
    assert row["last_skipped_at"] == T0 + timedelta(minutes=6) and row["last_skip_reason"] == "missed"
    assert row["next_fire_at"] == T0 + timedelta(minutes=12)


def test_overlap_skip_fires_only_once_the_previous_task_finished(settings):
    make_schedule(every_sec=1, cron=None, overlap="skip", start_at=T0)
    assert tick(settings, T0).fired == 1
    for s in range(1, 5):
        counts = tick(settings, T0 + timedelta(seconds=s))
        assert (counts.fired, counts.skipped) == (0, 1)
    finish_all()
    assert tick(settings, T0 + timedelta(seconds=5)).fired == 1
    assert fire_times() == [T0, T0 + timedelta(seconds=5)]
    row = schedule_row()
    assert (row["fires"], row["skips"], row["last_skip_reason"]) == (2, 4, "overlap")
    assert row["last_skipped_at"] == T0 + timedelta(seconds=4)


def test_overlap_buffer_one_keeps_one_fire_waiting_for_the_running_task(settings):
    make_schedule(every_sec=1, cron=None, overlap="buffer_one", start_at=T0)
    tick(settings, T0)
    assert tick(settings, T0 + timedelta(seconds=1)).skipped == 0  # buffered
    assert tick(settings, T0 + timedelta(seconds=2)).skipped == 1
    assert schedule_row()["buffered_for"] == T0 + timedelta(seconds=1)
    assert len(fire_times()) == 1
    finish_all()
    # The buffered fire goes as soon as its predecessor finished, even between fire times.
    counts = tick(settings, T0 + timedelta(seconds=2, milliseconds=500))
    assert counts.fired == 1
    assert fire_times() == [T0, T0 + timedelta(seconds=1)]
    assert schedule_row()["buffered_for"] is None


def test_overlap_allow_fires_every_time(settings):
    make_schedule(every_sec=1, cron=None, overlap="allow", start_at=T0)
    for s in range(5):
        tick(settings, T0 + timedelta(seconds=s))
    assert fire_times() == [T0 + timedelta(seconds=s) for s in range(5)]


def test_a_schedule_stops_at_end_at(settings):
    make_schedule(every_sec=60, cron=None, start_at=T0, end_at=T0 + timedelta(minutes=2))
    tick(settings, T0 + timedelta(minutes=3))
    assert fire_times() == [T0, T0 + timedelta(minutes=1), T0 + timedelta(minutes=2)]
    assert schedule_row()["next_fire_at"] is None
    assert tick(settings, T0 + timedelta(minutes=20)).schedules == 0


def test_pause_and_resume(settings):
    row = make_schedule()
    with db.transaction() as conn:
        schedule_store.pause(conn, row["id"], "maintenance")
    assert tick(settings, T0 + timedelta(minutes=5)).schedules == 0
    assert schedule_row()["note"] == "maintenance"
    with db.transaction() as conn:
        current = schedule_store.get_schedule(conn, "s1")
        resumed = schedule_store.resume(conn, current, now=T0 + timedelta(minutes=5, seconds=1))
    # What fell due while paused is neither run nor counted missed.
    assert resumed["next_fire_at"] == T0 + timedelta(minutes=6)
    counts = tick(settings, T0 + timedelta(minutes=6))
    assert (counts.fired, counts.missed) == (1, 0)
    assert fire_times() == [T0 + timedelta(minutes=6)]


def test_two_ticks_at_once_fire_each_time_once(settings):
    make_schedule(every_sec=1, cron=None, start_at=T0)
    at_once(lambda: tick(settings, T0 + timedelta(seconds=60)), 4)
    assert fire_times() == [T0 + timedelta(seconds=s) for s in range(61)]


def test_a_fire_made_already_is_not_made_again(settings):
    """As after a crash between the insert and the advance: the schedule still points at fires that
    have their task; the tick makes none of them again and moves on."""
    make_schedule()
    tick(settings, T0 + timedelta(minutes=3))
    with db.transaction() as conn:
        conn.execute(text("UPDATE schedules SET next_fire_at = :t"), {"t": T0 + timedelta(minutes=1)})
    counts = tick(settings, T0 + timedelta(minutes=4))
    assert counts.fired == 1
    assert fire_times() == [T0 + timedelta(minutes=m) for m in range(5)]


def test_code_schedules_are_upserted_by_racing_schedulers_and_paused_when_removed(settings, monkeypatch):
    declared = [
        handlers.ScheduleDeclaration(name="nightly", task="demo_ok", cron="0 3 * * *", timezone="Europe/Berlin"),
        handlers.ScheduleDeclaration(name="often", task="demo_ok", every_sec=30),
    ]
    at_once(lambda: sync(declared), 3)
    with db.transaction() as conn:
        rows = {r["name"]: r for r in schedule_store.list_schedules(conn, limit=10)}
    assert set(rows) == {"nightly", "often"}
    assert {r["source"] for r in rows.values()} == {"code"}
    assert rows["nightly"]["next_fire_at"] == datetime(2025, 1, 7, 2, 0, tzinfo=UTC)  # 03:00 in Berlin

    # The same declarations again: nothing changes. A changed one is updated; a removed one paused.
    assert sync(declared) == step.SyncCounts()
    changed = [handlers.ScheduleDeclaration(name="nightly", task="demo_ok", cron="0 4 * * *", timezone="Europe/Berlin")]
    assert sync(changed) == step.SyncCounts(updated=1, paused=1)
    often = schedule_row("often")
    assert often["paused"] and often["note"] == schedule_store.REMOVED_FROM_CODE
    assert schedule_row("nightly")["next_fire_at"] == datetime(2025, 1, 7, 3, 0, tzinfo=UTC)
    # Declared again: resumed.
    assert sync(declared).updated == 2
    assert not schedule_row("often")["paused"]


def test_a_code_declaration_leaves_an_api_schedule_of_its_name_alone(settings):
    make_schedule(name="nightly", cron="0 1 * * *")
    declared = [handlers.ScheduleDeclaration(name="nightly", task="demo_ok", cron="0 3 * * *")]
    assert sync(declared) == step.SyncCounts()
    row = schedule_row("nightly")
    assert (row["cron"], row["source"]) == ("0 1 * * *", "api")


def test_finished_statuses_count_as_finished_for_overlap(settings):
    make_schedule(every_sec=1, cron=None, overlap="skip", start_at=T0)
    tick(settings, T0)
    with db.transaction() as conn:
        task_id = conn.execute(text("SELECT id FROM tasks")).scalar_one()
        assert operations.cancel(conn, task_id).status == TaskStatus.CANCELLED
    assert tick(settings, T0 + timedelta(seconds=1)).fired == 1


def test_a_schedule_whose_fire_times_cannot_be_computed_is_paused_and_the_others_fire(settings):
    make_schedule(name="broken")
    make_schedule(name="fine")
    with db.transaction() as conn:  # as written by hand, past the API's checks
        conn.execute(text("UPDATE schedules SET timezone = 'Mars/Olympus' WHERE name = 'broken'"))
    counts = tick(settings, T0)
    assert counts.fired == 1 and fire_times("fine") == [T0]
    broken = schedule_row("broken")
    assert broken["paused"] and "unknown time zone" in broken["note"]


BERLIN = ZoneInfo("Europe/Berlin")


def run_hourly(settings: Settings, start: datetime, hours: int) -> None:
    """A scheduler ticking every 10 minutes from `start` for `hours` (time injected)."""
    for n in range(hours * 6 + 1):
        tick(settings, start + timedelta(minutes=10 * n))


@pytest.mark.parametrize(
    ("day", "expected"),
    [
        # Spring-forward: 02:30 does not exist; it fires once, right after the jump.
        (datetime(2025, 3, 29, 12, tzinfo=UTC), ["2025-03-30T03:00:00+02:00", "2025-03-31T02:30:00+02:00"]),
        # Fall-back: 02:30 happens twice; it fires once.
        (datetime(2025, 10, 25, 12, tzinfo=UTC), ["2025-10-26T02:30:00+02:00", "2025-10-27T02:30:00+01:00"]),
    ],
)
def test_a_berlin_nightly_schedule_across_dst_through_the_scheduler(settings, day, expected):
    make_schedule(now=day, cron="30 2 * * *", timezone="Europe/Berlin", overlap="allow")
    run_hourly(settings, day, 48)
    assert [t.astimezone(BERLIN).isoformat() for t in fire_times()] == expected


def test_an_hourly_schedule_fires_25_times_on_the_fall_back_day(settings):
    midnight = datetime(2025, 10, 26, tzinfo=BERLIN).astimezone(UTC)
    make_schedule(now=midnight - timedelta(seconds=1), cron="0 * * * *", timezone="Europe/Berlin", overlap="allow")
    run_hourly(settings, midnight, 25)
    times = [t for t in fire_times() if t.astimezone(BERLIN).date() == midnight.astimezone(BERLIN).date()]
    assert len(times) == 25
    assert all(b - a == timedelta(hours=1) for a, b in pairwise(times))
