"""Read a py-spy `--format raw` (collapsed stacks) file and say where the time went.

    python -m tools.profile_report benchmarks/results/profiles-XXXX/worker.collapsed.txt

For each process in the file (a Celery worker's main process and its pool children are told
apart): samples, the share by library of the innermost frame ("self"), and the inclusive share of
the functions worth acting on (ours, and the library entry points they call). py-spy counts a
thread that waits on a socket as busy, so "psycopg" and "redis" include waiting for the server.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

# Innermost-frame file -> category; the first pattern that matches wins.
CATEGORIES: list[tuple[str, str]] = [
    (r"psycopg", "psycopg (PostgreSQL client, incl. waiting)"),
    (r"sqlalchemy", "SQLAlchemy"),
    (r"(^|/)redis/|kombu/transport/redis", "redis-py / kombu Redis transport (incl. waiting)"),
    (r"kombu/", "kombu"),
    (r"billiard/", "billiard (prefork pool)"),
    (r"celery/", "celery"),
    (r"(^|/)logging/", "logging"),
    (r"(^|/)threading\.py", "threading"),
    (r"(^|/)json/", "json"),
    (r"taskscheduler/", "taskscheduler"),
    (r"pydantic", "pydantic"),
    (r"(fastapi|starlette|uvicorn|anyio|h11|httptools)/", "FastAPI / Starlette / uvicorn / anyio"),
]
# Functions whose inclusive share is worth a line (matched against "function (file)").
NOTABLE = re.compile(
    r"\((taskscheduler/[^)]*)\)$"
    r"|^(Engine\.begin|Connection\.commit|Connection\.begin|_ConnectionFairy\._checkout|.*do_ping|Pool\.connect"
    r"|Connection\.execute|Logger\._log|Logger\.info|Handler\.handle|StreamHandler\.emit|Task\.apply_async"
    r"|Producer\.publish|Thread\.start|Thread\.join|Celery\.send_task|Request\.execute_using_pool"
    r"|TaskPool\.on_apply|AsynPool\._create_write_handlers.*|Consumer\.on_task_received.*|apply_timeout"
    r"|fast_trace_task|trace_task|Channel\._brpop_read|Channel\._do_restore_message|QoS\.ack"
    r"|MultiChannelPoller\.get|Channel\.basic_ack|run_endpoint_function|serialize_response|solve_dependencies"
    r"|request_response\.<locals>\.app|BaseModel\.model_validate|jsonable_encoder|run_in_threadpool"
    r"|to_thread\.run_sync|.*encode.*json.*|JSONResponse\.render) "
)
_FRAME = re.compile(r"^(?P<fn>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(path: str) -> str:
    parts = path.split("/")
    return "/".join(parts[-2:]) if len(parts) > 1 else path


def parse(path: Path) -> dict[str, dict[str, Any]]:
    """Per process (the innermost `process N:` frame): samples, self by category, inclusive by function."""
    procs: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"samples": 0, "self": Counter(), "inclusive": Counter(), "cmd": ""}
    )
    root_pid: str | None = None
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        pids = [f.split(":", 1)[0].split()[1] for f in frames if f.startswith("process ")]
        code = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not code:
            continue
        if root_pid is None and pids:
            root_pid = pids[0]
        pid = pids[-1] if pids else "?"
        proc = procs[pid]
        proc["samples"] += count
        leaf = _FRAME.match(code[-1])
        leaf_file = leaf.group("file") if leaf else code[-1]
        category = next((name for pat, name in CATEGORIES if re.search(pat, leaf_file)), "other (stdlib, C)")
        proc["self"][category] += count
        seen = set()
        for f in code:
            m = _FRAME.match(f)
            name = f"{m.group('fn')} ({_short(m.group('file'))})" if m else f
            if name not in seen:
                seen.add(name)
                proc["inclusive"][name] += count
    out: dict[str, dict[str, Any]] = {}
    for pid, proc in procs.items():
        role = "main" if pid in (root_pid, "?") else "child"
        out[f"{role} {pid}"] = proc
    return out


def report(path: Path, *, top: int = 25) -> dict[str, Any]:
    """JSON-able summary: per process, samples, self % by category, inclusive % of notable functions."""
    summary: dict[str, Any] = {}
    parsed = parse(path)
    total = sum(p["samples"] for p in parsed.values()) or 1
    # Pool children are alike: merge them.
    groups: dict[str, dict[str, Any]] = {}
    for key, proc in parsed.items():
        role = key.split()[0]
        g = groups.setdefault(role, {"samples": 0, "self": Counter(), "inclusive": Counter(), "processes": 0})
        g["samples"] += proc["samples"]
        g["self"].update(proc["self"])
        g["inclusive"].update(proc["inclusive"])
        g["processes"] += 1
    for role, g in groups.items():
        n = g["samples"] or 1
        notable = [(f, c) for f, c in g["inclusive"].most_common() if NOTABLE.search(f) and c / n < 0.97]
        summary[role] = {
            "processes": g["processes"],
            "samples": g["samples"],
            "share_of_all_samples_pct": round(100 * g["samples"] / total, 1),
            "self_by_library_pct": [(k, round(100 * v / n, 1)) for k, v in g["self"].most_common()],
            "inclusive_pct": [(f, round(100 * c / n, 1)) for f, c in notable[:top]],
        }
    return summary


def print_report(name: str, summary: dict[str, Any]) -> None:
    for role, s in summary.items():
        title = f"py-spy {name}, {role} process(es) x{s['processes']}: {s['samples']} samples"
        for part, rows in (("self time by library", s["self_by_library_pct"]), ("inclusive", s["inclusive_pct"])):
            print(f"{title} - {part}")
            print("\n".join(f"{pct:6.1f}%  {what}" for what, pct in rows), end="\n\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    for f in args.files:
        print_report(f.name.split(".")[0], report(f))


if __name__ == "__main__":
    main()
