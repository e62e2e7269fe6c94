"""The dashboard blueprint serves its page and assets from the repository, with a
strict Content-Security-Policy, and nothing else; the page loads nothing from elsewhere.
(The page itself runs in a real browser in tests/e2e/test_dashboard.py, and its
Try-a-photo panel in tests/e2e/test_dashboard_try.py.)"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.dashboard import ASSETS, STATIC, bp


@pytest.fixture
def client() -> FlaskClient:
    app = Flask("t")
    app.register_blueprint(bp)
    return app.test_client()


def test_the_page_and_its_assets_are_served_with_a_strict_policy(client: FlaskClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert page.headers["Cache-Control"] == "no-cache"
    html = page.get_data(as_text=True)
    linked = set(re.findall(r'(?:src|href)="dashboard/([^"]+)"', html))
    assert linked == set(ASSETS)
    for name, mimetype in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        answer = client.get(f"/dashboard/{name}")
        assert answer.status_code == 200 and answer.mimetype == mimetype
        assert answer.get_data() == (STATIC / name).read_bytes()


def test_nothing_else_is_served(client: FlaskClient) -> None:
    for path in ("/dashboard/dashboard.html.bak", "/dashboard/..%2fdashboard.py", "/dashboard/", "/dashboard/x.js"):
        assert client.get(path).status_code == 404, path


def test_the_page_loads_nothing_from_elsewhere() -> None:
    for name in ("dashboard.html", *ASSETS):
        text = (STATIC / name).read_text(encoding="utf-8")
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), name  # the SVG namespace is a name only
        assert "@import" not in text and "url(" not in text, name


def test_the_policy_lets_the_page_preview_a_photo_and_nothing_more(client: FlaskClient) -> None:
    policy = dict(
        part.strip().split(" ", 1) for part in client.get("/dashboard").headers["Content-Security-Policy"].split(";")
    )
    assert policy["img-src"].split() == ["'self'", "data:", "blob:"]  # blob: for URL.createObjectURL previews
    for directive in ("script-src", "style-src", "connect-src"):
        assert policy[directive] == "'self'", directive
    assert policy["default-src"] == "'none'" and policy["form-action"] == "'none'"


class _Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, tuple[str, dict[str, str | None]]] = {}
        self.label_for: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id"):
            self.by_id[str(found["id"])] = (tag, found)
        if tag == "label" and found.get("for"):
            self.label_for.add(str(found["for"]))


def test_the_page_has_a_try_a_photo_panel() -> None:
    page = _Elements()
    page.feed((STATIC / "dashboard.html").read_text(encoding="utf-8"))
    tag, attrs = page.by_id["try-file"]
    assert tag == "input" and attrs["type"] == "file" and attrs["name"] == "image"
    assert page.by_id["try-model"][0] == "select" and page.by_id["try-lang"][0] == "select"
    assert {"try-file", "try-model", "try-lang"} <= page.label_for  # each control has a label
    tag, attrs = page.by_id["try-drop"]  # the drop zone is a button too: focusable, opens the picker
    assert attrs["role"] == "button" and attrs["tabindex"] == "0" and attrs["aria-controls"] == "try-file"
    assert page.by_id["try-preview"][0] == "img"
    for name in ("status", "error", "top", "unsure", "start", "time", "groups", "predictions"):
        assert f"try-{name}" in page.by_id, name
    assert page.by_id["try-error"][1]["role"] == "alert" and "hidden" in page.by_id["try-error"][1]
    html = (STATIC / "dashboard.html").read_text(encoding="utf-8")
    assert "<script>" not in html and " style=" not in html and "onclick" not in html  # no inline code or style


def test_the_script_builds_the_page_from_text_and_posts_relative() -> None:
    script = (STATIC / "dashboard.js").read_text(encoding="utf-8")
    assert "innerHTML" not in script and "outerHTML" not in script and "insertAdjacentHTML" not in script
    assert "URL.createObjectURL" in script  # the preview: CSP's img-src blob:
    assert 'form.append("image"' in script  # the multipart field the gateway reads
    assert "`v1/models/${encodeURIComponent(model)}/predict" in script  # relative, the name escaped
