"""Workers that die, freeze, crash themselves or get the same message twice, and a database that
goes away while a worker holds an outcome."""

from __future__ import annotations

import logging
import signal
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from taskscheduler import handlers, worker
from taskscheduler.config import get_settings
from taskscheduler.store import db, sweeps
from taskscheduler.worker import heartbeats
from tests.chaos.conftest import assert_invariants, settle
from tests.chaos.servers import PrivatePostgres, PrivateRedis
from tests.harness import Services
from tests.helpers import dispatch_all, events, new_task, task_row, wait_until


def create(cluster, **body) -> str:
    r = httpx.post(f"{cluster.url}/tasks", json=body, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def get(cluster, task_id: str) -> dict:
    return httpx.get(f"{cluster.url}/tasks/{task_id}", timeout=10).json()


def history(cluster, task_id: str) -> list[tuple[str | None, str, int]]:
    events = httpx.get(f"{cluster.url}/tasks/{task_id}/events", timeout=10).json()
    return [(e["from_status"], e["to_status"], e["attempt"]) for e in events]


def dlq_rows(cluster, task_id: str) -> list[dict]:
    return [e for e in httpx.get(f"{cluster.url}/dlq", timeout=10).json() if e["task_id"] == task_id]


def the_worker(cluster, queue: str):
    (proc,) = [p for p in cluster.procs if p.name == f"worker-{queue}" and p.popen.poll() is None]
    return proc


def test_sigkill_mid_task_is_rescued_and_the_next_attempt_succeeds(clean_db, make_cluster, tmp_path: Path):
    cluster = make_cluster(clean_db)
    cluster.start_all()
    runs = tmp_path / "runs"
    task_id = create(cluster, name="chaos_record", payload={"path": str(runs), "sleep_sec": 2}, max_retries=2)
    wait_until(lambda: get(cluster, task_id)["status"] == "STARTED", timeout=20, what="STARTED")
    the_worker(cluster, "default").signal_group(signal.SIGKILL)
    cluster.start_worker("default")

    settle(clean_db.database_url, timeout=60)
    task = get(cluster, task_id)
    assert task["status"] == "SUCCEEDED" and task["attempt"] == 2
    assert ("STARTED", "FAILED", 1) in history(cluster, task_id)
    assert len(runs.read_text().splitlines()) == 2  # the killed run and the one that finished
    assert_invariants(clean_db.database_url)


def test_sigkill_with_no_retries_left_is_dead_with_one_stuck_dlq_row(clean_db, make_cluster, tmp_path: Path):
    cluster = make_cluster(clean_db)
    cluster.start_all()
    payload = {"path": str(tmp_path / "runs"), "sleep_sec": 30}
    task_id = create(cluster, name="chaos_record", payload=payload, max_retries=0)
    wait_until(lambda: get(cluster, task_id)["status"] == "STARTED", timeout=20, what="STARTED")
    the_worker(cluster, "default").signal_group(signal.SIGKILL)

    settle(clean_db.database_url, timeout=60)
    task = get(cluster, task_id)
    assert task["status"] == "DEAD" and task["attempt"] == 1
    assert [(e["reason"], e["attempt"]) for e in dlq_rows(cluster, task_id)] == [("stuck_task_timeout", 1)]
    assert_invariants(clean_db.database_url)


def test_a_frozen_worker_that_wakes_up_late_is_fenced(clean_db, make_cluster, tmp_path: Path):
    cluster = make_cluster(clean_db)
    cluster.start_all()
    frozen = the_worker(cluster, "default")
    runs = tmp_path / "runs"
    # A long run-time limit: the rescue comes from the silent heartbeat, and Celery's hard limit
    # (which the woken worker's pool would otherwise apply at once, killing the late writer) stays out.
    task_id = create(
        cluster,
        name="chaos_record",
        payload={"path": str(runs), "sleep_sec": 2},
        max_retries=2,
        timeout_sec=120,
    )
    wait_until(lambda: get(cluster, task_id)["status"] == "STARTED", timeout=20, what="STARTED")
    frozen.signal_group(signal.SIGSTOP)
    try:
        cluster.start_worker("default")  # a healthy worker to take over
        # Rescued (no heartbeat), run again elsewhere, and finished there.
        wait_until(lambda: get(cluster, task_id)["status"] == "SUCCEEDED", timeout=60, what="the re-run")
    finally:
        frozen.signal_group(signal.SIGCONT)
    # The woken worker finishes its sleep and tries to record success for attempt 1: refused.
    wait_until(lambda: "fenced" in frozen.log(), timeout=30, what="the woken worker's write to be fenced")

    task = get(cluster, task_id)
    assert task["status"] == "SUCCEEDED" and task["attempt"] == 2
    assert [to for _, to, _ in history(cluster, task_id)].count("SUCCEEDED") == 1
    assert len(runs.read_text().splitlines()) == 2
    assert_invariants(clean_db.database_url)


def test_a_handler_that_kills_its_worker_gets_max_retries_plus_one_attempts(clean_db, make_cluster):
    cluster = make_cluster(clean_db)
    cluster.start_all()
    task_id = create(cluster, name="chaos_crash", max_retries=2)

    settle(clean_db.database_url, timeout=90)
    task = get(cluster, task_id)
    assert task["status"] == "DEAD" and task["attempt"] == 3
    started = [a for _, to, a in history(cluster, task_id) if to == "STARTED"]
    assert started == [1, 2, 3]
    assert [(e["reason"], e["attempt"]) for e in dlq_rows(cluster, task_id)] == [("stuck_task_timeout", 3)]
    # It does not loop: a later sweep leaves it alone.
    with db.transaction(clean_db.database_url) as conn:
        assert sweeps.dispatch_due(conn, limit=10) == []
    assert get(cluster, task_id)["attempt"] == 3
    assert_invariants(clean_db.database_url)


def test_the_same_message_delivered_twice_runs_once(clean_db, make_cluster, tmp_path: Path):
    from taskscheduler.broker import configure_celery, publish_attempts

    cluster = make_cluster(clean_db)
    cluster.start_api()
    workers = [cluster.start("worker", "--queues", "default") for _ in range(2)]
    for w in workers:
        cluster.wait_worker_ready(w)
    runs = tmp_path / "runs"
    task_id = new_task(name="chaos_record", payload={"path": str(runs), "sleep_sec": 0.5})
    with db.transaction(clean_db.database_url) as conn:
        (item,) = sweeps.dispatch_due(conn, limit=10)
    configure_celery()
    publish_attempts([item, item], default_timeout_sec=30)

    wait_until(lambda: get(cluster, str(task_id))["status"] == "SUCCEEDED", timeout=30, what="SUCCEEDED")
    wait_until(
        lambda: sum(w.log().count("stale message dropped") for w in workers) == 1,
        timeout=30,
        what="the duplicate to be dropped",
    )
    assert len(runs.read_text().splitlines()) == 1
    assert [to for _, to, _ in history(cluster, str(task_id))].count("STARTED") == 1
    assert_invariants(clean_db.database_url)


def test_a_worker_killed_amid_messages_of_several_tasks_loses_none(clean_db, make_cluster, tmp_path: Path):
    # 160 tasks due at once travel 20 to a message; the worker dies with messages half run: the
    # attempt it was running is rescued by its silent heartbeat, the ones its messages still held
    # (ENQUEUED, never claimed) by the lost-message sweep, and the messages still in Redis run as sent.
    cluster = make_cluster(clean_db)
    cluster.start_all()
    runs = tmp_path / "runs"
    body = {"tasks": [{"name": "chaos_record", "payload": {"path": str(runs), "key": str(i), "sleep_sec": 0.05}}
                      for i in range(160)]}  # fmt: skip
    r = httpx.post(f"{cluster.url}/tasks/batch", json=body, timeout=30)
    assert r.status_code == 201, r.text
    first = the_worker(cluster, "default")
    wait_until(lambda: runs.exists() and len(runs.read_text().splitlines()) >= 20, timeout=30, what="20 runs")
    first.signal_group(signal.SIGKILL)
    first.popen.wait(10)
    ran_before_kill = len(runs.read_text().splitlines())
    assert ran_before_kill < 160, "the worker finished everything before it was killed"
    cluster.start_worker("default")

    counts = settle(clean_db.database_url, timeout=120)
    assert counts == {"SUCCEEDED": 160}
    keys = [line.split()[0] for line in runs.read_text().splitlines()]
    assert set(keys) == {str(i) for i in range(160)}
    # A task runs twice only if it was running when the worker died (one per pool process).
    twice = {key for key in keys if keys.count(key) > 1}
    assert len(twice) <= 2
    # The killed worker received fewer messages than it ran tasks: they were shared.
    assert 0 < first.log().count("execute_many") < ran_before_kill
    assert_invariants(clean_db.database_url)


# --- the database goes away while a worker holds an outcome ------------------------------------------------------


@dataclass
class PrivateWorker:
    pg: PrivatePostgres
    gate: threading.Event  # the `gated` handler returns once it is set


@pytest.fixture
def private_worker(
    private_servers: tuple[Services, PrivatePostgres, PrivateRedis], monkeypatch: pytest.MonkeyPatch
) -> Iterator[PrivateWorker]:
    """This process as a worker of the private servers, with heartbeats every 0.3 s and a handler
    `gated` that returns once the gate is set."""
    services, pg, _ = private_servers
    for name, value in {**services.env(), "HEARTBEAT_SEC": "0.3"}.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    monkeypatch.setattr(heartbeats, "_heartbeats", None)  # a fresh one, with this interval
    gate = threading.Event()
    monkeypatch.setitem(handlers._registry, "gated", lambda payload: {"ok": gate.wait(60)})
    try:
        yield PrivateWorker(pg=pg, gate=gate)
    finally:
        gate.set()
        get_settings.cache_clear()


def _run_in_thread(items: list[tuple[uuid.UUID, int]]) -> tuple[threading.Thread, list[Any]]:
    """`worker.run_attempts(items)` in a thread (as a pool process would); its list of outcomes, or
    the exception it raised, lands in the returned list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(worker.run_attempts(items))
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run, name="attempt", daemon=True)
    thread.start()
    return thread, out


def test_an_outcome_is_recorded_once_the_database_is_back_and_the_attempt_heartbeats_meanwhile(
    private_worker: PrivateWorker, caplog: pytest.LogCaptureFixture
) -> None:
    pg = private_worker.pg
    caplog.set_level(logging.INFO)
    task_id = new_task(name="gated")
    (item,) = dispatch_all()
    thread, out = _run_in_thread([(task_id, item.attempt)])
    wait_until(lambda: task_row(task_id)["status"] == "STARTED", timeout=30, what="STARTED")

    pg.stop("immediate")  # as a crash or a failover does
    private_worker.gate.set()  # the handler returns: its outcome now waits for the database
    wait_until(lambda: "could not record the success" in caplog.text, timeout=30, what="the write to fail")
    beats_failed = caplog.text.count("heartbeat failed")
    wait_until(
        lambda: caplog.text.count("heartbeat failed") > beats_failed, timeout=30, what="a heartbeat while waiting"
    )
    assert thread.is_alive() and out == []
    pg.start()

    thread.join(timeout=60)
    assert out == [["succeeded"]]
    assert task_row(task_id)["status"] == "SUCCEEDED"
    assert [to for _, to, _ in events(task_id)] == ["PENDING", "ENQUEUED", "STARTED", "SUCCEEDED"]
    assert "unrecorded" not in caplog.text


def test_a_worker_gives_up_on_a_database_gone_too_long_with_one_clear_line_and_loses_no_task(
    private_worker: PrivateWorker, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg = private_worker.pg
    monkeypatch.setenv("WORKER_DB_RETRY_SEC", "2")
    get_settings.cache_clear()
    caplog.set_level(logging.INFO)
    first, second = new_task(name="gated"), new_task(name="gated")
    items = {d.id: d.attempt for d in dispatch_all()}
    thread, out = _run_in_thread([(first, items[first]), (second, items[second])])
    wait_until(lambda: task_row(first)["status"] == "STARTED", timeout=30, what="STARTED")

    pg.stop("immediate")
    private_worker.gate.set()
    thread.join(timeout=60)
    # The first outcome is given up with one line naming the attempt; the second task's claim is
    # given up too, which ends the message without touching that task.
    (gave_up,) = [r for r in caplog.records if getattr(r, "event", None) == "unrecorded"]
    assert gave_up.levelno == logging.ERROR
    assert (gave_up.task_id, gave_up.attempt) == (str(first), items[first])  # type: ignore[attr-defined]
    assert "outcome SUCCEEDED not recorded, the database was unreachable" in gave_up.getMessage()
    (raised,) = out
    assert isinstance(raised, worker.GaveUp)

    pg.start()
    # Nothing is lost: the first is STARTED for the stuck sweep to retry, the second still ENQUEUED
    # for the lost-message sweep to publish again.
    assert task_row(first)["status"] == "STARTED"
    assert task_row(second)["status"] == "ENQUEUED"
    assert "STARTED" not in [to for _, to, _ in events(second)]
