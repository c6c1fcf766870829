"""The scheduler's scans start where the live rows began last time (`scheduler.horizons`), and a
periodic full pass finds what committed behind them: no task is left behind for good."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from tests.helpers import new_task, task_row, to_started

from taskscheduler.scheduler import dispatch, rescue
from taskscheduler.scheduler.horizons import MARGIN_SEC, Horizons
from taskscheduler.scheduler.publisher import CeleryPublisher
from taskscheduler.scheduler.service import SchedulerService
from taskscheduler.scheduler.wakeup import Wakeup
from taskscheduler.store import db, sweeps


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def publisher(settings):
    from taskscheduler.broker import configure_celery

    configure_celery(settings)
    return CeleryPublisher(settings)


def _dispatch(settings, publisher, horizons: Horizons) -> int:
    horizons.begin_tick()
    return dispatch.run_once(database=db.database_for(), settings=settings, publisher=publisher, horizons=horizons)


def test_a_task_due_before_the_dispatch_horizon_is_dispatched_by_the_next_full_pass(settings, publisher):
    clock = Clock()
    horizons = Horizons(clock=clock, full_pass_every_sec=15)
    now = datetime.now(UTC)
    first = new_task(run_at=now - timedelta(seconds=1))
    assert _dispatch(settings, publisher, horizons) == 1
    assert horizons.due[5] == task_row(first)["run_at"] - timedelta(seconds=MARGIN_SEC)

    # Committed behind the horizon (its transaction took its time, say), and one within the margin.
    behind = new_task(run_at=now - timedelta(seconds=60))
    within = new_task(run_at=now - timedelta(seconds=1 + MARGIN_SEC / 2))
    assert _dispatch(settings, publisher, horizons) == 1
    assert task_row(within)["status"] == "ENQUEUED"
    assert task_row(behind)["status"] == "PENDING"

    clock.t += 15
    assert _dispatch(settings, publisher, horizons) == 1
    assert task_row(behind)["status"] == "ENQUEUED"
    assert horizons.full_passes == 2


def test_the_wakeup_sees_a_task_created_due_now_behind_a_later_one(settings):
    # A task due in an hour must not become the horizon: one created now is due before it.
    new_task(run_at=datetime.now(UTC) + timedelta(hours=1))
    horizons = Horizons()
    wakeup = Wakeup(settings, db.database_for(), horizons)
    assert wakeup._timeout(dispatched=False) == settings.poll_interval_sec
    assert horizons.due[5] <= datetime.now(UTC)
    due_now = new_task()
    with db.transaction() as conn:
        assert sweeps.seconds_until_next_due(conn, since=horizons.due) <= 0
        (item,) = sweeps.dispatch_due(conn, limit=10, since=horizons.due)
    assert item.id == due_now


def test_two_schedulers_with_their_own_horizons_dispatch_every_task_once(settings, publisher):
    # Each skips the rows the other holds (SKIP LOCKED) and moves its horizon past them: what the
    # other then leaves behind is for the full pass, and nothing is dispatched twice.
    now = datetime.now(UTC)
    tasks = [new_task(run_at=now - timedelta(seconds=30 - i)) for i in range(30)]
    a, b = Horizons(clock=Clock()), Horizons(clock=Clock())
    settings_small = settings.model_copy(update={"dispatch_batch_size": 4, "max_enqueued_per_queue": 1000})
    done = 0
    for _ in range(20):
        done += _dispatch(settings_small, publisher, a) + _dispatch(settings_small, publisher, b)
    assert done == 30
    assert all(task_row(t)["status"] == "ENQUEUED" and task_row(t)["attempt"] == 1 for t in tasks)


def test_the_stuck_sweep_from_its_horizon_still_finds_a_stuck_task(settings, publisher):
    horizons = Horizons()
    task = new_task()
    to_started(task)
    later = datetime.now(UTC) + timedelta(seconds=settings.heartbeat_timeout_sec + 5)
    counts = rescue.run_once(database=db.database_for(), settings=settings, publisher=publisher, now=later,
                             horizons=horizons)  # fmt: skip
    assert counts.retried == 1
    assert horizons.started is not None


def test_the_service_keeps_its_horizons_between_ticks(settings, publisher):
    service = SchedulerService(settings, publisher, database=db.database_for())
    new_task(run_at=datetime.now(UTC) - timedelta(seconds=1))
    assert service.tick() == 1
    assert 5 in service.horizons.due and service.horizons.enqueued is not None


def test_the_sweeps_full_pass_comes_every_minute_and_not_in_the_dispatchs_tick():
    clock = Clock()
    horizons = Horizons(clock=clock)
    at = datetime.now(UTC)
    horizons.begin_tick()
    horizons.oldest_enqueued(at)
    horizons.oldest_started(at)
    horizons.earliest_due({5: at})
    ticks_with_both = 0
    for _ in range(200):  # 100 s in 0.5 s ticks
        clock.t += 0.5
        passes = horizons.full_passes
        horizons.begin_tick()
        dispatch_full = horizons.full_passes > passes
        sweeps_full = horizons.enqueued is None
        ticks_with_both += dispatch_full and sweeps_full
        assert (horizons.started is None) == sweeps_full
        if sweeps_full:
            horizons.oldest_enqueued(at)
            horizons.oldest_started(at)
        if dispatch_full:
            assert horizons.due == {}
            horizons.earliest_due({5: at})
    assert horizons.full_passes == 1 + 100 // 15
    assert ticks_with_both == 0


def test_a_task_committed_behind_the_horizon_is_dispatched_at_once_because_its_notification_says_when(
    settings, publisher
):
    # An application's transaction took now() a minute ago and commits only now: its task is due far
    # behind the dispatch horizon. The notification it sends at commit carries that run_at, and the
    # next dispatch (no full pass: the clock has not moved) looks from there.
    clock = Clock()
    horizons = Horizons(clock=clock, full_pass_every_sec=15)
    wakeup = Wakeup(settings.model_copy(update={"poll_interval_sec": 5.0}), db.database_for(), horizons)
    try:
        wakeup._listening()
        assert _dispatch(settings, publisher, horizons) == 0
        new_task(run_at=datetime.now(UTC) - timedelta(seconds=1))
        wakeup.wait()
        assert _dispatch(settings, publisher, horizons) == 1
        passes = horizons.full_passes
        behind = new_task(run_at=datetime.now(UTC) - timedelta(seconds=60))
        wakeup.wait()
        assert horizons.due[5] <= task_row(behind)["run_at"] - timedelta(seconds=MARGIN_SEC)
        assert _dispatch(settings, publisher, horizons) == 1
        assert task_row(behind)["status"] == "ENQUEUED"
        assert horizons.full_passes == passes
    finally:
        wakeup.close()


def test_a_notification_without_a_time_drops_the_dispatch_bounds():
    # From a sender that predates the run_at in the payload: the next dispatch scans from the start.
    horizons = Horizons()
    at = datetime.now(UTC)
    horizons.earliest_due({5: at, 7: at})
    horizons.due_notified(at - timedelta(seconds=10))
    assert horizons.due == dict.fromkeys((5, 7), at - timedelta(seconds=10 + MARGIN_SEC))
    horizons.due_notified(at)  # later than the bounds: they stay
    assert horizons.due[5] == at - timedelta(seconds=10 + MARGIN_SEC)
    horizons.due_notified(None)
    assert horizons.due == {}
