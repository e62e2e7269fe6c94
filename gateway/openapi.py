"""``GET /openapi.json``: the API's OpenAPI 3.1 description.

The document is ``gateway/openapi.json`` (package data), hand-written, and kept true by
``tests/unit/test_openapi_shapes.py`` (no Docker): its schemas are those derived from
the bodies' types in ``gateway.shapes``, it lists exactly the routes the app registers,
and every route's answers (success and the main errors) validate against it. With a
real gateway, ``tests/e2e/test_openapi.py`` runs schemathesis against it.
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
