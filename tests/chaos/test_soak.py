"""A soak: thousands of mixed tasks while workers are killed at random and Redis restarts once."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.chaos.conftest import assert_invariants, settle
from tests.harness import insert_tasks
from tests.helpers import wait_until

TOTAL = 5000


@pytest.mark.timeout(600)
def test_soak_with_random_worker_kills_and_a_redis_restart(private_servers, make_cluster, tmp_path: Path):
    services, _pg, rd = private_servers
    url = services.database_url
    mix = [  # (count, name, payload, priority, queue, max_retries)
        (2000, "demo_ok", "{}", 9, "high", 3),
        (1500, "demo_ok", "{}", 5, "default", 3),
        (700, "demo_flaky", '{"failures": 1}', 2, "low", 3),
        (400, "demo_fail", '{"fail": true}', 5, "default", 1),
        (400, "chaos_record", f'{{"path": "{tmp_path / "runs"}", "sleep_sec": 0.1}}', 6, "default", 3),
    ]
    assert sum(m[0] for m in mix) == TOTAL
    for n, name, payload, priority, queue, max_retries in mix:
        insert_tasks(url, n, name=name, payload=payload, priority=priority, queue=queue, max_retries=max_retries)

    cluster = make_cluster(services, ENQUEUE_TIMEOUT_SEC="20", LOG_LEVEL="WARNING")
    cluster.start("scheduler")
    for queue in ("high", "default", "low", "dlq"):
        cluster.start("worker", "--queues", queue)

    rng = random.Random(20261128)
    kills = 0
    stop = threading.Event()

    def chaos() -> None:
        nonlocal kills
        started = time.monotonic()
        restarted = False
        while not stop.wait(rng.uniform(2, 4)) and time.monotonic() - started < 90:
            alive = [p for p in cluster.procs if p.name.startswith("worker") and p.popen.poll() is None]
            victim = rng.choice(alive)
            victim.signal_group(signal.SIGKILL)
            victim.popen.wait(10)
            kills += 1
            cluster.start(*victim.name.replace("worker-", "worker --queues ").split())  # like restart: always
            if not restarted and time.monotonic() - started > 8:
                rd.restart()
                restarted = True

    killer = threading.Thread(target=chaos)
    killer.start()
    try:
        wait_until(lambda: killer.is_alive() is False or _unfinished(url) == 0, timeout=400, interval=1, what="soak")
        stop.set()
        killer.join(30)
        counts = settle(url, timeout=300)
    finally:
        stop.set()
        killer.join(30)
    print(f"\nsoak: {TOTAL} tasks, {kills} worker kills, 1 Redis restart -> {counts}")
    assert sum(counts.values()) == TOTAL
    assert counts.get("DEAD", 0) >= 400  # every demo_fail, plus any task killed past its budget
    assert kills >= 3
    assert_invariants(url)


def _unfinished(url: str) -> int:
    from taskscheduler.store import db
    from tests.chaos.invariants import unfinished

    with db.transaction(url) as conn:
        return unfinished(conn)
