"""API rate: POST /tasks requests/s from one `taskscheduler api` process with a concurrent client,
p50/p99 latency; then POST /tasks/batch tasks/s (skipped with a message when the route is absent),
from wrk for --batch-duration seconds, or --batch-requests requests from the httpx client.

    python -m benchmarks.api                              # wrk when installed, else an httpx client
    python -m benchmarks.api --connections 64 --duration 20
    python -m benchmarks.api --client httpx

The client runs on the same machine and takes CPU from the server: wrk (C, one thread) takes far
less than a Python client, so prefer it (`apt-get install wrk`). The tasks are `demo_ok`, due now,
with no scheduler running: they stay PENDING, and only creation is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
from tests.harness import Proc, free_port
from tools import profile_report

from benchmarks import common, throughput

BODY = {"name": "demo_ok", "payload": {}, "priority": 5}
SMOKE = {"duration": 2.0, "connections": 4, "batch_size": 50, "batch_requests": 4}


# ------------------------------------------------------------------------------------------- wrk


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value.strip())
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]


def run_wrk(url: str, *, connections: int, duration: float, body: dict[str, Any]) -> dict[str, Any]:
    lua_body = json.dumps(body).replace("\\", "\\\\").replace("'", "\\'")
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "post.lua")
        with open(script, "w") as f:
            f.write(f"wrk.method = 'POST'\nwrk.body = '{lua_body}'\nwrk.headers['Content-Type'] = 'application/json'\n")
        argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s", script, url]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in ([\d.]+\w+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    latency = {q: _ms(v) for q, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M)}
    return {
        "client": "wrk",
        "requests": int(total.group(1)) if total else 0,
        "requests_per_sec": float(rps.group(1)) if rps else float("nan"),
        "p50_ms": latency.get("50", float("nan")),
        "p90_ms": latency.get("90", float("nan")),
        "p99_ms": latency.get("99", float("nan")),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1).strip() if errors else "",
        "raw_output": out,
    }


# ----------------------------------------------------------------------------------------- httpx


async def _httpx_load(
    url: str, *, connections: int, duration: float | None, requests: int | None, body: Any
) -> dict[str, Any]:
    """`connections` concurrent senders, for `duration` seconds or `requests` requests in all."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    sent = 0
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        start = time.perf_counter()
        deadline = start + duration if duration else float("inf")

        async def sender() -> None:
            nonlocal sent
            while time.perf_counter() < deadline and (requests is None or sent < requests):
                sent += 1
                t = time.perf_counter()
                r = await client.post(url, content=payload, headers=headers)
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        await asyncio.gather(*(sender() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "client": "httpx",
        "requests": len(latencies),
        "seconds": elapsed,
        "requests_per_sec": len(latencies) / elapsed,
        "p50_ms": common.percentile(latencies, 0.5),
        "p90_ms": common.percentile(latencies, 0.9),
        "p99_ms": common.percentile(latencies, 0.99),
        "statuses": statuses,
        "non_2xx": sum(v for k, v in statuses.items() if not 200 <= k < 300),
    }


def warm_up(url: str, requests: int) -> None:
    """Fill the api's connection pool and let psycopg prepare its statements."""
    asyncio.run(_httpx_load(url, connections=min(8, requests), duration=None, requests=requests, body=BODY))


def measured_load(
    pdb: common.PrivateDatabase,
    api: Proc,
    url: str,
    *,
    client: str,
    connections: int,
    body: Any,
    duration: float,
    requests: int | None = None,
) -> dict[str, Any]:
    """POSTs of `body` to `url` from wrk for `duration` seconds, or from the httpx client (for
    `requests` requests when given), with the CPU of the api and its backends per 1,000 tasks created."""
    before = count_tasks(pdb)
    tracker = common.CpuTracker({"api": api.tree, "postgres": common.postgres_backends(pdb.name)})
    tracker.start()
    if client == "wrk":
        out = run_wrk(url, connections=connections, duration=duration, body=body)
    else:
        load = _httpx_load(
            url, connections=connections, duration=None if requests else duration, requests=requests, body=body
        )
        out = asyncio.run(load)
    cpu = tracker.stop()
    out["created"] = count_tasks(pdb) - before
    out["cpu_seconds"] = cpu
    out["cpu_seconds_per_1000"] = common.per_1000(cpu, out["created"])
    return out


# ------------------------------------------------------------------------------------------ batch


def probe_batch(base: str) -> tuple[str, str]:
    """('ok', '') when POST /tasks/batch takes {"tasks": [...]}, else ('skip'|'error', why)."""
    r = httpx.post(f"{base}/tasks/batch", json={"tasks": [BODY]}, timeout=30)
    if r.status_code in (404, 405):
        return "skip", f"POST /tasks/batch answered {r.status_code}: the route does not exist here"
    if 200 <= r.status_code < 300:
        return "ok", ""
    return "error", f"POST /tasks/batch answered {r.status_code}: {r.text[:300]}"


def run_batch(
    pdb: common.PrivateDatabase,
    api: Proc,
    base: str,
    *,
    client: str,
    batch_size: int,
    requests: int,
    duration: float,
    connections: int,
) -> dict[str, Any]:
    """wrk for `duration` seconds, or the httpx client for `requests` requests: a Python client on the
    same machine takes as much CPU as the server's work on a batch, wrk little."""
    body = {"tasks": [BODY] * batch_size}
    out = measured_load(
        pdb, api, f"{base}/tasks/batch", client=client, connections=connections, body=body, duration=duration,
        requests=requests,
    )  # fmt: skip
    out["batch_size"] = batch_size
    out["tasks_per_sec"] = out["requests_per_sec"] * batch_size
    return out


# ------------------------------------------------------------------------------------------- main


def count_tasks(pdb: common.PrivateDatabase) -> int:
    with pdb.connect() as conn:
        row = conn.execute("SELECT count(*) FROM tasks").fetchone()
    return int(row[0]) if row else 0


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = common.base_parser(__doc__ or "")
    parser.add_argument("--connections", type=int, default=32, help="concurrent client connections")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of POST /tasks")
    parser.add_argument("--client", choices=("auto", "wrk", "httpx"), default="auto")
    parser.add_argument("--batch-size", type=int, default=1000, help="tasks per POST /tasks/batch")
    parser.add_argument(
        "--batch-requests", type=int, default=30, help="POST /tasks/batch requests in all (httpx client)"
    )
    parser.add_argument("--batch-duration", type=float, default=10.0, help="seconds of POST /tasks/batch (wrk)")
    parser.add_argument("--batch-connections", type=int, default=2, help="concurrent batch requests")
    parser.add_argument("--profile", action="store_true", help="record a py-spy profile of the api process")
    args = parser.parse_args(argv)
    if args.smoke:
        args.duration, args.connections = SMOKE["duration"], SMOKE["connections"]
        args.batch_size, args.batch_requests = SMOKE["batch_size"], SMOKE["batch_requests"]
        args.batch_duration = SMOKE["duration"]
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "httpx"
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    with common.run("api", args) as run, run.processes() as procs:
        api = procs.api(port)
        warm_up(f"{base}/tasks", 200)
        profile_dir = args.results_dir / f"profiles-{common.run_id()}"
        profiler = throughput.start_profiler("api", api.pid, profile_dir, subprocesses=False) if args.profile else None
        single = measured_load(
            run.pdb, api, f"{base}/tasks", client=client, connections=args.connections, body=BODY,
            duration=args.duration,
        )  # fmt: skip
        if profiler is not None and profiler.stop() is not None:
            single["profile"] = str(profiler.path)
            single["profile_summary"] = profile_report.report(profiler.path)

        state, why = probe_batch(base)
        batch: dict[str, Any] = {"status": state, "why": why}
        if state == "ok":
            batch.update(
                run_batch(
                    run.pdb,
                    api,
                    base,
                    # A smoke run counts its batch requests exactly (the smoke test checks every
                    # task was created); wrk runs for a time.
                    client="httpx" if args.smoke else client,
                    batch_size=args.batch_size,
                    requests=args.batch_requests,
                    duration=args.batch_duration,
                    connections=args.batch_connections,
                )
            )
        else:
            print(f"batch: {why}", file=sys.stderr)

    rows: list[tuple[Any, ...]] = [
        (
            f"POST /tasks ({client}, {args.connections} conns)",
            single["requests_per_sec"],
            single["requests_per_sec"],
            single["p50_ms"],
            single["p99_ms"],
            single["non_2xx"],
        )
    ]
    if batch["status"] == "ok":
        rows.append(
            (
                f"POST /tasks/batch ({args.batch_size}/req, {args.batch_connections} conns)",
                batch["requests_per_sec"],
                batch["tasks_per_sec"],
                batch["p50_ms"],
                batch["p99_ms"],
                batch["non_2xx"],
            )
        )
    common.print_table(
        "API (one `taskscheduler api` process)", ["route", "req/s", "tasks/s", "p50 ms", "p99 ms", "non-2xx"], rows
    )
    if batch["status"] != "ok":
        print(f"POST /tasks/batch skipped: {batch['why']}\n")
    cpu_rows = [("POST /tasks", k, v) for k, v in single["cpu_seconds_per_1000"].items()]
    if batch["status"] == "ok":
        cpu_rows += [("POST /tasks/batch", k, v) for k, v in batch["cpu_seconds_per_1000"].items()]
    common.print_table("CPU seconds per 1,000 tasks created", ["route", "process", "cpu s / 1000"], cpu_rows)
    if "profile_summary" in single:
        profile_report.print_report("api (POST /tasks, PROFILED run)", single["profile_summary"])
    targets = {"POST /tasks >= 1000 req/s": single["requests_per_sec"] >= 1000}
    if batch["status"] == "ok":
        targets["batch >= 20000 tasks/s"] = batch["tasks_per_sec"] >= 20000
    common.print_table("Targets", ["target", "met"], list(targets.items()))
    params = {"client": client, "connections": args.connections, "duration": args.duration,
              "batch_size": args.batch_size, "batch_requests": args.batch_requests,
              "batch_duration": args.batch_duration, "batch_connections": args.batch_connections}  # fmt: skip
    return run.write(params, single=single, batch=batch, targets=targets)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
