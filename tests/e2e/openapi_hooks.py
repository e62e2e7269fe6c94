"""Schemathesis hooks for ``test_openapi.py``, loaded by the schemathesis run it starts
(``hooks`` in its configuration).

``PATCH /v1/pool/settings`` really changes the gateway under test, so its generated
bodies are kept to what a test machine can take and what the server can know, without
changing whether a body is valid by the description:

- ``stem_cells`` above 1 becomes 1: every stem cell is a worker process that imports
  torch, and the pool keeps as many ready as there are spare slots (up to 1024).
- ``model_ttl_s`` names the served model: the description cannot list the models a
  gateway serves, and any other name is rightly a 400. The value kept is an invalid one
  if the body had one, so a negative case stays negative.
"""

from __future__ import annotations

import math
from typing import Any

import schemathesis

SETTINGS = "/v1/pool/settings"
SERVED_MODEL = "demo-shapes"
MAX_STEM_CELLS = 1


@schemathesis.hook
def map_case(context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    if case.path == SETTINGS and case.method.upper() == "PATCH" and isinstance(case.body, dict):
        case.body = _tamed(case.body)
    return case


def _tamed(body: dict[str, Any]) -> dict[str, Any]:
    body = dict(body)
    stems = body.get("stem_cells")
    if _number(stems) and float(stems).is_integer() and stems > MAX_STEM_CELLS:  # 5.0 is an integer in JSON
        body["stem_cells"] = MAX_STEM_CELLS
    ttls = body.get("model_ttl_s")
    if isinstance(ttls, dict) and ttls:
        values = list(ttls.values())
        body["model_ttl_s"] = {SERVED_MODEL: next((v for v in values if not _valid_ttl(v)), values[0])}
    return body


def _valid_ttl(value: Any) -> bool:
    return value is None or (_number(value) and value > 0)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
