"""The dashboard's HTML, page by page, in-process (TestClient) on the real database: every page's
states, escaping, filters and pages, the actions and their refusals, login and CSRF.

The same in a real browser against `taskscheduler api`: tests/e2e/test_dashboard.py."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tests.helpers import dead_recorded, far_future, new_task, one_of_each_status, task_row, to_started

from taskscheduler.api import create_app
from taskscheduler.api.ui.session import COOKIE_NAME, NONCE_COOKIE_NAME
from taskscheduler.config import Settings
from taskscheduler.lifecycle import DlqReason
from taskscheduler.scheduler import schedules as schedule_step
from taskscheduler.store import db, transitions, views
from taskscheduler.store import schedules as schedule_store

KEY = "dashboard-test-key-0123456789"
PAGES = ["/ui/", "/ui/tasks", "/ui/dlq", "/ui/schedules", "/ui/processes", "/ui/overview/live"]


def csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html[:2000]
    return match.group(1)


def text(html: str) -> str:
    """The page's text, tags removed, whitespace collapsed: what a reader sees."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@pytest.fixture
def secured(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings.model_copy(update={"api_keys": KEY}), process_heartbeat=False)
    with TestClient(app, raise_server_exceptions=False, follow_redirects=False) as test_client:
        yield test_client


def login(client: TestClient) -> None:
    form = client.get("/ui/login").text
    response = client.post("/ui/login", data={"csrf": csrf(form), "key": KEY, "next": "/ui/"})
    assert response.status_code == 303, response.text


# --- pages and their states ---------------------------------------------------------------------------------------


def test_every_page_renders_on_an_empty_database(settings: Settings) -> None:
    with TestClient(create_app(settings, process_heartbeat=False)) as client:
        empty_pages(client)
    with TestClient(create_app(settings)) as client:  # the API records its own heartbeat
        assert re.search(r"<td>api</td>", client.get("/ui/processes").text)


def empty_pages(client: TestClient) -> None:
    for path in PAGES:
        response = client.get(path)
        assert response.status_code == 200, (path, response.text[-2000:])
        assert response.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in response.headers["content-security-policy"]
    assert "nothing finished in this hour" in client.get("/ui/").text
    assert "No task matches" in client.get("/ui/tasks").text
    assert "No dead letters" in client.get("/ui/dlq").text
    assert "No schedule yet" in client.get("/ui/schedules").text
    assert "No process has recorded a heartbeat" in client.get("/ui/processes").text


def test_the_overview_counts_one_task_of_each_status_in_its_queue(client: TestClient) -> None:
    ids = one_of_each_status()
    html = client.get("/ui/").text
    for status, task_id in ids.items():
        queue = task_row(task_id)["queue"]
        cell = re.search(rf'data-status="{status}" data-queue="{queue}"><a [^>]*>(\d+)</a>', html)
        assert cell and cell.group(1) == "1", status
    assert "1 DEAD task" in text(html)
    assert f"/ui/tasks/{ids['DEAD']}" in html  # among the newest dead


def test_every_task_page_shows_its_status_and_the_actions_it_allows(client: TestClient) -> None:
    ids = one_of_each_status()
    for status, task_id in ids.items():
        html = client.get(f"/ui/tasks/{task_id}").text
        assert f'id="status">{status}<' in html
        assert ('id="cancel"' in html) == (status in ("PENDING", "ENQUEUED", "FAILED")), status
        assert ('id="retry"' in html) == (status in ("DEAD", "CANCELLED")), status
    succeeded = client.get(f"/ui/tasks/{ids['SUCCEEDED']}").text
    assert "&#34;ok&#34;: true" in succeeded
    listing = client.get("/ui/tasks").text
    assert all(f'data-id="{task_id}"' in listing for task_id in ids.values())


def test_html_in_a_payload_or_an_error_is_escaped_and_a_long_error_is_shown_whole(client: TestClient) -> None:
    payload = {"note": "<script>alert('payload')</script>", "<b>key</b>": "&amp;"}
    task_id = new_task(payload=payload)
    error = "<img src=x onerror=alert(1)> " + "x" * 3900 + " END"
    attempt = to_started(task_id)
    with db.transaction() as conn:
        transitions.fail(conn, task_id=task_id, attempt=attempt, error=error, retry_in_sec=600)
    html = client.get(f"/ui/tasks/{task_id}").text
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>key" not in html
    assert "&lt;script&gt;alert(&#39;payload&#39;)&lt;/script&gt;" in html
    assert "&amp;amp;" in html
    assert "x" * 3900 + " END</pre>" in html
    listing = client.get("/ui/tasks").text
    assert "<img src=x" not in listing and "&lt;img src=x" in listing


def test_an_unknown_or_malformed_task_id_is_a_404_page(client: TestClient) -> None:
    assert client.get(f"/ui/tasks/{uuid.uuid4()}").status_code == 404
    response = client.get("/ui/tasks/not-a-uuid<script>")
    assert response.status_code == 404 and "<script>" not in response.text


def test_the_search_box_opens_a_task_by_id_and_refuses_anything_else(client: TestClient) -> None:
    task_id = new_task()
    response = client.get("/ui/tasks", params={"q": f"  {task_id} "}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == f"/ui/tasks/{task_id}"
    refused = client.get("/ui/tasks", params={"q": "hello"})
    assert refused.status_code == 400 and "search takes a task id" in refused.text


def test_filters_and_keyset_pages_see_every_task_once(client: TestClient) -> None:
    ours = {new_task(name="demo_ok", priority=9) for _ in range(55)}
    others = {new_task(name="demo_fail", priority=2) for _ in range(3)}
    seen: list[str] = []
    url: str | None = "/ui/tasks?name=demo_ok&queue=high&status=PENDING"
    pages = 0
    while url:
        html = client.get(url).text
        seen += re.findall(r'data-id="([0-9a-f-]+)"', html)
        nxt = re.search(r'id="next-page" href="([^"]+)"', html)
        url = nxt.group(1).replace("&amp;", "&") if nxt else None
        pages += 1
    assert pages == 2
    assert sorted(seen) == sorted(str(i) for i in ours) and len(seen) == len(set(seen))
    low = re.findall(r'data-id="([0-9a-f-]+)"', client.get("/ui/tasks?queue=low").text)
    assert sorted(low) == sorted(str(i) for i in others)
    future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert "No task matches" in client.get(f"/ui/tasks?created_after={future}").text
    assert len(re.findall(r"data-id=", client.get(f"/ui/tasks?created_before={future}").text)) == 50


@pytest.mark.parametrize(
    "query",
    ["status=NOPE", "queue=dlq", "created_after=yesterday", "cursor=garbage"],
)
def test_a_bad_filter_is_a_400_page_that_says_why(client: TestClient, query: str) -> None:
    response = client.get(f"/ui/tasks?{query}")
    assert response.status_code == 400
    assert 'id="error-message"' in response.text


# --- actions ------------------------------------------------------------------------------------------------------


def test_cancel_needs_a_confirmation_and_refuses_as_the_api_does(client: TestClient) -> None:
    task_id = new_task(run_at=far_future())
    confirm = client.get(f"/ui/tasks/{task_id}/cancel")
    assert confirm.status_code == 200 and "Yes, cancel it" in confirm.text
    assert task_row(task_id)["status"] == "PENDING"  # showing the confirmation changes nothing
    token = csrf(confirm.text)
    done = client.post(f"/ui/tasks/{task_id}/cancel", data={"csrf": token}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"/ui/tasks/{task_id}?done=cancelled"
    assert task_row(task_id)["status"] == "CANCELLED"
    again = client.post(f"/ui/tasks/{task_id}/cancel", data={"csrf": token})
    api = client.post(f"/tasks/{task_id}/cancel")
    assert again.status_code == api.status_code == 409
    assert api.json()["detail"] in text(again.text)


def test_retry_brings_a_dead_task_back_and_a_pending_one_is_refused(client: TestClient) -> None:
    dead = new_task()
    dead_recorded(dead)
    token = csrf(client.get(f"/ui/tasks/{dead}/retry").text)
    assert client.post(f"/ui/tasks/{dead}/retry", data={"csrf": token}, follow_redirects=False).status_code == 303
    assert task_row(dead)["status"] == "PENDING"
    refused = client.post(f"/ui/tasks/{dead}/retry", data={"csrf": token})
    assert refused.status_code == 409
    assert client.post(f"/tasks/{dead}/retry").json()["detail"] in text(refused.text)
    assert "Only CANCELLED, DEAD tasks can be retried" in client.get(f"/ui/tasks/{dead}/retry").text


def test_dead_letters_retry_by_filter_shows_the_count_and_retries_those(client: TestClient) -> None:
    matching = []
    for _ in range(3):
        task_id = new_task(name="demo_fail")
        matching.append(task_id)  # each made just before it dies: the helper dispatches every due task
        dead_recorded(task_id, name="demo_fail", error="<b>boom</b>")
    other = new_task(name="demo_ok")
    dead_recorded(other)
    listing = client.get("/ui/dlq?name=demo_fail").text
    assert len(re.findall(r"<tr data-task=", listing)) == 3 and "&lt;b&gt;boom" in listing
    confirm = client.get("/ui/dlq/retry?name=demo_fail&reason=max_retries_exceeded")
    assert "Retry 3 dead tasks?" in confirm.text and "Yes, retry 3 tasks" in confirm.text
    form = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', confirm.text))
    late = new_task(name="demo_fail")
    dead_recorded(late, name="demo_fail")  # died after the count: not retried by this confirmation
    done = client.post("/ui/dlq/retry", data=form, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/ui/dlq?retried=3"
    assert [task_row(t)["status"] for t in matching] == ["PENDING"] * 3
    assert task_row(other)["status"] == task_row(late)["status"] == "DEAD"
    assert "Retried 3 tasks." in client.get("/ui/dlq?retried=3").text
    assert "No DEAD task matches" in client.get("/ui/dlq/retry?name=nothing-by-this-name").text


def test_the_dead_letter_list_pages_by_keyset(client: TestClient) -> None:
    for _ in range(52):
        dead_recorded(new_task())
    first = client.get("/ui/dlq").text
    assert len(re.findall(r"<tr data-task=", first)) == 50
    nxt = re.search(r'id="next-page" href="([^"]+)"', first)
    assert nxt
    second = client.get(nxt.group(1).replace("&amp;", "&")).text
    assert len(re.findall(r"<tr data-task=", second)) == 2
    assert not set(re.findall(r"data-task=\"([^\"]+)\"", first)) & set(re.findall(r"data-task=\"([^\"]+)\"", second))


def test_a_post_without_the_csrf_token_changes_nothing(client: TestClient) -> None:
    task_id = new_task(run_at=far_future())
    client.get("/ui/")  # the session cookie
    for data in ({}, {"csrf": "forged"}):
        response = client.post(f"/ui/tasks/{task_id}/cancel", data=data)
        assert response.status_code == 403 and "CSRF" in response.text
    assert client.post("/ui/dlq/retry", data={"until": datetime.now(UTC).isoformat()}).status_code == 403
    assert task_row(task_id)["status"] == "PENDING"


def test_a_form_post_is_refused_in_json_and_json_outside_the_dashboard_still_is(client: TestClient) -> None:
    response = client.post("/ui/logout", content=b"{}", headers={"content-type": "application/json"})
    assert response.status_code == 415
    assert client.post("/tasks", data={"name": "demo_ok"}).status_code == 415


# --- login --------------------------------------------------------------------------------------------------------


def test_with_api_keys_every_page_asks_for_a_login(secured: TestClient) -> None:
    for path in [*PAGES, f"/ui/tasks/{uuid.uuid4()}", f"/ui/tasks/{uuid.uuid4()}/cancel", "/ui/dlq/retry"]:
        response = secured.get(path)
        assert response.status_code == 303, path
        assert response.headers["location"].startswith("/ui/login?next=")
    assert secured.post(f"/ui/tasks/{uuid.uuid4()}/cancel", data={}).headers["location"].startswith("/ui/login")
    assert secured.get("/ui/login").status_code == 200
    assert secured.get("/ui/static/ui.css").status_code == 200
    assert secured.get("/tasks").status_code == 401  # the API still asks for its bearer key


def test_every_dashboard_route_is_behind_the_login(secured: TestClient) -> None:
    """A new page cannot forget the login: ApiKeyAuth lets all of /ui through to the dashboard's own check."""
    public = {"/ui", "/ui/login", "/ui/logout", "/ui/static"}
    for route in secured.app.routes:  # type: ignore[attr-defined]
        for path in _paths(route):
            if not path.startswith("/ui") or path in public:
                continue
            concrete = path.replace("{task_id}", str(uuid.uuid4())).replace("{ref}", "nightly")
            concrete = concrete.replace("{action}", "cancel" if "/tasks/" in path else "pause")
            assert secured.get(concrete).status_code == 303, path


def _paths(route: Any) -> list[str]:
    if hasattr(route, "path"):
        return [route.path]
    original = getattr(route, "original_router", None)
    context = getattr(route, "include_context", None)
    if original is None or context is None:
        return []
    return [context.prefix + r.path for r in original.routes if hasattr(r, "path")]


def test_a_login_sets_a_signed_strict_cookie_without_the_key_and_logout_ends_it(secured: TestClient) -> None:
    form = secured.get("/ui/login?next=/ui/dlq").text
    wrong = secured.post("/ui/login", data={"csrf": csrf(form), "key": "wrong", "next": "/ui/dlq"})
    assert wrong.status_code == 401 and "not one of the API keys" in wrong.text
    response = secured.post("/ui/login", data={"csrf": csrf(form), "key": KEY, "next": "/ui/dlq"})
    assert response.status_code == 303 and response.headers["location"] == "/ui/dlq"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui/" in cookie
    assert KEY not in cookie
    assert secured.get("/ui/tasks").status_code == 200
    logout = secured.post("/ui/logout", data={"csrf": csrf(secured.get("/ui/").text)})
    assert logout.status_code == 303 and logout.headers["location"] == "/ui/login"
    assert secured.get("/ui/tasks").status_code == 303


def test_login_refuses_a_forged_form_and_an_outside_next(secured: TestClient) -> None:
    secured.get("/ui/login")
    assert secured.post("/ui/login", data={"key": KEY}).status_code == 403
    form = secured.get("/ui/login").text
    response = secured.post("/ui/login", data={"csrf": csrf(form), "key": KEY, "next": "https://evil.example/"})
    assert response.headers["location"] == "/ui/"
    assert secured.cookies.get(COOKIE_NAME, path="/ui/")


def test_a_request_without_the_login_cookie_does_not_overwrite_it(secured: TestClient) -> None:
    """As a link followed from another site arrives: SameSite=Strict keeps the login cookie off it."""
    login(secured)
    secured.cookies.clear()
    response = secured.get("/ui/tasks")
    assert response.status_code == 303
    cookies = response.headers.get_list("set-cookie")
    assert cookies and all(c.startswith(f"{NONCE_COOKIE_NAME}=") for c in cookies)


def test_an_altered_cookie_is_no_session(secured: TestClient) -> None:
    login(secured)
    cookie = secured.cookies.get(COOKIE_NAME, path="/ui/")
    assert cookie
    secured.cookies.clear()
    secured.cookies.set(COOKIE_NAME, cookie[:-3] + "AAA", path="/ui/")
    assert secured.get("/ui/tasks").status_code == 303


# --- schedules ----------------------------------------------------------------------------------------------------

T0 = datetime(2025, 1, 6, 12, 0, tzinfo=UTC)  # in the past, on the minute: the step's ticks are injected


def stored_schedule(conn_now: datetime, **fields: Any) -> dict[str, Any]:
    fields = {"task": "demo_ok", "priority": 5, "max_retries": 0} | fields
    with db.transaction() as conn:
        return dict(schedule_store.create_schedule(conn, fields, now=conn_now))


def tick(settings: Settings, now: datetime) -> None:
    schedule_step.run_once(database=db.database_for(), settings=settings, now=now)


def schedule_row(name: str) -> dict[str, Any]:
    with db.transaction() as conn:
        row = schedule_store.get_schedule(conn, name)
    assert row is not None
    return dict(row)


def row_html(html: str, name: str) -> str:
    match = re.search(rf'<tr data-name="{re.escape(name)}".*?</tr>', html, re.S)
    assert match, html[-3000:]
    return match.group(0)


def test_the_schedules_page_shows_spec_zone_policies_next_fire_times_and_counts(
    client: TestClient, settings: Settings
) -> None:
    created = client.post(
        "/schedules",
        json={"name": "nightly-berlin", "task": "demo_ok", "cron": "30 2 * * *", "timezone": "Europe/Berlin",
              "overlap": "buffer_one", "catchup_window_sec": 600, "jitter_sec": 30},
    )  # fmt: skip
    assert created.status_code == 201, created.text
    # A minute schedule with a 5-minute window misses 5 each time the ticks leave a 10-minute gap (twice);
    # one whose task has not finished when it fires again skips.
    stored_schedule(T0 - timedelta(seconds=1), name="every-minute", every_sec=60, catchup_window_sec=300,
                    overlap="allow")  # fmt: skip
    stored_schedule(T0 + timedelta(minutes=20), name="no-overlap", cron="* * * * *", overlap="skip")
    for minutes in (1, 11.5, 21, 22):
        tick(settings, T0 + timedelta(minutes=minutes))
    html = client.get("/ui/schedules").text
    assert re.findall(r'<tr data-name="([^"]+)"', html) == ["every-minute", "nightly-berlin", "no-overlap"]
    for name in ("every-minute", "nightly-berlin", "no-overlap"):
        row = schedule_row(name)
        cells = row_html(html, name)
        assert f'<td class="num skips">{row["skips"]}</td>' in cells, name
        assert f'<td class="num misses">{row["misses"]}</td>' in cells, name
    assert (schedule_row("every-minute")["misses"], schedule_row("no-overlap")["skips"]) == (10, 1)
    berlin = row_html(html, "nightly-berlin")
    assert "cron <code>30 2 * * *</code>" in berlin and "<td>Europe/Berlin</td>" in berlin
    assert "overlap buffer_one" in berlin and "catch-up 10 min" in berlin and "jitter 30 s" in berlin
    fires = created.json()["next_fire_times"]
    assert re.findall(r'<time datetime="([^"]+)"', berlin.split('class="fire-times"')[1]) == [
        datetime.fromisoformat(t).isoformat() for t in fires[:3]
    ]
    assert "every 60 s" in row_html(html, "every-minute")

    page = client.get(f"/ui/schedules/{created.json()['id']}").text
    local = re.findall(r"<td>(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (CET|CEST)</td>", page)
    assert len(local) == 5 and all(t.endswith("02:30:00") for t, _ in local)
    assert 'id="state">active<' in page and 'id="no-tasks"' in page
    by_name = client.get("/ui/schedules/nightly-berlin")  # a name serves in place of the id
    assert by_name.status_code == 200 and f"<code>{created.json()['id']}</code>" in by_name.text


def test_pause_resume_and_trigger_need_a_confirmation_and_a_csrf_token(client: TestClient) -> None:
    created = client.post("/schedules", json={"name": "hourly", "task": "demo_ok", "every_sec": 3600}).json()
    schedule_id = created["id"]
    confirm = client.get("/ui/schedules/hourly/pause")
    assert confirm.status_code == 200 and "Yes, pause it" in confirm.text and 'name="note"' in confirm.text
    assert schedule_row("hourly")["paused"] is False  # showing the confirmation changes nothing
    token = csrf(confirm.text)
    assert client.post(f"/ui/schedules/{schedule_id}/pause", data={"note": "x"}).status_code == 403
    assert schedule_row("hourly")["paused"] is False
    done = client.post(f"/ui/schedules/{schedule_id}/pause", data={"csrf": token, "note": "<b>db migration</b>"},
                       follow_redirects=False)  # fmt: skip
    assert done.status_code == 303 and done.headers["location"] == f"/ui/schedules/{schedule_id}?done=paused"
    row = schedule_row("hourly")
    assert row["paused"] is True and row["note"] == "<b>db migration</b>"
    page = client.get(done.headers["location"]).text
    assert 'id="state">paused<' in page and "Schedule paused." in page and "&lt;b&gt;db migration" in page
    assert "paused already" in client.get(f"/ui/schedules/{schedule_id}/pause").text
    again = client.post(f"/ui/schedules/{schedule_id}/pause", data={"csrf": token})
    assert again.status_code == 409 and "paused already" in again.text

    assert "not made up" in client.get(f"/ui/schedules/{schedule_id}/resume").text
    resumed = client.post(f"/ui/schedules/{schedule_id}/resume", data={"csrf": token}, follow_redirects=False)
    assert resumed.status_code == 303 and schedule_row("hourly")["paused"] is False
    assert client.post(f"/ui/schedules/{schedule_id}/resume", data={"csrf": token}).status_code == 409

    assert "Yes, create the task" in client.get(f"/ui/schedules/{schedule_id}/trigger").text
    triggered = client.post(f"/ui/schedules/{schedule_id}/trigger", data={"csrf": token}, follow_redirects=False)
    assert triggered.status_code == 303
    task_id = uuid.UUID(re.search(r"task=([0-9a-f-]+)", triggered.headers["location"]).group(1))  # type: ignore[union-attr]
    task = task_row(task_id)
    assert (str(task["schedule_id"]), task["status"]) == (schedule_id, "PENDING")
    assert schedule_row("hourly")["fires"] == 1
    page = client.get(triggered.headers["location"]).text
    assert f'href="/ui/tasks/{task_id}"' in page and f'<tr data-id="{task_id}">' in page
    assert client.get("/ui/schedules/nope").status_code == 404
    assert client.get(f"/ui/schedules/{schedule_id}/delete").status_code == 404
    assert client.post(f"/ui/schedules/{uuid.uuid4()}/trigger", data={"csrf": token}).status_code == 404


def test_the_tasks_page_filters_by_schedule_and_a_task_shows_its_schedule(client: TestClient) -> None:
    ids = {}
    for name in ("a-schedule", "b-schedule"):
        ids[name] = client.post("/schedules", json={"name": name, "task": "demo_ok", "every_sec": 3600}).json()["id"]
    a_tasks = {client.post("/schedules/a-schedule/trigger").json()["id"] for _ in range(2)}
    b_task = client.post("/schedules/b-schedule/trigger").json()["id"]
    plain = new_task()

    def listed(query: str) -> set[str]:
        response = client.get(f"/ui/tasks?{query}")
        assert response.status_code == 200, response.text
        return set(re.findall(r'data-id="([0-9a-f-]+)"', response.text))

    assert listed("schedule=a-schedule") == listed(f"schedule={ids['a-schedule']}") == a_tasks
    assert listed("schedule=b-schedule") == {b_task} and str(plain) in listed("")
    assert 'value="a-schedule"' in client.get("/ui/tasks?schedule=a-schedule").text
    refused = client.get("/ui/tasks?schedule=no-such-schedule")
    assert refused.status_code == 400 and "no schedule named" in refused.text
    page = client.get(f"/ui/tasks/{b_task}").text
    assert re.search(rf'id="schedule"><a href="/ui/schedules/{ids["b-schedule"]}">b-schedule</a>, fire time', page)
    assert 'id="schedule">—<' in client.get(f"/ui/tasks/{plain}").text
    assert client.delete("/schedules/b-schedule").status_code == 204
    assert listed(f"schedule={ids['b-schedule']}") == {b_task}  # its tasks stay, and keep its id
    assert f"{ids['b-schedule']}</code> (deleted)" in client.get(f"/ui/tasks/{b_task}").text


# --- explain over the API -----------------------------------------------------------------------------------------


def test_explain_answers_in_codes_and_words_with_the_api_key(secured: TestClient) -> None:
    future = new_task(run_at=far_future())
    headers = {"Authorization": f"Bearer {KEY}"}
    assert secured.get(f"/tasks/{future}/explain").status_code == 401
    body = secured.get(f"/tasks/{future}/explain", headers=headers).json()
    assert body["status"] == "PENDING"
    assert [r["code"] for r in body["reasons"]] == ["waiting_for_run_at", "no_live_scheduler", "no_live_worker"]
    assert body["reasons"][0]["until"] is not None
    assert secured.get(f"/tasks/{uuid.uuid4()}/explain", headers=headers).status_code == 404
    assert secured.get("/tasks/nope/explain", headers=headers).status_code == 422


# --- bounded reads ------------------------------------------------------------------------------------------------


def test_counts_above_the_cap_are_estimates_and_below_it_exact(clean_db: Any) -> None:
    for _ in range(5):
        new_task(run_at=far_future())
    new_task(run_at=far_future(), priority=9)
    with db.transaction() as conn:
        conn.exec_driver_sql("ANALYZE tasks")
        capped = views.status_counts(conn, cap=3)
        exact = views.status_counts(conn, cap=100)
    assert exact.totals["PENDING"] == views.Count(6, True)
    assert exact.cells[("PENDING", "default")] == views.Count(5, True)
    assert not capped.totals["PENDING"].exact and capped.totals["PENDING"].n >= 4
    assert not capped.cells[("PENDING", "default")].exact
    assert capped.totals["DEAD"] == views.Count(0, True)


def test_the_charts_read_no_more_than_their_cap_and_say_where_they_start(client: TestClient) -> None:
    for _ in range(4):
        task_id = new_task()
        attempt = to_started(task_id)
        with db.transaction() as conn:
            transitions.succeed(conn, task_id=task_id, attempt=attempt, result=None)
    with db.transaction() as conn:
        now = views.database_now(conn)
        since = now - timedelta(hours=1)
        full = views.recent_activity(conn, now=now, since=since)
        capped = views.recent_activity(conn, now=now, since=since, cap=2)
    assert sum(m.finished for m in full.minutes) == 4 and full.counted_from is None
    assert full.by_queue["default"].finished == 4 and full.by_queue["default"].lag_p50 is not None
    assert sum(m.finished for m in capped.minutes) == 2 and capped.counted_from is not None
    assert DlqReason.MAX_RETRIES_EXCEEDED  # the enum the DLQ page offers
