"""Every benchmark at its smoke size, so they cannot rot. Speed is never asserted here: only that each
one ran the real processes to the end and wrote a sane JSON result (see BENCHMARKS.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from tests.harness import Services

REPO = Path(__file__).resolve().parents[2]


def run_benchmark(kind: str, services: Services, tmp_path: Path, *extra: str) -> dict[str, Any]:
    results = tmp_path / "results"
    argv = [
        sys.executable, "-m", f"benchmarks.{kind}", "--smoke",
        "--admin-database-url", services.database_url,
        "--redis-url", services.redis_url,
        "--redis-key-prefix", f"{services.redis_key_prefix}bench-{uuid.uuid4().hex[:6]}:",
        "--results-dir", str(results),
        *extra,
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=280)
    output = f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, output
    latest = results / f"{kind}-latest.json"
    assert latest.exists(), output
    data = json.loads(latest.read_text())
    assert data["benchmark"] == kind
    assert data["smoke"] is True
    assert data["machine"]["cpus"] >= 1
    return data


def positive(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.timeout(300)
def test_throughput_smoke(services: Services, tmp_path: Path) -> None:
    data = run_benchmark("throughput", services, tmp_path)
    n = data["params"]["tasks"]
    (ours,) = data["ours"]["runs"]
    (raw,) = data["raw_celery"]["runs"]
    assert ours["statuses"] == {"SUCCEEDED": n}
    assert raw["tasks"] == n
    assert positive(ours["rate"]) and positive(raw["rate"])
    assert positive(data["ratio"])
    assert all(v >= 0 for v in ours["cpu_seconds"].values())
    assert ours["cpu_seconds"]["workers"] > 0 and ours["cpu_seconds"]["scheduler"] > 0
    # Raw Celery drained a prefilled queue, with the settings the result names.
    assert raw["prefilled"] is True
    assert data["settings"]["raw_celery"]["worker_prefetch_multiplier"] == data["params"]["raw_prefetch"]
    assert data["settings"]["ours"]["LOG_LEVEL"] == "INFO"
    # And both again with submission included.
    (ours_submitted,) = data["ours_submitted"]["runs"]
    (raw_submitted,) = data["raw_celery_submitted"]["runs"]
    assert ours_submitted["tasks"] == n and raw_submitted["tasks"] == n and raw_submitted["prefilled"] is False
    assert positive(ours_submitted["rate"]) and positive(raw_submitted["rate"])
    assert ours_submitted["cpu_seconds"]["api"] > 0
    assert positive(data["ratio_with_submission"])


@pytest.mark.timeout(300)
def test_throughput_smoke_with_one_task_per_message(services: Services, tmp_path: Path) -> None:
    data = run_benchmark(
        "throughput", services, tmp_path, "--max-tasks-per-message", "1", "--skip-raw", "--skip-submitted"
    )
    n = data["params"]["tasks"]
    (ours,) = data["ours"]["runs"]
    assert ours["statuses"] == {"SUCCEEDED": n}
    assert data["settings"]["ours"]["MAX_TASKS_PER_MESSAGE"] == 1
    assert data["raw_celery"]["runs"] == [] and data["ours_submitted"]["runs"] == []
    # One commit per task at least: the claim of a message's only attempt is not shared.
    assert ours["db_per_task"]["xact_commit"] >= 2


@pytest.mark.timeout(300)
def test_lag_smoke(services: Services, tmp_path: Path) -> None:
    data = run_benchmark("lag", services, tmp_path)
    n = data["params"]["tasks"]
    assert data["statuses"] == {"SUCCEEDED": n}
    lag = data["lag_ms"]
    assert lag["tasks_measured"] == n
    for measure in ("start_ms", "finish_ms"):
        p = lag[measure]
        assert 0 <= p["p50"] <= p["p95"] <= p["p99"] <= p["max"]
    assert lag["finish_ms"]["p50"] >= lag["start_ms"]["p50"]
    assert positive(lag["achieved_rate"])


@pytest.mark.timeout(300)
def test_snapshot_smoke(services: Services, tmp_path: Path) -> None:
    data = run_benchmark("snapshot", services, tmp_path)
    n = data["params"]["tasks"]
    assert data["statuses"] == {"SUCCEEDED": n}
    phases = {w["phase"] for w in data["windows"]}
    assert phases == {"baseline", "held"}
    assert sum(w["done"] for w in data["windows"]) == n
    for w in data["windows"]:
        assert 0 <= w["p50_ms"] <= w["p99_ms"]
    assert positive(data["ratio_p50"])
    assert not data["sample_errors"]
    for name, cost in data["cost"].items():
        assert positive(cost["baseline_ms"]) and positive(cost["held_ms"]), name


@pytest.mark.timeout(300)
def test_api_smoke(services: Services, tmp_path: Path) -> None:
    data = run_benchmark("api", services, tmp_path)
    single = data["single"]
    assert single["requests"] > 0 and single["non_2xx"] == 0
    assert single["created"] >= single["requests"] > 0
    assert positive(single["requests_per_sec"]) and single["p50_ms"] <= single["p99_ms"]
    batch = data["batch"]
    assert batch["status"] in ("ok", "skip"), batch
    if batch["status"] == "ok":
        params = data["params"]
        assert batch["non_2xx"] == 0
        assert batch["created"] == params["batch_size"] * params["batch_requests"]
        assert positive(batch["tasks_per_sec"])


@pytest.mark.timeout(300)
def test_submit_smoke(services: Services, tmp_path: Path) -> None:
    data = run_benchmark("submit", services, tmp_path)
    n, warm_up = data["params"]["submits"], data["params"]["warm_up"]
    runs = data["runs"]
    assert set(runs) == {"direct", "transaction", "http"}
    for result in runs.values():
        assert result["submits"] == n
        assert positive(result["submits_per_sec"]) and 0 < result["p50_ms"] <= result["p99_ms"]
        assert result["cpu_seconds_per_1000"]["caller"] > 0
    assert runs["http"]["cpu_seconds_per_1000"]["api"] > 0
    assert data["created"] == 3 * (n + warm_up)
    assert positive(data["http_over_direct_p50"])


@pytest.mark.timeout(300)
def test_scale_smoke(services: Services, tmp_path: Path) -> None:
    data = run_benchmark("scale", services, tmp_path)
    params = data["params"]
    size = data["size"]
    assert size["by_status"]["PENDING"] == params["pending"]
    assert sum(size["by_status"].get(s, 0) for s in ("SUCCEEDED", "DEAD", "CANCELLED")) == params["finished"]
    assert positive(size["database_bytes_per_million_tasks"])
    queries = data["queries"]
    names = " ".join(queries)
    for name in ("DISPATCH_DUE", "LOCK_STUCK", "REPUBLISH_LOST_ENQUEUED", "REPUBLISH_UNRECORDED_DEAD"):
        assert name in names
    for result in queries.values():
        assert result["custom"]["execution_ms"] >= 0 and result["generic"]["execution_ms"] >= 0
        assert result["custom"]["plan"]
    batch = params["query_params"]["limit"]
    (due,) = [r for c, r in queries.items() if c.endswith(f": {batch} due")]
    assert due["custom"]["rows"] == batch


@pytest.mark.timeout(300)
def test_cost_smoke(services: Services, tmp_path: Path) -> None:
    data = run_benchmark("cost", services, tmp_path)
    assert data["run"]["statuses"] == {"SUCCEEDED": data["tasks"]}
    per_1000 = data["cpu_seconds_per_1000"]
    assert all(v >= 0 for v in per_1000.values())
    assert per_1000["api"] > 0 and per_1000["workers"] > 0
    assert positive(data["ours_total_per_1000"]) and positive(data["raw_total_per_1000"])
    # Every task writes its transitions and events: WAL of this database, within the cluster's.
    assert 0 < data["wal"]["bytes"] <= data["wal"]["cluster_bytes"]
    assert data["wal"]["records"] >= data["tasks"]


def test_profile_report_reads_collapsed_stacks(tmp_path: Path) -> None:
    from tools.profile_report import report

    main = 'process 10:"taskscheduler worker"'
    child = f'{main};process 11:"taskscheduler worker"'
    collapsed = tmp_path / "worker.collapsed.txt"
    collapsed.write_text(
        f"{main};main (taskscheduler/cli.py:1);Channel._brpop_read (kombu/transport/redis.py:9) 30\n"
        f"{child};run_attempt (taskscheduler/worker.py:2);Engine.begin (sqlalchemy/engine/base.py:3);"
        "wait (psycopg/waiting.py:4) 60\n"
        f"{child};run_attempt (taskscheduler/worker.py:2);Logger.info (logging/__init__.py:5) 10\n"
    )
    summary = report(collapsed)
    assert summary["main"]["samples"] == 30 and summary["child"]["samples"] == 70
    child_self = dict(summary["child"]["self_by_library_pct"])
    assert child_self["psycopg (PostgreSQL client, incl. waiting)"] == pytest.approx(85.7)
    inclusive = dict(summary["child"]["inclusive_pct"])
    assert inclusive["Engine.begin (engine/base.py)"] == pytest.approx(85.7)
    assert inclusive["Logger.info (logging/__init__.py)"] == pytest.approx(14.3)


@pytest.mark.timeout(300)
def test_dashboard_smoke(services: Services, tmp_path: Path) -> None:
    data = run_benchmark("dashboard", services, tmp_path)
    pages = data["pages"]
    assert {"overview", "tasks", "task (SUCCEEDED, 4 events)", "dead letters", "processes"} <= set(pages)
    for page in pages.values():
        assert positive(page["median_ms"]) and page["median_ms"] <= page["p95_ms"] <= page["max_ms"]
        assert page["bytes"] > 0
    assert set(data["targets"]) == {f"{label} < 50 ms (median)" for label in pages}


@pytest.mark.timeout(300)
def test_soak_smoke(services: Services, tmp_path: Path) -> None:
    data = run_benchmark("soak", services, tmp_path)
    windows = data["windows"]
    assert len(windows) == 3
    assert sum(w["finished"] for w in windows) > 0
    for w in windows:
        assert w["lag_p50_ms"] <= w["lag_p99_ms"] or w["finished"] == 0
        assert w["tasks_table_bytes"] > 0 and w["events_partitions"] >= 1
    assert data["params"]["RETENTION_DAYS"] and data["params"]["EVENTS_PARTITION_SEC"]


@pytest.mark.timeout(300)
def test_retention_smoke(services: Services, tmp_path: Path) -> None:
    data = run_benchmark("retention", services, tmp_path)
    n = data["params"]["tasks"]
    assert data["cascade"]["deleted"] == data["partitions"]["deleted"] == n
    assert data["cascade"]["partitions_dropped"] == 0
    assert data["partitions"]["partitions_dropped"] == 1 and data["partitions"]["events_kept"] == 0
    assert all(v >= 0 for r in (data["cascade"], data["partitions"]) for v in r["total"].values())
