"""`taskscheduler schedules ...` against a real API over HTTP."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from tests.helpers import cli_run as run
from tests.helpers import one_line_error

pytestmark = pytest.mark.usefixtures("restore_logging")


def test_schedule_commands(live_api: Any) -> None:
    url = ["--url", live_api.url]
    created = run("schedules", "create", "nightly", "--task", "demo_ok", "--cron", "30 2 * * *",
                  "--timezone", "Europe/Berlin", "--payload", '{"k": 1}', *url)  # fmt: skip
    assert created.exit_code == 0, created.output
    assert "30 2 * * * (Europe/Berlin)" in created.output and '{"k": 1}' in created.output
    every = run("schedules", "create", "often", "--task", "demo_ok", "--every", "1m", "--overlap", "allow", *url)
    assert every.exit_code == 0, every.output and "every 60 s" in every.output

    listed = run("schedules", "list", *url)
    assert listed.exit_code == 0, listed.output
    assert "nightly" in listed.output and "often" in listed.output and "every 60 s" in listed.output

    shown = run("schedules", "show", "nightly", *url)
    assert shown.exit_code == 0 and "next fires" in shown.output and "0 fired, 0 skipped, 0 missed" in shown.output

    paused = run("schedules", "pause", "nightly", "--note", "holidays", *url)
    assert paused.exit_code == 0 and paused.output.strip() == "nightly paused"
    assert "paused: holidays" in run("schedules", "show", "nightly", *url).output
    resumed = run("schedules", "resume", "nightly", *url)
    assert resumed.exit_code == 0 and "nightly active; next fire" in resumed.output

    triggered = run("schedules", "trigger", "often", *url)
    assert triggered.exit_code == 0, triggered.output
    start = (datetime.now(UTC) - timedelta(minutes=3)).isoformat()
    end = datetime.now(UTC).isoformat()
    backfilled = run("schedules", "backfill", "often", "--start", start, "--end", end, *url)
    assert backfilled.exit_code == 0, backfilled.output
    # Every minute since the schedule's creation, counted back: two or three fire times in three minutes.
    assert backfilled.output.strip() in ("2 created, 0 existed already", "3 created, 0 existed already")

    deleted = run("schedules", "delete", "often", *url)
    assert deleted.exit_code == 0 and deleted.output.strip() == "often deleted"
    assert "often" not in run("schedules", "list", *url).output


def test_schedule_command_errors(live_api: Any) -> None:
    url = ["--url", live_api.url]
    assert "exactly one of --cron and --every" in one_line_error(
        run("schedules", "create", "x", "--task", "demo_ok", *url), 2
    )
    assert "whole number of seconds" in one_line_error(
        run("schedules", "create", "x", "--task", "demo_ok", "--every", "500ms", *url), 2
    )
    bad_cron = one_line_error(run("schedules", "create", "x", "--task", "demo_ok", "--cron", "61 * * * *", *url), 1)
    assert "HTTP 422" in bad_cron and "cron" in bad_cron
    assert "HTTP 404" in one_line_error(run("schedules", "show", "missing", *url), 1)
