"""The dashboard blueprint serves its page and assets from the repository, with a
strict Content-Security-Policy, and nothing else; the page loads nothing from elsewhere.
(The page itself runs in a real browser in tests/e2e/test_dashboard.py.)"""

from __future__ import annotations

import re

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
