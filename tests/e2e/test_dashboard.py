"""The dashboard in a real browser: Debian's chromium driven by Playwright, against `taskscheduler api`
(and the scheduler and workers where a test needs tasks to run), on the run's private database.

Screenshots of every page, light and dark, are saved as artifacts: to $UI_SCREENSHOTS, else
<basetemp>/screenshots. Without chromium the tests are skipped, and fail under
TASKSCHEDULER_REQUIRE_SERVICES=1 (CI installs it: .ci/run).
"""

from __future__ import annotations

import os
import re
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REQUIRE_SERVICES
from tests.e2e.conftest import Cluster
from tests.helpers import dead_recorded, far_future, new_task, one_of_each_status, task_row, wait_until

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
# Headless, and nothing that reaches for the network on its own (updates, sync, QUIC probes).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "e2e-dashboard-key-0123456789abcdef"
WAIT_MS = 20_000
LOGIN_PAGE = re.compile(r"/ui/login\?next=")

# WCAG AA contrast of every visible piece of text (SVG text by its fill) against the background it is
# drawn on (the first opaque background among its ancestors): 4.5:1, 3:1 for large text.
CONTRAST_FAILURES_JS = """
() => {
  const parse = (c) => { const m = c.match(/[\\d.]+/g) || []; return m.map(Number); };
  const lum = ([r, g, b]) => {
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
  };
  const background = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = parse(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] > 0.99)) return c.slice(0, 3);
    }
    return parse(getComputedStyle(document.documentElement).backgroundColor).slice(0, 3);
  };
  const failures = [];
  for (const el of document.querySelectorAll("body *")) {
    const own = Array.from(el.childNodes).some((n) => n.nodeType === 3 && n.textContent.trim());
    if (!own || !el.getClientRects().length) continue;
    const style = getComputedStyle(el);
    if (style.visibility === "hidden") continue;
    const inSvg = el instanceof SVGElement;
    const fg = parse(inSvg ? style.fill : style.color).slice(0, 3);
    const bg = background(inSvg ? el.ownerSVGElement : el);
    const [a, b] = [lum(fg), lum(bg)].sort((x, y) => y - x);
    const ratio = (a + 0.05) / (b + 0.05);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
    const text = el.textContent.trim().slice(0, 40);
    if (ratio < (large ? 3 : 4.5)) failures.push(`${el.tagName} "${text}": ${ratio.toFixed(2)}`);
  }
  return failures;
}
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        message = f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)"
        if REQUIRE_SERVICES:
            pytest.fail(f"{message} (TASKSCHEDULER_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("UI_SCREENSHOTS") or tmp_path_factory.getbasetemp() / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def open_page(browser: Any) -> Iterator[Callable[..., Any]]:
    contexts: list[Any] = []

    def make(base_url: str, *, scheme: str = "light") -> Any:
        context = browser.new_context(base_url=base_url, color_scheme=scheme, viewport={"width": 1280, "height": 900})
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        return context.new_page()

    yield make
    for context in contexts:
        context.close()


@pytest.fixture
def api(cluster_factory: type[Cluster]) -> Cluster:
    cluster = cluster_factory()
    cluster.start_api()
    return cluster


@pytest.fixture
def running(cluster_factory: type[Cluster]) -> Cluster:
    """The api, a scheduler and a worker of the default queue: tasks run."""
    cluster = cluster_factory()
    cluster.start_api()
    cluster.start("scheduler")
    cluster.start_worker("default")
    return cluster


def expect() -> Any:
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=WAIT_MS)
    return playwright_expect


def body_background_luminance(page: Any) -> float:
    rgb = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    r, g, b = (int(v) for v in re.findall(r"\d+", rgb)[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


# --- every page ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_page_renders_readably_in_light_and_dark(
    api: Cluster, open_page: Callable[..., Any], screenshots: Path, scheme: str
) -> None:
    ids = one_of_each_status()
    for name, every_sec in (("hourly-report", 3600), ("nightly-export", 86400)):
        body = {"name": name, "task": "demo_ok", "every_sec": every_sec, "timezone": "Europe/Berlin"}
        assert httpx.post(f"{api.url}/schedules", json=body).status_code == 201
    assert httpx.post(f"{api.url}/schedules/nightly-export/pause", json={"note": "until the move"}).status_code == 200
    page = open_page(api.url, scheme=scheme)
    pages = {
        "overview": "/ui/",
        "tasks": "/ui/tasks",
        "task": f"/ui/tasks/{ids['FAILED']}",
        "task-dead": f"/ui/tasks/{ids['DEAD']}",
        "dead-letters": "/ui/dlq",
        "processes": "/ui/processes",
        "confirm-retry": "/ui/dlq/retry?name=demo_fail",
        "schedules": "/ui/schedules",
        "schedule-paused": "/ui/schedules/nightly-export",
    }
    for name, path in pages.items():
        response = page.goto(path)
        assert response is not None and response.status == 200, name
        page.screenshot(path=str(screenshots / f"{name}-{scheme}.png"), full_page=True)
        assert page.evaluate(CONTRAST_FAILURES_JS) == [], name
        luminance = body_background_luminance(page)
        assert luminance < 0.2 if scheme == "dark" else luminance > 0.9, name
    page.goto("/ui/")
    expect()(page.locator('#counts td[data-status="DEAD"][data-queue="all"]')).to_have_text("1")
    expect()(page.locator("#processes")).to_contain_text("api")


def test_the_overview_refreshes_in_place(api: Cluster, open_page: Callable[..., Any]) -> None:
    page = open_page(api.url)
    page.goto("/ui/")
    cell = page.locator('#counts td[data-status="PENDING"][data-queue="low"]')
    expect()(cell).to_have_text("0")
    page.evaluate("() => { window.notReloaded = true; }")
    new_task(priority=1, run_at=far_future())
    expect()(cell).to_have_text("1")
    assert page.evaluate("() => window.notReloaded") is True
    toggle = page.locator("#refresh-toggle")
    toggle.click()
    expect()(toggle).to_have_attribute("aria-pressed", "true")


def test_the_keyboard_reaches_the_content_and_the_navigation(api: Cluster, open_page: Callable[..., Any]) -> None:
    page = open_page(api.url)
    page.goto("/ui/tasks")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("() => document.activeElement.id") == "main"
    page.goto("/ui/tasks")
    for _ in range(3):
        page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.textContent") == "Overview"
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/ui/$"))


# --- tasks --------------------------------------------------------------------------------------------------------


def test_filter_the_task_list_and_follow_its_pages(api: Cluster, open_page: Callable[..., Any]) -> None:
    wanted = {str(new_task(name="demo_ok", priority=9, run_at=far_future())) for _ in range(55)}
    for _ in range(4):
        new_task(name="demo_fail", priority=9, run_at=far_future())
        new_task(name="demo_ok", priority=2, run_at=far_future())
    page = open_page(api.url)
    page.goto("/ui/tasks")
    page.get_by_label("PENDING", exact=True).check()
    page.get_by_label("Name", exact=True).fill("demo_ok")
    page.get_by_label("Queue", exact=True).select_option("high")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("#tasks tbody tr")
    expect()(rows).to_have_count(50)
    seen = set(rows.evaluate_all("rows => rows.map(r => r.dataset.id)"))
    page.get_by_role("link", name="Next page").click()
    expect()(rows).to_have_count(5)
    seen |= set(rows.evaluate_all("rows => rows.map(r => r.dataset.id)"))
    assert seen == wanted
    expect()(page.get_by_role("link", name="Next page")).to_have_count(0)
    some_id = next(iter(wanted))
    page.get_by_label("Find a task by id").fill(some_id)
    page.keyboard.press("Enter")
    page.wait_for_url(f"**/ui/tasks/{some_id}")


def test_a_task_shows_its_events_in_order_with_the_worker_of_each_attempt(
    running: Cluster, open_page: Callable[..., Any], screenshots: Path
) -> None:
    cluster = running
    created = httpx.post(
        f"{cluster.url}/tasks", json={"name": "demo_flaky", "payload": {"failures": 1}, "max_retries": 2}
    ).json()
    wait_until(lambda: task_row(uuid.UUID(created["id"]))["status"] == "SUCCEEDED", timeout=60, what="SUCCEEDED")
    page = open_page(cluster.url)
    page.goto(f"/ui/tasks/{created['id']}")
    order = page.locator("#timeline li").evaluate_all("items => items.map(i => i.dataset.to)")
    assert order == ["PENDING", "ENQUEUED", "STARTED", "FAILED", "ENQUEUED", "STARTED", "SUCCEEDED"]
    workers = page.locator("#attempts td.worker").all_inner_texts()
    assert len(workers) == 2 and all(w.startswith("default-") for w in workers)
    expect()(page.locator("#attempts")).to_contain_text("FAILED")
    expect()(page.locator("#result")).to_contain_text('"succeeded_on_attempt": 2')
    expect()(page.locator("#payload")).to_contain_text('"failures": 1')
    expect()(page.locator("#reasons")).to_contain_text("SUCCEEDED")
    page.screenshot(path=str(screenshots / "task-timeline-light.png"), full_page=True)


def test_cancel_a_pending_task_with_the_keyboard_after_a_confirmation(
    api: Cluster, open_page: Callable[..., Any]
) -> None:
    task_id = new_task(run_at=far_future())
    page = open_page(api.url)
    page.goto(f"/ui/tasks/{task_id}")
    page.locator("#cancel").focus()
    page.keyboard.press("Enter")
    expect()(page.locator("#confirm-message")).to_contain_text(f"Cancel task {task_id}")
    assert task_row(task_id)["status"] == "PENDING"
    page.keyboard.press("Enter")  # the confirmation's button has the focus
    expect()(page.locator("#done")).to_have_text("Task cancelled.")
    expect()(page.locator("#status")).to_have_text("CANCELLED")
    assert task_row(task_id)["status"] == "CANCELLED"


def test_a_cancel_that_comes_too_late_gets_the_apis_409(api: Cluster, open_page: Callable[..., Any]) -> None:
    task_id = new_task(run_at=far_future())
    page = open_page(api.url)
    page.goto(f"/ui/tasks/{task_id}/cancel")
    assert httpx.post(f"{api.url}/tasks/{task_id}/cancel").status_code == 200  # someone else was quicker
    api_refusal = httpx.post(f"{api.url}/tasks/{task_id}/cancel")
    page.get_by_role("button", name="Yes, cancel it").click()
    assert api_refusal.status_code == 409
    expect()(page.locator("#error-message")).to_have_text(api_refusal.json()["detail"])


# --- dead letters -------------------------------------------------------------------------------------------------


def test_retry_a_dead_task_from_the_dead_letters_and_see_it_run(
    cluster_factory: type[Cluster], open_page: Callable[..., Any]
) -> None:
    # Dead as the worker and the DLQ worker leave a task that ran out of retries (a handler that fails
    # again after the retry would not show the retry working).
    task_id = new_task(name="demo_ok", payload={"hello": "again"}, max_retries=0)
    dead_recorded(task_id, name="demo_ok", error="HandlerError: the first time round")
    cluster = cluster_factory()
    cluster.start_api()
    cluster.start("scheduler")
    cluster.start_worker("default")
    page = open_page(cluster.url)
    page.goto("/ui/dlq")
    row = page.locator(f'#dead-letters tr[data-task="{task_id}"]')
    expect()(row).to_contain_text("max_retries_exceeded")
    row.get_by_role("link", name=re.compile("Retry")).click()
    page.get_by_role("button", name="Yes, retry it").click()
    expect()(page.locator("#done")).to_have_text("Task retried.")
    wait_until(lambda: task_row(task_id)["status"] == "SUCCEEDED", timeout=60, what="the rerun")
    page.reload()
    expect()(page.locator("#status")).to_have_text("SUCCEEDED")
    expect()(page.locator("#attempts tbody tr")).to_have_count(2)
    expect()(page.locator("#result")).to_contain_text('"hello": "again"')


def test_retry_dead_tasks_by_filter_after_seeing_how_many(api: Cluster, open_page: Callable[..., Any]) -> None:
    matching = []
    for _ in range(3):
        task_id = new_task(name="demo_fail")
        matching.append(task_id)
        dead_recorded(task_id, name="demo_fail")
    other = new_task(name="demo_ok")
    dead_recorded(other)
    page = open_page(api.url)
    page.goto("/ui/dlq")
    page.get_by_label("Name", exact=True).fill("demo_fail")
    page.get_by_role("button", name="Retry all DEAD tasks matching…").click()
    expect()(page.get_by_role("heading", level=1)).to_have_text("Retry 3 dead tasks?")
    page.get_by_role("button", name="Yes, retry 3 tasks").click()
    expect()(page.locator("#done")).to_have_text("Retried 3 tasks.")
    assert [task_row(t)["status"] for t in matching] == ["PENDING"] * 3
    assert task_row(other)["status"] == "DEAD"


# --- schedules ----------------------------------------------------------------------------------------------------


def test_pause_trigger_and_resume_a_schedule_and_see_its_task_run(
    running: Cluster, open_page: Callable[..., Any], screenshots: Path
) -> None:
    cluster = running
    # Daily, from now: it does not fire by itself during the test.
    body = {"name": "daily-report", "task": "demo_ok", "payload": {"report": "daily"}, "every_sec": 86400}
    assert httpx.post(f"{cluster.url}/schedules", json=body).status_code == 201
    page = open_page(cluster.url)
    page.goto("/ui/schedules")
    row = page.locator('#schedules tr[data-name="daily-report"]')
    expect()(row).to_contain_text("every 86,400 s")
    page.screenshot(path=str(screenshots / "schedules-light.png"), full_page=True)

    row.get_by_role("link", name="Pause schedule daily-report").click()
    page.get_by_label("Note (why it is paused; optional)").fill("until the quarter closes")
    page.get_by_role("button", name="Yes, pause it").click()
    expect()(page.locator("#done")).to_have_text("Schedule paused.")
    expect()(page.locator("#state")).to_have_text("paused")
    expect()(page.locator("#note")).to_contain_text("until the quarter closes")

    page.locator("#trigger").focus()
    page.keyboard.press("Enter")
    expect()(page.locator("#confirm-message")).to_contain_text("Create one task of schedule daily-report")
    page.keyboard.press("Enter")  # the confirmation's button has the focus
    expect()(page.locator("#done")).to_contain_text("It created task")
    page.screenshot(path=str(screenshots / "schedule-light.png"), full_page=True)
    page.locator("#done a").click()
    task_id = uuid.UUID(page.url.rsplit("/", 1)[1])
    expect()(page.locator("#schedule")).to_contain_text("daily-report")
    wait_until(lambda: task_row(task_id)["status"] == "SUCCEEDED", timeout=60, what="the triggered task")
    page.reload()
    expect()(page.locator("#status")).to_have_text("SUCCEEDED")
    expect()(page.locator("#result")).to_contain_text('"report": "daily"')

    page.locator("#schedule a").click()
    expect()(page.locator("#fires")).to_have_text("1")
    page.get_by_role("link", name="Resume…").click()
    page.get_by_role("button", name="Yes, resume it").click()
    expect()(page.locator("#state")).to_have_text("active")
    page.locator("#its-tasks").click()
    expect()(page.get_by_label("Schedule (name or id)")).not_to_have_value("")
    expect()(page.locator("#tasks tbody tr")).to_have_count(1)
    new_task()  # not the schedule's: the filter leaves it out
    page.goto("/ui/tasks")
    page.get_by_label("Schedule (name or id)").fill("daily-report")
    page.get_by_role("button", name="Filter").click()
    expect()(page.locator("#tasks tbody tr")).to_have_count(1)
    assert page.locator("#tasks tbody tr").get_attribute("data-id") == str(task_id)


# --- access -------------------------------------------------------------------------------------------------------


def test_log_in_with_a_key_refuse_forged_posts_and_log_out(
    cluster_factory: type[Cluster], open_page: Callable[..., Any], screenshots: Path
) -> None:
    cluster = cluster_factory(API_KEYS=KEY)
    cluster.start_api()
    task_id = new_task(run_at=far_future())
    page = open_page(cluster.url)
    page.goto("/ui/tasks")
    page.wait_for_url(LOGIN_PAGE)
    page.screenshot(path=str(screenshots / "login-light.png"))
    page.get_by_label("API key").fill("not-the-key")
    page.get_by_role("button", name="Log in").click()
    expect()(page.locator("#error-message")).to_contain_text("not one of the API keys")
    page.get_by_label("API key").fill(KEY)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/ui/tasks")
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "taskscheduler_ui"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and KEY not in cookie["value"]

    # The session's cookie goes with it, but no CSRF token: refused.
    forged = page.request.post(f"/ui/tasks/{task_id}/cancel", form={"csrf": "guess"}, max_redirects=0)
    assert forged.status == 403
    # A form on another site: the browser does not send the SameSite=Strict cookie with it.
    other_site = page.context.new_page()
    form = f'<form method="post" action="{cluster.url}/ui/tasks/{task_id}/cancel"><button>go</button></form>'
    # Served by the browser itself (nothing leaves the machine), from an origin of another site.
    other_site.route("http://other.example/", lambda route: route.fulfill(body=form, content_type="text/html"))
    other_site.goto("http://other.example/")
    other_site.get_by_role("button", name="go").click()
    other_site.wait_for_url(LOGIN_PAGE)
    assert task_row(task_id)["status"] == "PENDING"

    page.get_by_role("button", name="Log out").click()
    page.wait_for_url("**/ui/login")
    page.goto("/ui/")
    page.wait_for_url(LOGIN_PAGE)


# --- why is it not running ----------------------------------------------------------------------------------------


def reasons(cluster: Cluster, task_id: str) -> list[str]:
    response = httpx.get(f"{cluster.url}/tasks/{task_id}/explain")
    assert response.status_code == 200, response.text
    return [r["code"] for r in response.json()["reasons"]]


def create(cluster: Cluster, **body: Any) -> str:
    response = httpx.post(f"{cluster.url}/tasks", json={"name": "demo_ok", **body})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_each_reason_a_task_is_not_running_from_real_processes(
    cluster_factory: type[Cluster], open_page: Callable[..., Any], screenshots: Path
) -> None:
    # One unclaimed task fills a queue; a failed attempt waits an hour; a worker only for high and low.
    cluster = cluster_factory(MAX_ENQUEUED_PER_QUEUE="1", RETRY_BACKOFF_BASE_SEC="3600", RETRY_BACKOFF_MAX_SEC="3600")
    cluster.start_api()
    first = create(cluster, priority=5)
    later = create(cluster, priority=5, run_at=far_future().isoformat())
    assert reasons(cluster, first) == ["no_live_scheduler", "no_live_worker"]
    assert reasons(cluster, later) == ["waiting_for_run_at", "no_live_scheduler", "no_live_worker"]

    cluster.start("scheduler")
    wait_until(lambda: task_row(uuid.UUID(first))["status"] == "ENQUEUED", timeout=60, what="ENQUEUED")
    held = create(cluster, priority=5)
    ahead = create(cluster, priority=6)
    wait_until(lambda: "queue_backpressure" in reasons(cluster, held), timeout=30, what="back-pressure")
    assert reasons(cluster, first)[0] == "no_live_worker"  # and message_maybe_lost, once 5 s have passed
    assert reasons(cluster, held) == ["queue_backpressure", "behind_due_tasks", "no_live_worker"]
    assert reasons(cluster, ahead) == ["queue_backpressure", "no_live_worker"]

    cluster.start_worker("high")
    failing = create(cluster, name="demo_fail", payload={"fail": True}, priority=9, max_retries=2)
    wait_until(lambda: task_row(uuid.UUID(failing))["status"] == "FAILED", timeout=60, what="FAILED")
    assert reasons(cluster, failing) == ["retry_backoff"]

    low_worker = cluster.start_worker("low")
    hanging = create(cluster, name="demo_hang", payload={"sleep_sec": 60}, priority=2)
    wait_until(lambda: task_row(uuid.UUID(hanging))["status"] == "STARTED", timeout=60, what="STARTED")
    behind = create(cluster, priority=2)
    wait_until(lambda: task_row(uuid.UUID(behind))["status"] == "ENQUEUED", timeout=30, what="ENQUEUED")
    assert reasons(cluster, behind) == ["waiting_for_worker"]
    assert reasons(cluster, hanging) == ["running"]
    # ENQUEUE_TIMEOUT_SEC is 5 s in the e2e settings.
    wait_until(lambda: "message_maybe_lost" in reasons(cluster, first), timeout=30, what="a late message")

    page = open_page(cluster.url)
    page.goto(f"/ui/tasks/{held}")
    codes = page.locator("#reasons li").evaluate_all("items => items.map(i => i.dataset.code)")
    assert codes == ["queue_backpressure", "behind_due_tasks", "no_live_worker"]
    expect()(page.locator("#reasons")).to_contain_text("MAX_ENQUEUED_PER_QUEUE is 1")
    page.screenshot(path=str(screenshots / "task-why-light.png"), full_page=True)
    page.goto(f"/ui/tasks/{failing}")
    expect()(page.locator('#reasons li[data-code="retry_backoff"]')).to_contain_text("attempt 1 failed")
    low_worker.signal_group(signal.SIGKILL)  # rather than wait for its warm shutdown behind demo_hang
