"""``GET /openapi.json``: the API's OpenAPI 3.1 description.

The document is ``gateway/openapi.json`` (package data), kept true by
``tests/e2e/test_openapi.py``: it must list every route the app registers, and
schemathesis runs it against a real gateway.
"""

from __future__ import annotations

import functools
from importlib import resources

from flask import Blueprint, Response

bp = Blueprint("openapi", __name__)


@functools.cache
def document() -> bytes:
    """The description, as shipped with the package."""
    return resources.files(__package__).joinpath("openapi.json").read_bytes()


@bp.get("/openapi.json")
def openapi() -> Response:
    return Response(document(), mimetype="application/json")
