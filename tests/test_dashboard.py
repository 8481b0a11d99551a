"""The dashboard (`/dashboard`) in a real browser: Debian's Chromium, driven by Playwright for Python,
against a real stack (gateway, worker, progress service, Kafka, SQLite).

One stack and one browser serve the module; each test has a fresh browser context (its own
sessionStorage) and fails on any console error it did not expect. Screenshots go to the test's
output folder and to SCREENS_DIR, for people to look at.
"""

from __future__ import annotations

import itertools
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest import deployment_env, running_stack
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from harness import KEY_A, KEY_B, TENANT_A, Stack, eventually, sleep_job, submit, wait_for_status

CHROMIUM = "/usr/bin/chromium"
SCREENS_DIR = Path("/tmp/conveyor-dashboard-screens")
KEY_READ_ONLY = "key-r-0123456789abcdefghij"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# How long a browser wait may take on a loaded CI machine; the bounds are asserted separately.
UI_TIMEOUT_MS = 20_000
STATIC_FILES = ("index.html", "app.js", "api.js", "live.js", "store.js", "jobs.js", "job.js", "queues.js")


@pytest.fixture(scope="module")
async def dashboard_stack(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    """One deployment on SQLite (the page does not care which database), with a read-only key."""
    directory = tmp_path_factory.mktemp("dashboard")
    env = deployment_env(kafka_bootstrap, f"sqlite+aiosqlite:///{directory / 'conveyor.db'}", directory)
    env["CONVEYOR_API_KEYS"] += f",{TENANT_A}:{KEY_READ_ONLY}:read"
    async with running_stack(env, directory) as stack:
        yield stack


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        # Debian's Chromium: Playwright never downloads a browser of its own.
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        await chromium.close()


class Console:
    """The page's console errors and uncaught exceptions; `allow` lists what a test expects."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        self.allowed: list[re.Pattern[str]] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def allow(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def unexpected(self) -> list[str]:
        return [error for error in self.errors if not any(p.search(error) for p in self.allowed)]


class Dashboard:
    def __init__(self, page: Page, console: Console, stack: Stack, output: Path) -> None:
        self.page = page
        self.console = console
        self.stack = stack
        self.output = output

    async def open(self, key: str = KEY_A, route: str = "#/jobs") -> None:
        await self.page.goto(f"{self.stack.gateway_url}/dashboard/#key={key}")
        await self.online()
        if route != "#/jobs":
            await self.goto(route)

    async def goto(self, route: str) -> None:
        await self.page.evaluate("route => { location.hash = route; }", route)

    async def online(self) -> None:
        await self.page.wait_for_selector('#connection[data-connection="online"]', timeout=UI_TIMEOUT_MS)

    def row(self, job_id: str) -> str:
        return f'#jobs-body tr[data-job-id="{job_id}"]'

    async def screenshot(self, name: str) -> Path:
        path = self.output / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        keep(path)
        return path


def keep(screenshot: Path) -> None:
    """A copy where people look, outside pytest's rotating temporary folders."""
    SCREENS_DIR.mkdir(exist_ok=True)
    shutil.copy(screenshot, SCREENS_DIR / screenshot.name)


@pytest.fixture
async def dashboard(dashboard_stack: Stack, browser: Browser, tmp_path: Path) -> AsyncIterator[Dashboard]:
    context = await browser.new_context(viewport=DESKTOP)
    page = await context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    console = Console(page)
    yield Dashboard(page, console, dashboard_stack, tmp_path)
    await context.close()
    assert console.unexpected() == [], "console errors"


async def attribute(page: Page, selector: str, name: str) -> str | None:
    value: str | None = await page.get_attribute(selector, name)
    return value


async def test_the_gateway_serves_the_page_and_its_openapi_does_not_show_it(dashboard_stack: Stack) -> None:
    async with dashboard_stack.client() as client:
        page = await client.get("/dashboard/", headers={"Authorization": ""})
        assert page.status_code == 200
        assert 'type="module"' in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert (await client.get("/dashboard", follow_redirects=True)).status_code == 200
        script = await client.get("/dashboard/app.js")
        assert script.headers["content-type"].startswith("text/javascript")
        # No external URL anywhere: the page works offline and behind a firewall.
        for name in (
            "index.html",
            "app.js",
            "api.js",
            "live.js",
            "jobs.js",
            "job.js",
            "queues.js",
            "style.css",
        ):
            body = (await client.get(f"/dashboard/{name}")).text
            assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", body), name
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert not [path for path in paths if path.startswith("/dashboard")]
        # The page reads a job's JSON history on the progress service: its origin may, no other.
        progress = dashboard_stack.progress_url.replace("ws://", "http://")
        for origin, allowed in ((dashboard_stack.gateway_url, True), ("http://elsewhere.example", False)):
            preflight = await client.options(
                f"{progress}/v1/jobs/{uuid.uuid4()}/events",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "authorization",
                },
            )
            assert (preflight.headers.get("access-control-allow-origin") == origin) is allowed, preflight
        # The dashboard's own reads are authenticated like the API.
        assert (await client.get("/dashboard/me", headers={"Authorization": ""})).status_code == 401
        assert (await client.get("/dashboard/me")).json() == {
            "tenant": TENANT_A,
            "scopes": ["cancel", "read", "submit"],
        }


async def test_a_submitted_job_appears_at_once_and_its_row_moves_to_succeeded(dashboard: Dashboard) -> None:
    page = dashboard.page
    await dashboard.open()
    # The key left the address bar and lives in the tab's sessionStorage.
    assert "key=" not in page.url
    assert await page.evaluate("sessionStorage.getItem('conveyor.api-key')") == KEY_A
    async with dashboard.stack.client() as client:
        submitted = time.monotonic()
        job = await submit(client, {**sleep_job(3, steps=6), "labels": {"customer": "acme"}})
    row = dashboard.row(job["id"])
    await page.wait_for_selector(row)
    appeared_s = time.monotonic() - submitted
    print(f"the row appeared {appeared_s:.3f}s after the 202")  # the figure, with -rP
    assert appeared_s < 2.0, f"the row appeared {appeared_s:.2f}s after the 202"

    percents: set[str] = set()

    async def succeeded() -> bool:
        percents.add(await attribute(page, row, "data-percent") or "")
        return await attribute(page, row, "data-status") == "succeeded"

    await eventually(succeeded, 30, "the row to reach succeeded")
    moved = {float(p) for p in percents if p} - {100.0}
    assert moved, f"the progress bar never showed a step between: {percents}"
    assert await page.text_content(f"{row} .labels") == "customer=acme"
    assert await page.text_content(f"{row} .type") == "demo.sleep"
    await dashboard.screenshot("jobs-view")

    # Filters: by status, by type, by label (the API answers; the live rows obey them too).
    await page.select_option("#filter-status", "failed")
    await page.click(".filters button")
    await page.wait_for_selector(row, state="detached")
    await page.select_option("#filter-status", "")
    await page.fill("#filter-label", "customer=acme")
    await page.click(".filters button")
    await page.wait_for_selector(row)
    await page.fill("#filter-label", "customer=nobody")
    await page.click(".filters button")
    await page.wait_for_selector(row, state="detached")


async def test_paging_goes_back_in_time(dashboard: Dashboard) -> None:
    async with dashboard.stack.client() as client:
        await client.post("/v1/jobs/batch", json={"jobs": [{"type": "demo.noop"}] * 30})
        newest = (await client.get("/v1/jobs", params={"limit": 25})).json()
        before = (await client.get("/v1/jobs", params={"limit": 25, "cursor": newest["next_cursor"]})).json()
    page = dashboard.page
    await dashboard.open()
    rows = "rows => rows.map(r => r.dataset.jobId)"
    await page.wait_for_function("() => document.querySelectorAll('#jobs-body tr').length >= 25")
    # The page's rows are the API's pages, in its order (newest first, then by id).
    assert await page.eval_on_selector_all("#jobs-body tr", rows) == [job["id"] for job in newest["items"]]
    await page.click("#page-older")
    await page.wait_for_selector(dashboard.row(before["items"][0]["id"]))
    assert await page.eval_on_selector_all("#jobs-body tr", rows) == [job["id"] for job in before["items"]]
    await page.click("#page-newer")
    await page.wait_for_selector(dashboard.row(newest["items"][0]["id"]))


async def test_cancel_on_a_running_job_cancels_it(dashboard: Dashboard) -> None:
    page = dashboard.page
    async with dashboard.stack.client() as client:
        job = await submit(client, {**sleep_job(60, steps=60), "labels": {"purpose": "cancel-me"}})
        await wait_for_status(client, job["id"], {"running"}, 30)
        await dashboard.open(route=f"#/jobs/{job['id']}")
        await page.wait_for_selector('section.job[data-status="running"]')
        # The timeline replays the job's history, then goes on live.
        await page.wait_for_selector('#timeline li[data-type="progress"]')
        await page.wait_for_selector("#job-payload pre")
        assert '"seconds": 60' in (await page.text_content("#job-payload pre") or "")
        await dashboard.screenshot("job-view-running")
        await page.click("#cancel")
        await page.wait_for_selector('section.job[data-status="canceled"]')
        await page.wait_for_selector("#cancel", state="hidden")
        assert (await client.get(f"/v1/jobs/{job['id']}")).json()["status"] == "canceled"
        await page.wait_for_selector('#timeline li[data-status="canceled"]')


async def test_retry_on_a_failed_job_queues_it_again(dashboard: Dashboard) -> None:
    page = dashboard.page
    async with dashboard.stack.client() as client:
        job = await submit(client, {"type": "demo.fail", "payload": {"fail_times": 1}, "max_attempts": 1})
        await wait_for_status(client, job["id"], {"failed"}, 30)
        await dashboard.open(route=f"#/jobs/{job['id']}")
        await page.wait_for_selector('section.job[data-status="failed"]')
        assert "DemoFailure" in (await page.text_content("#job-error") or "")
        await page.wait_for_selector("#cancel", state="hidden")
        await dashboard.screenshot("job-view-failed")
        await page.click("#retry")
        await page.wait_for_selector("#retry", state="hidden")
        # Queued again, then its second attempt succeeds: the page follows it live.
        await page.wait_for_selector('section.job[data-status="succeeded"]')
        retried = (await client.get(f"/v1/jobs/{job['id']}")).json()
        assert retried["status"] == "succeeded" and retried["attempts"] == 2
        await page.wait_for_selector('#timeline li[data-status="queued"] >> nth=1')


async def test_another_tenants_job_never_appears(dashboard: Dashboard) -> None:
    page = dashboard.page
    await dashboard.open()
    theirs = await dashboard.stack.submit_job({"type": "demo.echo", "payload": {"secret": 1}}, key=KEY_B)
    ours = await dashboard.stack.submit_job({"type": "demo.echo", "payload": {"n": 2}})
    await page.wait_for_selector(dashboard.row(ours))
    async with dashboard.stack.client(KEY_B) as client:
        await wait_for_status(client, theirs, {"succeeded"}, 30)
    await page.wait_for_selector(f'{dashboard.row(ours)}[data-status="succeeded"]')
    assert await page.query_selector(dashboard.row(theirs)) is None
    # Not by its address either: it answers like a job that does not exist.
    dashboard.console.allow(r"status of 404")
    await dashboard.goto(f"#/jobs/{theirs}")
    await page.wait_for_selector("#job-problem:not([hidden])")
    assert "not found" in (await page.text_content("#job-problem") or "").lower()


async def test_a_read_only_key_sees_no_cancel_button(dashboard: Dashboard) -> None:
    page = dashboard.page
    async with dashboard.stack.client() as client:
        job = await submit(client, sleep_job(30, steps=30))
        await wait_for_status(client, job["id"], {"running"}, 30)
        await dashboard.open(KEY_READ_ONLY, route=f"#/jobs/{job['id']}")
        await page.wait_for_selector('section.job[data-status="running"]')
        await page.wait_for_selector('#timeline li[data-type="progress"]')
        assert not await page.is_visible("#cancel")
        assert not await page.is_visible("#retry")
        await client.post(f"/v1/jobs/{job['id']}/cancel")


async def test_the_queues_view_shows_the_tenants_queue(dashboard: Dashboard) -> None:
    page = dashboard.page
    async with dashboard.stack.client() as client:
        done = await submit(client, {"type": "demo.echo", "payload": {}})
        await wait_for_status(client, done["id"], {"succeeded"}, 30)
        job = await submit(client, {**sleep_job(30, steps=30), "priority": 1})
        await wait_for_status(client, job["id"], {"running"}, 30)
        await dashboard.open(route="#/queues")
        await page.wait_for_selector('#priorities tr[data-priority="1"] td[data-status="running"]:text("1")')
        await page.wait_for_selector("#finished-chart svg rect", state="attached")
        bars = await page.eval_on_selector_all(
            "#finished-chart rect", "bars => bars.map(b => +b.dataset.count)"
        )
        # The echo job finished this minute (or, on a minute's edge, the one before).
        assert len(bars) == 15 and bars[-1] + bars[-2] >= 1, bars
        assert (await page.text_content("#oldest-queued") or "").strip()
        await dashboard.screenshot("queues-view")
        await client.post(f"/v1/jobs/{job['id']}/cancel")


async def test_readable_on_a_phone(dashboard: Dashboard) -> None:
    page = dashboard.page
    await page.set_viewport_size(PHONE)
    await dashboard.open()
    await page.wait_for_selector("#jobs-body tr")
    # Nothing wider than the screen but the table's own scroller.
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width
    await dashboard.screenshot("jobs-view-phone")
    # Keyboard: the first Tab reaches the skip link, and every control has a name.
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.className") == "skip"
    unnamed = await page.evaluate(
        """() => [...document.querySelectorAll('input, select, button')].filter(control =>
             !(control.labels && control.labels.length) && !control.getAttribute('aria-label')
             && !control.textContent.trim()).map(control => control.outerHTML)"""
    )
    assert unnamed == []


async def test_after_the_progress_service_restarts_the_page_catches_up_without_a_gap(
    dashboard: Dashboard,
) -> None:
    page = dashboard.page
    stack = dashboard.stack
    # The browser's own log of each refused reconnect while the service is down, and the 409 below.
    dashboard.console.allow(r"WebSocket connection to 'ws://127\.0\.0\.1:\d+/v1/events' failed")
    dashboard.console.allow(r"status of 409")
    # And of a read of the progress service (the job's history) that found it down, or was cut by the kill.
    dashboard.console.allow(r"Failed to load resource: net::ERR_CONNECTION_(REFUSED|RESET)")
    async with stack.client() as client:
        followed = await submit(client, sleep_job(8, steps=16))
        stale = await submit(client, sleep_job(60, steps=60))
        await wait_for_status(client, followed["id"], {"running"}, 30)
        await wait_for_status(client, stale["id"], {"running"}, 30)
        await dashboard.open(route=f"#/jobs/{followed['id']}")
        await page.wait_for_selector('#timeline li[data-type="progress"]')
        other = await page.context.new_page()
        other.on("console", dashboard.console._console)
        await other.goto(f"{stack.gateway_url}/dashboard/#key={KEY_A}")
        await other.wait_for_selector('#connection[data-connection="online"]')
        await other.evaluate("route => { location.hash = route; }", f"#/jobs/{stale['id']}")
        await other.wait_for_selector('section.job[data-status="running"]')

        stack.kill("progress")
        await page.wait_for_selector('#connection[data-connection="offline"]')
        assert await page.is_visible("#offline")
        await dashboard.screenshot("job-view-offline")
        # Meanwhile: a job that comes and goes, and a cancel the stale page does not hear of.
        while_away = await submit(client, {"type": "demo.echo", "payload": {"n": 3}})
        await wait_for_status(client, while_away["id"], {"succeeded"}, 30)
        await client.post(f"/v1/jobs/{stale['id']}/cancel")
        await other.click("#cancel")
        await other.wait_for_selector("#job-problem:not([hidden])")
        title = await other.text_content("#job-problem")
        finished = (await client.post(f"/v1/jobs/{stale['id']}/cancel")).json()["title"]
        assert title and title.startswith(finished), title
        conflict = dashboard.output / "job-view-409.png"
        await other.screenshot(path=str(conflict))
        keep(conflict)
        await other.close()

        stack.start("progress")
        await stack.wait_ready(stack.progress_url.replace("ws://", "http://"))
        await dashboard.online()
        assert not await page.is_visible("#offline")
        await page.wait_for_selector('section.job[data-status="succeeded"]', timeout=60_000)
        last_seq = (await events_json(stack, followed["id"]))[-1]["seq"]
        timeline = await page.eval_on_selector_all(
            "#timeline li", "items => items.map(i => [+i.dataset.from, +i.dataset.seq])"
        )
        # Every seq from 1 to the last, once each, in order (a coalesced report stands for a range).
        assert timeline[0][0] == 1 and timeline[-1][1] == last_seq
        assert all(later[0] == earlier[1] + 1 for earlier, later in itertools.pairwise(timeline)), timeline
        await dashboard.screenshot("job-view-after-restart")

        await dashboard.goto("#/jobs")
        await page.wait_for_selector(f'{dashboard.row(while_away["id"])}[data-status="succeeded"]')
        await page.wait_for_selector(f'{dashboard.row(stale["id"])}[data-status="canceled"]')


async def events_json(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    url = stack.progress_url.replace("ws://", "http://")
    async with stack.client(base_url=url) as client:
        events: list[dict[str, Any]] = (await client.get(f"/v1/jobs/{job_id}/events")).json()["events"]
        return events
