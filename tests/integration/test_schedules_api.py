"""The /schedules routes: validation, addressing by id or name, changes, pause/resume, trigger, backfill
meeting live fires, the tasks of a schedule, and the per-schedule counters in /metrics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from taskscheduler.scheduler import schedules as step

NIGHTLY = {"name": "nightly", "task": "demo_ok", "cron": "30 2 * * *", "timezone": "Europe/Berlin"}


def fire(client, settings, now):
    """The scheduler's schedule step at `now`, on the app's database."""
    return step.run_once(database=client.app.state.database, settings=settings, now=now)


def create(client, **fields):
    response = client.post("/schedules", json=NIGHTLY | fields)
    assert response.status_code == 201, response.text
    return response.json()


def test_create_returns_the_schedule_with_its_next_five_fire_times(client):
    body = create(client, payload={"k": 1}, priority=8, jitter_sec=5)
    assert body["source"] == "api" and body["overlap"] == "skip" and body["catchup_window_sec"] == 300
    times = [datetime.fromisoformat(t) for t in body["next_fire_times"]]
    assert len(times) == 5 and times[0] == datetime.fromisoformat(body["next_fire_at"])
    berlin = [t.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Berlin")) for t in times]
    assert {(t.hour, t.minute) for t in berlin} <= {(2, 30), (3, 0)}
    assert (body["fires"], body["skips"], body["misses"]) == (0, 0, 0)
    assert client.get(f"/schedules/{body['id']}").json() == client.get("/schedules/nightly").json()


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"cron": "61 * * * *"}, "cron"),
        ({"cron": "* * *"}, "cron"),
        ({"cron": "@reboot"}, "cron"),
        ({"timezone": "Mars/Olympus"}, "timezone"),
        ({"cron": None, "every_sec": 0}, "every_sec"),
        ({"cron": None, "every_sec": 1.5}, "every_sec"),
        ({"cron": None, "every_sec": "60"}, "every_sec"),
        ({"every_sec": 60}, "cron"),
        ({"cron": None}, "cron"),
        ({"start_at": "2030-01-02T00:00:00Z", "end_at": "2030-01-01T00:00:00Z"}, "end_at"),
        ({"task": "no_such_handler"}, "task"),
        ({"name": "3f2c1d8e-0000-4000-8000-000000000000"}, "name"),
        ({"name": "has space"}, "name"),
        ({"catchup_window_sec": 0}, "catchup_window_sec"),
        ({"jitter_sec": -1}, "jitter_sec"),
        ({"overlap": "queue_all"}, "overlap"),
        ({"priority": 11}, "priority"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_schedules_are_a_422_naming_the_field(client, fields, loc):
    response = client.post("/schedules", json=NIGHTLY | fields)
    assert response.status_code == 422, response.text
    assert loc in [str(part) for error in response.json()["detail"] for part in error["loc"]], response.text


def test_names_are_unique(client):
    create(client)
    response = client.post("/schedules", json=NIGHTLY)
    assert response.status_code == 409 and "nightly" in response.json()["detail"]


def test_unknown_schedule_is_a_404(client):
    assert client.get("/schedules/nope").status_code == 404
    assert client.get("/schedules/3f2c1d8e-0000-4000-8000-000000000000").status_code == 404
    assert client.post("/schedules/nope/trigger").status_code == 404


def test_list_pages_by_name(client):
    for name in ("c", "a", "b"):
        create(client, name=name)
    first = client.get("/schedules", params={"limit": 2}).json()
    assert [s["name"] for s in first["schedules"]] == ["a", "b"]
    rest = client.get("/schedules", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [s["name"] for s in rest["schedules"]] == ["c"] and rest["next_cursor"] is None
    assert client.get("/schedules", params={"source": "code"}).json()["schedules"] == []


def test_patch_changes_the_fields_given_and_recomputes_the_next_fire(client):
    created = create(client)
    response = client.patch("/schedules/nightly", json={"every_sec": 3600, "note": "hourly now"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cron"] is None and body["every_sec"] == 3600 and body["note"] == "hourly now"
    assert body["next_fire_at"] != created["next_fire_at"]
    gaps = {
        (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()
        for a, b in zip(body["next_fire_times"], body["next_fire_times"][1:], strict=False)
    }
    assert gaps == {3600}
    assert client.patch("/schedules/nightly", json={"task": None}).status_code == 422
    assert client.patch("/schedules/nightly", json={"task": "nope"}).status_code == 422
    assert client.patch("/schedules/nightly", json={"end_at": "2000-01-01T00:00:00Z",
                                                    "start_at": "2001-01-01T00:00:00Z"}).status_code == 422  # fmt: skip
    create(client, name="other")
    assert client.patch("/schedules/nightly", json={"name": "other"}).status_code == 409
    renamed = client.patch(f"/schedules/{created['id']}", json={"name": "renamed"})
    assert renamed.status_code == 200 and client.get("/schedules/renamed").json()["id"] == created["id"]


def test_pause_resume(client):
    create(client)
    paused = client.post("/schedules/nightly/pause", json={"note": "holidays"}).json()
    assert paused["paused"] and paused["note"] == "holidays" and len(paused["next_fire_times"]) == 5
    assert client.post("/schedules/nightly/pause").json()["note"] is None  # no body: no note
    resumed = client.post("/schedules/nightly/resume").json()
    assert not resumed["paused"] and resumed["note"] is None
    assert datetime.fromisoformat(resumed["next_fire_at"]) > datetime.now(UTC)


def test_trigger_creates_one_task_now_and_the_tasks_list_finds_it(client):
    schedule = create(client, payload={"x": 1}, priority=9)
    response = client.post("/schedules/nightly/trigger")
    assert response.status_code == 201, response.text
    task = response.json()
    assert task["name"] == "demo_ok" and task["payload"] == {"x": 1} and task["queue"] == "high"
    assert task["schedule_id"] == schedule["id"] and task["scheduled_for"] is not None
    listed = client.get("/tasks", params={"schedule_id": schedule["id"]}).json()["tasks"]
    assert [t["id"] for t in listed] == [task["id"]]
    assert listed[0]["schedule_id"] == schedule["id"]
    assert client.get("/schedules/nightly").json()["fires"] == 1
    # Deleted: the schedule goes, its tasks stay.
    assert client.delete("/schedules/nightly").status_code == 204
    assert client.get("/schedules/nightly").status_code == 404
    assert len(client.get("/tasks", params={"schedule_id": schedule["id"]}).json()["tasks"]) == 1
    assert client.get("/tasks", params={"schedule_id": "nope"}).status_code == 422


def test_backfill_creates_only_the_missing_fires_and_live_fires_do_not_repeat_them(client, settings):
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    schedule = create(client, name="minutely", cron="* * * * *", timezone="UTC", overlap="allow")
    # Live: the scheduler fires the next three minutes (time injected).
    for m in range(1, 4):
        fire(client, settings, now=now + timedelta(minutes=m))
    assert client.get("/schedules/minutely").json()["fires"] == 3
    # A backfill from 5 minutes ago to 3 minutes ahead overlaps those three live fires.
    window = {"start": (now - timedelta(minutes=5)).isoformat(), "end": (now + timedelta(minutes=3)).isoformat()}
    first = client.post("/schedules/minutely/backfill", json=window)
    assert first.status_code == 200, first.text
    assert first.json() == {"created": 6, "existing": 3}
    assert client.post("/schedules/minutely/backfill", json=window).json() == {"created": 0, "existing": 9}
    # The scheduler meets fires the backfill made ahead of it: nothing twice.
    fire(client, settings, now=now + timedelta(minutes=3, seconds=30))
    tasks = client.get("/tasks", params={"schedule_id": schedule["id"], "limit": 100}).json()["tasks"]
    fire_times = sorted(t["scheduled_for"] for t in tasks)
    assert len(fire_times) == len(set(fire_times)) == 9
    assert client.get("/schedules/minutely").json()["fires"] == 9
    bad = client.post("/schedules/minutely/backfill", json={"start": window["end"], "end": window["start"]})
    assert bad.status_code == 422
    huge = client.post("/schedules/minutely/backfill", json={"start": "2000-01-01T00:00:00Z", "end": window["end"]})
    assert huge.status_code == 422 and "in parts" in huge.text


def test_metrics_show_each_schedules_counters(client, settings):
    first = datetime.fromisoformat(create(client, name="often", cron=None, every_sec=1)["next_fire_at"])
    fire(client, settings, now=first + timedelta(seconds=9))  # 10 fires due; skip: 1 runs
    text = client.get("/metrics").text
    assert 'taskscheduler_schedule_fires_total{schedule="often"} 1.0' in text
    assert 'taskscheduler_schedule_skips_total{schedule="often"} 9.0' in text
    assert 'taskscheduler_schedule_misses_total{schedule="often"} 0.0' in text
    assert 'taskscheduler_schedule_outcomes_total{outcome="fired"}' in text
    # One family per name: Prometheus refuses a metric described twice.
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
