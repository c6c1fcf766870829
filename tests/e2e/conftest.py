"""Real processes, started with the `taskscheduler` CLI exactly as compose and the Procfile run them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.harness import (
    CLI,
    Proc,
    Services,
    dump_logs,
    free_port,
    start_process,
    stop_all,
    wait_until,
    wait_worker_ready,
)

# Short timeouts so faults resolve in seconds; every wait in the tests polls for a condition.
FAST_SETTINGS = {
    "POLL_INTERVAL_SEC": "0.2",
    "HEARTBEAT_SEC": "0.5",
    "HEARTBEAT_TIMEOUT_SEC": "3",
    "STUCK_AFTER_SEC": "4",
    "ENQUEUE_TIMEOUT_SEC": "5",
    "RETRY_BACKOFF_BASE_SEC": "0.2",
    "RETRY_BACKOFF_MAX_SEC": "1",
    "LOG_LEVEL": "INFO",
}


@dataclass
class Cluster:
    services: Services
    tmp: Path
    extra_env: dict[str, str]
    api_port: int = field(default_factory=free_port)
    procs: list[Proc] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("FAULT_POINT",)}
        env.update(self.services.env())
        env.update(FAST_SETTINGS)
        env["API_PORT"] = str(self.api_port)
        env["API_HOST"] = "127.0.0.1"
        env.update(self.extra_env)
        return env

    def start(self, *args: str, env: dict[str, str] | None = None) -> Proc:
        return self.start_with_prefix([], *args, env=env)

    def start_with_prefix(self, prefix: list[str], *args: str, env: dict[str, str] | None = None) -> Proc:
        """Start `taskscheduler *args` under a wrapper command such as `faketime -f +1h`."""
        name = "-".join(args).replace("--queues-", "")
        return self.start_process(name, [*prefix, CLI, *args], env={**self.env, **(env or {})})

    def start_process(
        self, name: str, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> Proc:
        """Any command, in the environment `env` (default: the cluster's); stopped with the cluster."""
        log_path = self.tmp / f"{name}-{len(self.procs)}.log"
        proc = start_process(name, argv, log_path=log_path, env=self.env if env is None else env, cwd=cwd)
        self.procs.append(proc)
        return proc

    def start_worker(self, queue: str) -> Proc:
        proc = self.start("worker", "--queues", queue)
        self.wait_worker_ready(proc)
        return proc

    wait_worker_ready = staticmethod(wait_worker_ready)

    def start_api(self) -> Proc:
        proc = self.start("api")
        wait_until(self._api_up, timeout=90, what="api")
        return proc

    def start_all(self) -> None:
        """api, scheduler and the four workers, started together, then waited for."""
        self.start("api")
        self.start("scheduler")
        workers = [self.start("worker", "--queues", q) for q in ("high", "default", "low", "dlq")]
        wait_until(self._api_up, timeout=90, what="api")
        for proc in workers:
            self.wait_worker_ready(proc)

    def _api_up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def stop_all(self) -> None:
        stop_all(self.procs)

    def dump_logs(self) -> str:
        return dump_logs(self.procs)


@pytest.fixture
def cluster_factory(clean_db: Services, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[type[Cluster]]:
    clusters: list[Cluster] = []

    def make(**extra_env: str) -> Cluster:
        cluster = Cluster(services=clean_db, tmp=tmp_path, extra_env=extra_env)
        clusters.append(cluster)
        return cluster

    yield make  # type: ignore[misc]
    for cluster in clusters:
        cluster.stop_all()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(cluster.dump_logs())
