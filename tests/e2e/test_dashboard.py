"""The operator dashboard (/dashboard) in a real browser, Debian's chromium driven by
Playwright, against a real gateway with the process backend: the page loads everything
from the gateway and nothing else, shows the pool as it changes, changes a setting with
the admin token (and shows the gateway's 401 with a wrong one), and says "unreachable"
when the gateway goes away. A screenshot is kept under pytest's tmp dir.

Needs /usr/bin/chromium (deploy/ensure-browser.sh) and the playwright package (dev extra);
Playwright's own browser download is not used."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import requests
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response, expect, sync_playwright

from tests.gatewayproc import running_gateway
from tests.images import demo_images
from tests.workerprocs import seed_general

pytestmark = pytest.mark.docker  # the demo bundle is copied out of the worker image

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TOKEN = "t0ken-for-the-dashboard"
WAIT_MS = 10_000  # the page polls every 2 s


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: run deploy/ensure-browser.sh (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield launched
        launched.close()


class Watch:
    """Everything that went wrong in a page: console errors, uncaught exceptions,
    requests that failed, answers >= 400, and requests to anywhere but the gateway."""

    def __init__(self, page: Page, origin: str) -> None:
        self.origin = origin
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.refused: list[str] = []
        self.elsewhere: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        page.on("requestfailed", lambda r: self.failed.append(f"{r.method} {r.url}: {r.failure}"))
        page.on("response", self._response)
        page.on("request", self._request)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def _response(self, response: Response) -> None:
        if response.status >= 400:
            self.refused.append(f"{response.status} {response.request.method} {response.url}")

    def _request(self, request: Request) -> None:
        if not request.url.startswith((self.origin + "/", "data:")):
            self.elsewhere.append(request.url)

    def problems(self) -> list[str]:
        return self.errors + self.failed + self.refused + self.elsewhere


@pytest.fixture
def workdir(tmp_path: Path, docker_client: docker.DockerClient, general_bundles: tuple[Path, Path]) -> Path:
    from tests.dockerutil import demo_bundle_dir

    demo_bundle_dir(tmp_path / "models")
    seed_general(tmp_path / "models", general_bundles)  # the default model, made once for the session
    return tmp_path


def test_the_dashboard_shows_the_pool_and_changes_a_setting(
    workdir: Path, docker_client: docker.DockerClient, browser: Browser, tmp_path: Path
) -> None:
    settings = {
        "backend": "process",
        "worker_user": "gateway",  # uid 10001 is test_process_backend.py's
        "stem_cells": "0",
        "admin_token": TOKEN,
        "max_workers": "2",
    }
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    status = page.locator("#status")
    with running_gateway(workdir, docker_client, **settings) as gw:
        watch = Watch(page, gw.url)
        page.goto(gw.url + "/dashboard")
        expect(page).to_have_title("wanwu · pool dashboard")
        expect(status).to_have_text("live")
        groups = page.get_by_role("table", name="Workers by model and state")
        expect(groups).to_contain_text("no workers")
        expect(page.locator("#capacity")).to_have_text("0 of 2 slots")
        expect(page.locator("#gpus")).to_have_text("no GPU")
        expect(page.locator('#settings dd[data-key="max_workers"]')).to_have_text("2")
        assert watch.problems() == []

        image = next(iter(demo_images().values()))
        answer = requests.post(gw.url + "/v1/models/demo-shapes/predict", files={"image": ("a.png", image)}, timeout=60)
        assert answer.status_code == 200 and answer.json()["cold_start"], answer.text
        row = groups.locator('tr[data-model="demo-shapes"][data-state="idle"]')
        expect(row).to_have_count(1, timeout=WAIT_MS)
        expect(row.locator("td").nth(3)).to_have_text(re.compile(r"^\d+\.\d$"))  # its idle time, in seconds
        expect(page.locator("#capacity")).to_have_text("1 of 2 slots")
        # Rates and quantiles come from differences between /metrics samples (10 s of them).
        expect(page.locator("#traffic-now")).to_contain_text(re.compile(r"\d cold .* p99 \d"), timeout=15_000)
        assert watch.problems() == []

        token = page.get_by_label("Admin token")
        max_workers = page.get_by_label("max workers (N)")
        apply = page.get_by_role("button", name="Apply")
        alert = page.locator("#settings-form").get_by_role("alert")  # not the Try-a-photo panel's
        expect(max_workers).to_be_disabled()  # until a token is given
        token.fill("wrong")
        expect(max_workers).to_be_enabled()
        max_workers.fill("3")
        apply.click()
        refusal = requests.patch(
            gw.url + "/v1/pool/settings", json={"max_workers": 3}, headers={"Authorization": "Bearer wrong"}, timeout=10
        )
        assert refusal.status_code == 401
        expect(alert).to_contain_text("401")
        expect(alert).to_contain_text(refusal.json()["error"]["message"])
        expect(page.locator('#settings dd[data-key="max_workers"]')).to_have_text("2")

        token.fill(TOKEN)
        assert page.evaluate("sessionStorage.getItem('wanwu.adminToken')") == TOKEN
        apply.click()
        expect(alert).to_be_empty()
        expect(page.locator('#settings dd[data-key="max_workers"]')).to_have_text("3")
        expect(page.locator("#changes li").first).to_contain_text("max_workers 2 → 3")
        expect(page.locator("#changes li").first).to_contain_text("the dashboard")
        expect(page.locator("#capacity")).to_have_text("1 of 3 slots", timeout=WAIT_MS)
        assert requests.get(gw.url + "/v1/pool/settings", timeout=10).json()["settings"]["max_workers"] == 3

        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        print(f"dashboard screenshot: {shot}")
        # The wrong token's 401 is the one refusal (Chromium logs it as a console error too).
        assert watch.refused == [f"401 PATCH {gw.url}/v1/pool/settings"]
        assert [e for e in watch.errors if "401" not in e] == [] and watch.failed == [] and watch.elsewhere == []

    # The gateway is gone: the page says so and keeps polling.
    expect(status).to_have_text(re.compile("^unreachable"), timeout=WAIT_MS)
    expect(page.locator("#updated")).to_contain_text("retrying every 2 s")
    page.close()
