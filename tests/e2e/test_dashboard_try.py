"""The dashboard's "Try a photo" panel in a real browser (Debian's chromium driven by
Playwright) against a real gateway with the process backend: a photo picked with the
file input, one dropped on the drop zone (a real ``drop`` event carrying a DataTransfer
built in the page: Playwright cannot drag files from the OS), one chosen from the picker
the drop zone opens with the keyboard, the language switch, and a file that is no image
(the gateway's 415 and its message). The model is the one /v1/models names as default;
the assertions are about structure (one bar per prediction, the top label the API's),
never about a class. Screenshots are kept under pytest's tmp dir.

Needs /usr/bin/chromium (deploy/ensure-browser.sh) and the playwright package (dev extra)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import requests
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    FileChooser,
    Page,
    Request,
    Response,
    expect,
    sync_playwright,
)

from tests.gatewayproc import running_gateway
from tests.images import demo_images
from tests.workerprocs import seed_general

pytestmark = pytest.mark.docker  # the demo bundle is copied out of the worker image

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
COLD_MS = 120_000  # the first answer starts a worker and loads the model
PREVIEW_DRAWN = "() => { const i = document.getElementById('try-preview'); return i.complete && i.naturalWidth > 0; }"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: run deploy/ensure-browser.sh (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield launched
        launched.close()


class Watch:
    """Everything that went wrong in a page: console errors (a CSP violation is one),
    uncaught exceptions, failed requests, answers >= 400, and requests to anywhere but
    the gateway (its own blob: URLs, the previews, are the gateway's origin)."""

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
        if not request.url.startswith((self.origin + "/", "blob:" + self.origin + "/", "data:")):
            self.elsewhere.append(request.url)

    def problems(self) -> list[str]:
        return self.errors + self.failed + self.refused + self.elsewhere


@pytest.fixture
def workdir(tmp_path: Path, docker_client: docker.DockerClient, general_bundles: tuple[Path, Path]) -> Path:
    from tests.dockerutil import demo_bundle_dir

    demo_bundle_dir(tmp_path / "models")
    seed_general(tmp_path / "models", general_bundles)  # the default model, made once for the session
    return tmp_path


def is_predict(response: Response) -> bool:
    return response.request.method == "POST" and "/predict" in response.url


def shows(page: Page, answer: dict[str, Any]) -> None:
    """The panel shows ``answer`` (the JSON the page got): the top-1, a bar and a
    percentage per prediction (and per group, if any), cold or warm, and the time."""
    panel = page.locator("#try")
    expect(panel.locator("#try-answer")).to_be_visible()
    expect(panel.get_by_role("alert")).to_be_hidden()
    expect(panel.locator("#try-top")).to_have_text(answer["result"])
    for name, entries in (("predictions", answer["predictions"]), ("groups", answer.get("groups") or [])):
        rows = panel.locator(f"#try-{name} li.bar")
        expect(rows).to_have_count(len(entries))
        expect(rows.locator(".bar-track .bar-fill")).to_have_count(len(entries))
        for i, entry in enumerate(entries):
            row = rows.nth(i)
            expect(row.locator(".bar-label")).to_have_text(entry["label"])
            expect(row.locator(".bar-pct")).to_have_text(re.compile(r"^\d{1,3}\.\d %$"))
            shown = float(row.locator(".bar-pct").inner_text().split()[0])
            width = float(row.locator(".bar-fill").evaluate("e => parseFloat(e.style.width)"))
            assert abs(shown - entry["score"] * 100) < 0.051 and abs(width - entry["score"] * 100) < 0.051, entry
    if answer.get("groups"):
        expect(panel.locator("#try-groups-box")).to_be_visible()
    else:
        expect(panel.locator("#try-groups-box")).to_be_hidden()
    assert answer["predictions"] and answer["result"] == answer["predictions"][0]["label"]
    expect(panel.locator("#try-predictions li.bar").first.locator(".bar-label")).to_have_text(answer["result"])
    unsure = panel.get_by_text("the model is unsure")
    if answer.get("confident") is False:
        expect(unsure).to_be_visible()
    else:
        expect(unsure).to_be_hidden()

    start = panel.locator("#try-start")
    expect(start).to_have_attribute("data-cold", "true" if answer["cold_start"] else "false")
    expect(start).to_have_attribute("data-start", answer["start"])
    expect(start).to_contain_text("cold start" if answer["cold_start"] else "warm")
    expect(panel.locator("#try-time")).to_have_text(re.compile(r"^took \d+(\.\d+)? (ms|s) \(queue .*worker "))
    expect(panel.locator("#try-model-used")).to_have_text(f"by {answer['model']}")


def test_try_a_photo_picked_dropped_and_refused(
    workdir: Path, docker_client: docker.DockerClient, browser: Browser, tmp_path: Path
) -> None:
    settings = {"backend": "process", "worker_user": "gateway", "stem_cells": "0", "max_workers": "2"}
    pictures = list(demo_images().values())
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    # Listened for from the start: the browser intercepts file choosers only once told
    # to, and telling it just before the key press races the dialog (a CI flake).
    choosers: list[FileChooser] = []
    page.on("filechooser", lambda chooser: choosers.append(chooser))
    with running_gateway(workdir, docker_client, **settings) as gw:
        watch = Watch(page, gw.url)
        listed = requests.get(gw.url + "/v1/models", timeout=10).json()["models"]
        classifiers = [m for m in listed if m["task"] == "classify"]
        model = next((m for m in classifiers if m["default"]), None) or next(
            m for m in classifiers if m["name"] == "demo-shapes"
        )
        predict_url = f"{gw.url}/v1/models/{model['name']}/predict"

        page.goto(gw.url + "/dashboard")
        choice = page.get_by_label("Model", exact=True)
        expect(choice).to_be_enabled()
        expect(choice).to_have_value(model["name"])  # the gateway's default, preselected
        expect(choice.locator("option")).to_have_count(len(classifiers))
        expect(page.locator("#try-model-note")).to_contain_text(f"{len(model['labels'])} classes")
        expect(page.get_by_role("button", name=re.compile("^Drop a photo here"))).to_be_visible()
        drop = page.locator("#try-drop")  # its name changes: it shows the photo and its file name
        assert watch.problems() == []

        # 1. A photo picked with the file input: a cold start (no worker yet, no stem cells).
        with page.expect_response(is_predict, timeout=COLD_MS) as first:
            page.get_by_label("…or pick a file").set_input_files(
                files=[{"name": "first.png", "mimeType": "image/png", "buffer": pictures[0]}]
            )
        assert first.value.url == predict_url and first.value.status == 200
        answer = first.value.json()
        assert answer["cold_start"] is True
        shows(page, answer)
        preview = page.locator("#try-preview")
        expect(preview).to_be_visible()
        expect(preview).to_have_attribute("src", re.compile(r"^blob:"))
        page.wait_for_function(PREVIEW_DRAWN)  # the CSP lets the blob: preview in
        expect(page.locator("#try-drop-text")).to_contain_text("first.png")
        assert watch.problems() == []

        # 2. A photo dropped on the drop zone: now the worker is warm.
        dropped = page.evaluate_handle(
            """([bytes, name]) => {
                const data = new DataTransfer();
                data.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
                return data;
            }""",
            [list(pictures[1]), "dropped.png"],
        )
        drop.dispatch_event("dragenter", {"dataTransfer": dropped})
        drop.dispatch_event("dragover", {"dataTransfer": dropped})
        expect(drop).to_have_class(re.compile(r"\bover\b"))
        with page.expect_response(is_predict, timeout=COLD_MS) as second:
            drop.dispatch_event("drop", {"dataTransfer": dropped})
        assert second.value.url == predict_url and second.value.status == 200
        answer = second.value.json()
        assert answer["cold_start"] is False
        shows(page, answer)
        expect(drop).not_to_have_class(re.compile(r"\bover\b"))
        expect(page.locator("#try-drop-text")).to_contain_text("dropped.png")
        assert page.get_by_label("…or pick a file").evaluate("i => i.files[0].name") == "dropped.png"
        page.wait_for_function(PREVIEW_DRAWN)  # the CSP lets the blob: preview in
        shot = tmp_path / "dashboard-try.png"
        page.locator("#try").screenshot(path=str(shot))
        page.screenshot(path=str(tmp_path / "dashboard-try-full.png"), full_page=True)
        print(f"try-a-photo screenshot: {shot}")

        # The drop zone is a button: Enter opens the file picker; English labels ask with ?lang=en.
        drop.focus()
        page.keyboard.press("Enter")
        for _ in range(300):
            if choosers:
                break
            page.wait_for_timeout(100)
        assert choosers, "Enter on the drop zone opened no file chooser"
        with page.expect_response(is_predict, timeout=COLD_MS) as third:
            choosers[-1].set_files(files=[{"name": "third.png", "mimeType": "image/png", "buffer": pictures[2]}])
        assert third.value.status == 200
        shows(page, third.value.json())
        with page.expect_response(is_predict, timeout=COLD_MS) as english:
            page.get_by_label("Labels in").select_option("en")  # the same photo, asked again
        assert english.value.url == predict_url + "?lang=en" and english.value.status == 200
        shows(page, english.value.json())
        assert watch.problems() == []

        # 3. Not an image: the gateway's code and message, no preview, no stale answer.
        with page.expect_response(is_predict, timeout=COLD_MS) as refused:
            page.get_by_label("…or pick a file").set_input_files(
                files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a photo, only words\n"}]
            )
        assert refused.value.url == predict_url + "?lang=en"  # English is still chosen
        assert refused.value.status in (400, 415), refused.value.text()
        error = refused.value.json()["error"]
        alert = page.locator("#try").get_by_role("alert")
        expect(alert).to_be_visible()
        expect(alert).to_contain_text(f"{refused.value.status} {error['code']}")
        expect(alert).to_contain_text(error["message"])
        expect(page.locator("#try-answer")).to_be_hidden()
        expect(page.locator("#try-preview")).to_be_hidden()
        page.locator("#try").screenshot(path=str(tmp_path / "dashboard-try-error.png"))

        # 4. The one refusal is that upload (Chromium logs it as a console error too); nothing else.
        assert watch.refused == [f"{refused.value.status} POST {refused.value.url}"]
        assert [e for e in watch.errors if str(refused.value.status) not in e] == []
        assert watch.failed == [] and watch.elsewhere == []
    page.close()
