"""The scheduler's steps, called directly with `now` (no sleeping) and the real Celery publisher."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from tests.helpers import (
    backdate,
    events,
    free_port,
    new_task,
    queued,
    queued_attempts,
    task_row,
    to_dead,
    to_started,
    wait_until,
)

from taskscheduler.scheduler import dispatch, rescue
from taskscheduler.scheduler.publisher import CeleryPublisher
from taskscheduler.scheduler.service import SchedulerService
from taskscheduler.store import creation, db, sweeps, transitions
from taskscheduler.store.db import Database

NOW = datetime.now(UTC)


def _db() -> Database:
    """The test run's database, as the scheduler's steps take it."""
    return db.database_for()


@pytest.fixture
def publisher(settings):
    from taskscheduler.broker import configure_celery

    configure_celery(settings)
    return CeleryPublisher(settings)


def test_dispatch_publishes_due_tasks_priority_first_then_run_at(settings, publisher, redis_client, services):
    low_early = new_task(priority=5, run_at=NOW - timedelta(seconds=30))
    high_late = new_task(priority=9, run_at=NOW - timedelta(seconds=10))
    high_early = new_task(priority=10, run_at=NOW - timedelta(seconds=20))
    mid = new_task(priority=6, run_at=NOW - timedelta(seconds=40))
    not_due = new_task(priority=10, run_at=NOW + timedelta(seconds=5))

    assert dispatch.run_once(database=_db(), settings=settings, publisher=publisher, now=NOW) == 4
    order = [r[0] for r in _dispatch_order()]
    assert order == [str(high_early), str(high_late), str(mid), str(low_early)]
    prefix = services.redis_key_prefix
    assert queued_attempts(redis_client, prefix, "high") == [(str(high_early), 1), (str(high_late), 1)]
    assert queued_attempts(redis_client, prefix, "default") == [(str(mid), 1), (str(low_early), 1)]
    assert task_row(not_due)["status"] == "PENDING"
    # At the not-due task's run_at it goes too.
    assert (
        dispatch.run_once(database=_db(), settings=settings, publisher=publisher, now=NOW + timedelta(seconds=5)) == 1
    )


def test_dispatch_batch_is_bounded(settings, publisher, monkeypatch):
    monkeypatch.setattr(settings, "dispatch_batch_size", 3)
    for _ in range(5):
        new_task(run_at=NOW - timedelta(seconds=1))
    assert dispatch.run_once(database=_db(), settings=settings, publisher=publisher, now=NOW) == 3
    assert dispatch.run_once(database=_db(), settings=settings, publisher=publisher, now=NOW) == 2
    assert dispatch.run_once(database=_db(), settings=settings, publisher=publisher, now=NOW) == 0


def test_dispatch_uses_the_database_clock_by_default(settings, publisher):
    due = new_task()
    future = new_task(run_at=datetime.now(UTC) + timedelta(minutes=10))
    assert dispatch.run_once(database=_db(), settings=settings, publisher=publisher) == 1
    assert task_row(due)["status"] == "ENQUEUED" and task_row(future)["status"] == "PENDING"


def test_stuck_by_heartbeat_is_retried(settings, publisher):
    task_id = new_task(max_retries=2)
    to_started(task_id)
    now = datetime.now(UTC)
    assert rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=now) == rescue.RescueCounts()
    backdate(task_id, heartbeat_at=timedelta(seconds=settings.heartbeat_timeout_sec + 1))
    counts = rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=now)
    assert counts.retried == 1 and counts.dead == 0
    row = task_row(task_id)
    assert row["status"] == "FAILED" and "no heartbeat" in row["last_error"]
    assert events(task_id)[-1] == ("STARTED", "FAILED", 1)


def test_stuck_by_timeout_with_no_retries_is_dead_and_sent_to_the_dlq(settings, publisher, redis_client, services):
    task_id = new_task(max_retries=0, timeout_sec=30)
    to_started(task_id)
    backdate(task_id, started_at=timedelta(seconds=20))
    assert rescue.run_once(database=_db(), settings=settings, publisher=publisher).dead == 0
    backdate(task_id, started_at=timedelta(seconds=11))
    counts = rescue.run_once(database=_db(), settings=settings, publisher=publisher)
    assert counts.dead == 1
    row = task_row(task_id)
    assert row["status"] == "DEAD" and row["dead_reason"] == "stuck_task_timeout"
    assert "timeout" in row["last_error"]
    (msg,) = queued(redis_client, services.redis_key_prefix, "dlq")
    assert msg[:4] == (str(task_id), 1, "demo_ok", "stuck_task_timeout")


def test_stuck_uses_the_default_timeout_when_the_task_has_none(settings, publisher):
    task_id = new_task(max_retries=1)
    to_started(task_id)
    now = datetime.now(UTC)
    # Keep the heartbeat fresh: only the run time can make it stuck.
    assert (
        rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=now + timedelta(seconds=1)).retried
        == 0
    )
    backdate(task_id, started_at=timedelta(seconds=settings.stuck_after_sec + 1))
    assert rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=now).retried == 1
    assert "timeout" in task_row(task_id)["last_error"]


def test_lost_enqueued_message_is_published_again_with_the_same_attempt(settings, publisher, redis_client, services):
    task_id = new_task()
    assert dispatch.run_once(database=_db(), settings=settings, publisher=publisher) == 1
    redis_client.delete(f"{services.redis_key_prefix}default")  # the broker lost the message
    now = datetime.now(UTC)
    assert rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=now).republished == 0
    later = now + timedelta(seconds=settings.enqueue_timeout_sec + 1)
    assert rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=later).republished == 1
    assert queued_attempts(redis_client, services.redis_key_prefix, "default") == [(str(task_id), 1)]
    row = task_row(task_id)
    assert row["status"] == "ENQUEUED" and row["attempt"] == 1
    # published_at moved: the same sweep does not publish it again at once.
    assert rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=later).republished == 0


def test_dead_without_dlq_row_is_published_to_the_dlq_again(settings, publisher, redis_client, services):
    task_id = new_task()
    attempt = to_dead(task_id)
    now = datetime.now(UTC)
    assert rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=now).dlq_republished == 0
    later = now + timedelta(seconds=settings.enqueue_timeout_sec + 1)
    assert rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=later).dlq_republished == 1
    (msg,) = queued(redis_client, services.redis_key_prefix, "dlq")
    assert msg[:4] == (str(task_id), attempt, "demo_ok", "max_retries_exceeded")

    from taskscheduler.worker import record_dead

    assert record_dead(*msg) is True
    assert record_dead(*msg) is False  # duplicate delivery writes nothing more
    later2 = later + timedelta(seconds=settings.enqueue_timeout_sec + 1)
    assert rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=later2).dlq_republished == 0


def test_two_dispatchers_racing_claim_each_task_exactly_once(settings, publisher, monkeypatch):
    monkeypatch.setattr(settings, "dispatch_batch_size", 50)
    with db.transaction() as conn:
        conn.execute(
            text(
                "INSERT INTO tasks (id, name, priority, queue, status, run_at, max_retries)"
                " SELECT gen_random_uuid(), 'demo_ok', 5, 'default', 'PENDING', now() - interval '1 second', 3"
                " FROM generate_series(1, 1000)"
            )
        )
    claimed: list[list[sweeps.Dispatched]] = [[], []]
    barrier = threading.Barrier(2)

    class Recording(CeleryPublisher):
        def __init__(self, slot: list[sweeps.Dispatched]) -> None:
            super().__init__(settings)
            self.slot = slot

        def publish_attempts(self, items):
            self.slot.extend(items)
            return super().publish_attempts(items)

    def run(i: int) -> None:
        pub = Recording(claimed[i])
        barrier.wait()
        while dispatch.run_once(database=_db(), settings=settings, publisher=pub):
            pass

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    ids = [d.id for d in claimed[0] + claimed[1]]
    assert len(ids) == 1000 and len(set(ids)) == 1000
    assert all(d.attempt == 1 for d in claimed[0] + claimed[1])
    assert claimed[0] and claimed[1], "both dispatchers should have taken part"
    with db.transaction() as conn:
        counts = conn.execute(
            text("SELECT count(*) FROM task_events WHERE to_status = 'ENQUEUED' GROUP BY task_id HAVING count(*) > 1")
        ).all()
        statuses = conn.execute(text("SELECT status, count(*) FROM tasks GROUP BY status")).all()
    assert counts == []
    assert statuses == [("ENQUEUED", 1000)]


def _dispatch_order():
    with db.transaction() as conn:
        query = "SELECT task_id::text FROM task_events WHERE to_status = 'ENQUEUED' ORDER BY id"
        return conn.execute(text(query)).all()


def test_back_pressure_holds_tasks_of_a_full_queue_in_pending(settings, publisher, monkeypatch):
    monkeypatch.setattr(settings, "max_enqueued_per_queue", 3)
    defaults = [new_task(priority=5) for _ in range(5)]
    highs = [new_task(priority=9) for _ in range(2)]
    assert dispatch.run_once(database=_db(), settings=settings, publisher=publisher) == 5  # 3 default + 2 high
    assert sum(task_row(t)["status"] == "ENQUEUED" for t in defaults) == 3
    assert all(task_row(t)["status"] == "ENQUEUED" for t in highs)
    assert dispatch.run_once(database=_db(), settings=settings, publisher=publisher) == 0  # the default queue is full
    # A worker claims one: room for one more.
    claimed = next(t for t in defaults if task_row(t)["status"] == "ENQUEUED")
    with db.transaction() as conn:
        assert transitions.claim(conn, task_id=claimed, attempt=1) is not None
    assert dispatch.run_once(database=_db(), settings=settings, publisher=publisher) == 1


def test_seconds_until_next_due(settings):
    with db.transaction() as conn:
        assert sweeps.seconds_until_next_due(conn) is None
    new_task(run_at=datetime.now(UTC) + timedelta(seconds=30))
    with db.transaction() as conn:
        assert 28 < sweeps.seconds_until_next_due(conn) <= 30
    new_task()
    with db.transaction() as conn:
        assert sweeps.seconds_until_next_due(conn) <= 0


def test_creating_a_task_due_now_notifies_the_scheduler(settings, services):
    import psycopg

    from taskscheduler.store.db import libpq_url

    with psycopg.connect(libpq_url(services.database_url), autocommit=True) as listener:
        listener.execute(f"LISTEN {creation.DUE_CHANNEL}")
        new_task(run_at=datetime.now(UTC) + timedelta(hours=1))  # not due: no notification
        assert list(listener.notifies(timeout=0.5)) == []
        task = new_task()
        (note,) = list(listener.notifies(timeout=5, stop_after=1))
        assert note.channel == creation.DUE_CHANNEL
        # It says when the task is due (the scheduler's dispatch horizon moves back to it).
        assert creation.notified_due_at(note.payload) == task_row(task)["run_at"]


def test_the_scheduler_wakes_for_a_task_due_now_instead_of_sleeping_its_poll_interval(settings, monkeypatch):
    from taskscheduler.scheduler.wakeup import Wakeup

    monkeypatch.setattr(settings, "poll_interval_sec", 60.0)
    wakeup = Wakeup(settings, db.database_for())
    listening = threading.Event()
    original = wakeup._listening

    def listening_then_signal():  # type: ignore[no-untyped-def]
        conn = original()
        listening.set()
        return conn

    monkeypatch.setattr(wakeup, "_listening", listening_then_signal)
    sleeper = threading.Thread(target=wakeup.wait)
    try:
        sleeper.start()
        assert listening.wait(10)
        new_task()  # due now: its NOTIFY ends the 60 s sleep
        sleeper.join(timeout=20)
        assert not sleeper.is_alive(), "still asleep: the notification did not wake it"
    finally:
        sleeper.join(timeout=70)
        wakeup.close()


def test_a_task_already_due_after_a_dispatching_tick_is_taken_at_once_unless_held_back(settings):
    # Under a steady stream a task falls due every few milliseconds: after a tick that dispatched,
    # "already due" means "fell due meanwhile", not "held back by a full queue".
    from taskscheduler.scheduler.wakeup import HELD_BACK_SEC, MIN_GAP_SEC, Wakeup

    new_task(run_at=datetime.now(UTC) - timedelta(seconds=1))
    wakeup = Wakeup(settings, db.database_for())
    assert wakeup._timeout(dispatched=True) == MIN_GAP_SEC
    assert wakeup._timeout(dispatched=False) == HELD_BACK_SEC


def test_a_full_queue_is_topped_up_once_a_quarter_of_it_has_drained(settings, publisher, monkeypatch):
    monkeypatch.setattr(settings, "max_enqueued_per_queue", 8)
    tasks = [new_task(priority=5) for _ in range(12)]
    assert dispatch.run_once(database=_db(), settings=settings, publisher=publisher) == 8
    enqueued = [t for t in tasks if task_row(t)["status"] == "ENQUEUED"]
    with db.transaction() as conn:
        assert transitions.claim(conn, task_id=enqueued[0], attempt=1) is not None
    assert dispatch.run_once(database=_db(), settings=settings, publisher=publisher) == 0  # 1 of 8 drained: wait
    with db.transaction() as conn:
        assert transitions.claim(conn, task_id=enqueued[1], attempt=1) is not None
    assert dispatch.run_once(database=_db(), settings=settings, publisher=publisher) == 2  # 2 of 8: top up


# --- a database outage, and bounded work while a part is down -------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.attempts: list[sweeps.Dispatched] = []

    def publish_attempts(self, items):
        self.attempts += items
        return len(items)

    def publish_dead(self, items):
        return len(items)


def test_heartbeats_missed_before_the_database_came_back_are_not_held_against_a_worker(settings, publisher):
    silent = new_task(max_retries=0)
    to_started(silent)
    now = datetime.now(UTC)
    timeout = timedelta(seconds=settings.heartbeat_timeout_sec)
    # Silent for longer than the timeout, but the database was back (for this scheduler) only 2 s ago.
    backdate(silent, heartbeat_at=timeout * 3)
    back = now - timedelta(seconds=2)
    counts = rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=now, reconnected_at=back)
    assert counts == rescue.RescueCounts()
    assert task_row(silent)["status"] == "STARTED"
    # Still silent HEARTBEAT_TIMEOUT_SEC after the reconnection: the worker is gone.
    later = back + timeout + timedelta(seconds=1)
    counts = rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=later, reconnected_at=back)
    assert counts.dead == 1
    assert "no heartbeat" in task_row(silent)["last_error"]


def test_a_scheduler_that_starts_or_regains_the_database_gives_workers_a_heartbeat_timeout(settings, monkeypatch):
    from taskscheduler.scheduler.service import lost_the_database

    silent = new_task(max_retries=0)
    to_started(silent)
    # Its worker could not heartbeat while the database was away.
    backdate(silent, heartbeat_at=timedelta(seconds=settings.heartbeat_timeout_sec * 3))
    service = SchedulerService(settings, _Recorder())
    service.tick()  # the first tick of a process that knows nothing of the past
    assert task_row(silent)["status"] == "STARTED"

    # The database goes away (a refused connection), then comes back.
    reachable = service.database
    monkeypatch.setattr(service, "database", Database(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"))
    first_back = service.reconnected_at
    with pytest.raises(Exception) as failure:
        service.tick()
    assert lost_the_database(failure.value), failure.value
    service._tick_failed(failure.value)  # what run_forever does with it
    monkeypatch.setattr(service, "database", reachable)
    service._rescue_due = 0.0
    service.tick()
    assert task_row(silent)["status"] == "STARTED"
    assert service.reconnected_at is not None and first_back is not None and service.reconnected_at > first_back


def test_a_lost_enqueued_message_is_not_published_again_while_the_queue_holds_one_per_task(
    settings, publisher, redis_client, services
):
    task_id = new_task()
    assert (
        dispatch.run_once(database=_db(), settings=settings, publisher=publisher) == 1
    )  # its message waits: no worker
    prefix = services.redis_key_prefix
    now = datetime.now(UTC)
    step = timedelta(seconds=settings.enqueue_timeout_sec + 1)
    for n in range(1, 4):
        assert (
            rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=now + n * step).republished == 0
        )
    assert queued_attempts(redis_client, prefix, "default") == [(str(task_id), 1)]
    # The broker loses it: published again, once.
    redis_client.delete(f"{prefix}default")
    assert rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=now + 4 * step).republished == 1
    assert rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=now + 5 * step).republished == 0
    assert queued_attempts(redis_client, prefix, "default") == [(str(task_id), 1)]


def test_dlq_republishing_is_bounded_while_the_dlq_worker_is_down(settings, publisher, redis_client, services):
    for _ in range(3):
        to_dead(new_task())  # died; their DLQ messages were never published
    prefix = services.redis_key_prefix
    now = datetime.now(UTC)
    step = timedelta(seconds=settings.enqueue_timeout_sec + 1)
    assert rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=now + step).dlq_republished == 3
    # No DLQ worker: the messages wait. Sweeps a day apart publish nothing more.
    for n in range(2, 6):
        assert (
            rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=now + n * step).dlq_republished
            == 0
        )
    assert redis_client.llen(f"{prefix}dlq") == 3
    # One message is lost (taken by a DLQ worker that died before recording it): one is published again.
    redis_client.rpop(f"{prefix}dlq")
    assert (
        rescue.run_once(database=_db(), settings=settings, publisher=publisher, now=now + 7 * step).dlq_republished == 1
    )
    assert redis_client.llen(f"{prefix}dlq") == 3


def test_a_publish_pass_against_an_unreachable_broker_fails_fast_is_counted_and_logged_and_loses_nothing(
    settings, caplog
):
    from taskscheduler import metrics
    from taskscheduler.broker import configure_celery

    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    service = SchedulerService(down, CeleryPublisher(down))
    failures = metrics.BROKER_FAILURES.labels(kind="dispatch")
    before = failures._value.get()
    task_id = new_task()
    try:
        with caplog.at_level(logging.INFO, logger="taskscheduler"):
            started = time.monotonic()
            service.tick()  # does not raise: the tick goes on without the broker
            assert time.monotonic() - started < 10
            assert task_row(task_id)["status"] == "ENQUEUED"  # in PostgreSQL: the sweep publishes it later
            second = new_task()
            service.tick()
            assert task_row(second)["status"] == "ENQUEUED"
    finally:
        configure_celery(settings)
    assert failures._value.get() == before + 2
    assert metrics.BROKER_UP.labels(role="scheduler")._value.get() == 0
    warnings = [r for r in caplog.records if getattr(r, "event", None) == "broker_unreachable"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # rate-limited: one line for both passes
    assert "127.0.0.1" in warnings[0].getMessage()


def test_the_scheduler_waits_for_the_broker_before_dispatching(settings, caplog):
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    service = SchedulerService(down, _Recorder())
    task_id = new_task()
    with caplog.at_level(logging.INFO, logger="taskscheduler"):
        thread = threading.Thread(target=service.run_forever)
        thread.start()
        try:
            wait_until(
                lambda: any(getattr(r, "event", None) == "broker_unreachable" for r in caplog.records),
                timeout=30,
                what="the broker warning",
            )
            before = metrics_check_failures()
            wait_until(lambda: metrics_check_failures() > before, timeout=30, what="another start-up check")
            assert task_row(task_id)["status"] == "PENDING"
        finally:
            service.stop()
            thread.join(30)
    assert not thread.is_alive()
    assert sum(getattr(r, "event", None) == "broker_unreachable" for r in caplog.records) == 1


def metrics_check_failures() -> float:
    from taskscheduler import metrics

    return float(metrics.BROKER_FAILURES.labels(kind="check")._value.get())
