"""Servers that restart under load, and a worker cut off from both by a network partition."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from taskscheduler.store import db
from tests.chaos.conftest import assert_invariants, settle
from tests.chaos.proxy import FlakyProxy
from tests.harness import Services, insert_tasks
from tests.helpers import wait_until


def count(database_url: str, where: str) -> int:
    with db.transaction(database_url) as conn:
        return int(conn.exec_driver_sql(f"SELECT count(*) FROM tasks WHERE {where}").scalar_one())


def test_redis_restart_with_tasks_in_flight_loses_nothing(private_servers, make_cluster, tmp_path: Path):
    services, _pg, rd = private_servers
    url = services.database_url
    insert_tasks(url, 180, name="chaos_record", payload=f'{{"path": "{tmp_path / "runs"}", "sleep_sec": 0.05}}')
    insert_tasks(url, 20, name="demo_fail", payload='{"fail": true}', max_retries=1)
    cluster = make_cluster(services)
    cluster.start("scheduler")
    for queue in ("default", "dlq"):
        cluster.start_worker(queue)
    wait_until(lambda: count(url, "status = 'SUCCEEDED'") >= 20, timeout=60, what="some tasks to finish")
    assert count(url, "status IN ('PENDING', 'ENQUEUED', 'STARTED', 'FAILED')") > 50

    rd.restart()  # no persistence: every queued message is gone

    counts = settle(url, timeout=180)
    assert counts == {"SUCCEEDED": 180, "DEAD": 20}
    assert_invariants(url)


def test_postgres_restart_under_load_gives_503_then_recovers(private_servers, make_cluster):
    services, pg, _rd = private_servers
    url = services.database_url
    cluster = make_cluster(services)
    cluster.start_all()
    codes: list[int] = []
    created: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=cluster.url, timeout=10) as client:
            while not stop.is_set():
                try:
                    r = client.post("/tasks", json={"name": "demo_ok", "payload": {"n": len(codes)}})
                except httpx.HTTPError:
                    continue
                codes.append(r.status_code)
                if r.status_code == 201:
                    created.append(r.json()["id"])
                time.sleep(0.02)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_until(lambda: len(created) >= 30, timeout=60, what="load to start")
        pg.stop()
        wait_until(lambda: codes.count(503) >= 5, timeout=60, what="503s while the database is down")
        pg.start()
        before = len(created)
        wait_until(lambda: len(created) >= before + 30, timeout=90, what="the API to recover")
    finally:
        stop.set()
        loader.join(30)

    assert set(codes) <= {201, 503}, sorted(set(codes))
    settle(url, timeout=180)
    for task_id in created:
        r = httpx.get(f"{cluster.url}/tasks/{task_id}", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "SUCCEEDED", r.text
    assert_invariants(url)


def test_a_partitioned_worker_is_rescued_and_its_late_writes_are_fenced(clean_db, make_cluster, tmp_path: Path):
    pg = urlsplit(clean_db.database_url.replace("postgresql+psycopg", "postgresql"))
    rd = urlsplit(clean_db.redis_url)
    pg_proxy = FlakyProxy(pg.hostname or "127.0.0.1", pg.port or 5432)
    redis_proxy = FlakyProxy(rd.hostname or "127.0.0.1", rd.port or 6379)
    try:
        behind = Services(
            database_url=clean_db.database_url.replace(f":{pg.port}/", f":{pg_proxy.port}/"),
            redis_url=clean_db.redis_url.replace(f":{rd.port}/", f":{redis_proxy.port}/"),
            redis_key_prefix=clean_db.redis_key_prefix,
        )
        cluster = make_cluster(clean_db)
        cluster.start_api()
        cluster.start("scheduler")
        cut_off = make_cluster(behind).start_worker("default")

        runs = tmp_path / "runs"
        r = httpx.post(
            f"{cluster.url}/tasks",
            # A long run-time limit: the rescue comes from the missing heartbeat, and no soft time
            # limit interrupts the cut-off worker while it waits for the network.
            json={
                "name": "chaos_record",
                "payload": {"path": str(runs), "sleep_sec": 2},
                "max_retries": 2,
                "timeout_sec": 120,
            },
        )
        task_id = r.json()["id"]
        get = lambda: httpx.get(f"{cluster.url}/tasks/{task_id}", timeout=10).json()  # noqa: E731
        wait_until(lambda: get()["status"] == "STARTED", timeout=30, what="STARTED behind the proxy")
        pg_proxy.cut()
        redis_proxy.cut()
        cluster.start_worker("default")  # a worker on the healthy side of the partition
        wait_until(lambda: get()["status"] == "SUCCEEDED", timeout=60, what="the rescue and re-run")

        pg_proxy.heal()
        redis_proxy.heal()
        wait_until(lambda: "fenced" in cut_off.log(), timeout=60, what="the cut-off worker's late write")
        task = get()
        assert task["status"] == "SUCCEEDED" and task["attempt"] == 2
        events = httpx.get(f"{cluster.url}/tasks/{task_id}/events").json()
        assert [e["to_status"] for e in events].count("SUCCEEDED") == 1
        cut_off.signal_group(signal.SIGKILL)
        assert_invariants(clean_db.database_url)
    finally:
        pg_proxy.close()
        redis_proxy.close()


@pytest.mark.parametrize("outage_sec", [10, 60])
def test_running_tasks_survive_a_database_outage(private_servers, make_cluster, outage_sec: int):
    services, pg, _rd = private_servers
    url = services.database_url
    # As reported: a 4 s heartbeat timeout; heartbeats every 2 s, so that after the outage the
    # scheduler's first stuck check can come before the workers' first heartbeat.
    cluster = make_cluster(services, HEARTBEAT_SEC="2", HEARTBEAT_TIMEOUT_SEC="4")
    cluster.start_all()
    ids = []
    for priority in (9, 5, 2):  # one per queue; they run through the outage and finish after it
        r = httpx.post(
            f"{cluster.url}/tasks",
            json={
                "name": "demo_hang",
                "payload": {"sleep_sec": outage_sec + 12},
                "priority": priority,
                "max_retries": 0,
                "timeout_sec": 600,
            },
            timeout=10,
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    wait_until(lambda: count(url, "status = 'STARTED'") == 3, timeout=60, what="three tasks running")

    pg.stop()
    codes: list[int] = []
    ends = time.monotonic() + outage_sec
    with httpx.Client(base_url=cluster.url, timeout=10) as client:
        while time.monotonic() < ends:  # the outage itself: the API is asked all along
            codes.append(client.post("/tasks", json={"name": "demo_ok"}).status_code)
            time.sleep(0.5)
    try:
        pg.start()
    except subprocess.CalledProcessError as exc:
        log = (pg.folder / "pg.log").read_text()[-3000:]
        raise AssertionError(f"{exc.stderr!r}\n{log}") from exc
    assert codes and set(codes) == {503}, sorted(set(codes))

    def created() -> str | None:
        r = httpx.post(f"{cluster.url}/tasks", json={"name": "demo_ok"}, timeout=10)
        return r.json()["id"] if r.status_code == 201 else None

    after = wait_until(created, timeout=60, what="the API to take tasks again")
    settle(url, timeout=outage_sec + 90)
    for task_id in [*ids, after]:
        task = httpx.get(f"{cluster.url}/tasks/{task_id}", timeout=10).json()
        assert (task["status"], task["attempt"]) == ("SUCCEEDED", 1), task
    assert_invariants(url)
