"""The operator dashboard: ``GET /dashboard`` serves one static page, and
``GET /dashboard/<asset>`` its script and style sheet, from ``gateway/static``.

The page has no build step and loads nothing from elsewhere: vanilla JavaScript polls
``/v1/pool``, ``/metrics`` and ``/v1/pool/settings`` every 2 s and draws its own charts.
Its URLs are relative, so it also works behind a proxy that adds a path prefix.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, abort, send_from_directory

STATIC = Path(__file__).with_name("static")
PAGE = "dashboard.html"
ASSETS = frozenset({"dashboard.js", "dashboard.css"})

# Only this origin's script, style and fetches; no inline code, no frames, no forms posted elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data: blob:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

bp = Blueprint("dashboard", __name__)


@bp.get("/dashboard")
def page() -> Response:
    return _send(PAGE)


@bp.get("/dashboard/<asset>")
def asset(asset: str) -> Response:
    if asset not in ASSETS:
        abort(404, description=f"no dashboard asset {asset!r}")
    return _send(asset)


def _send(name: str) -> Response:
    response = send_from_directory(STATIC, name, max_age=0)
    response.headers["Cache-Control"] = "no-cache"  # revalidate (ETag): a new gateway's page shows at once
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response
