"""Schemathesis hooks for ``test_openapi.py``, loaded by the schemathesis run it starts
(``hooks`` in its configuration).

``PATCH /v1/pool/settings`` really changes the gateway under test, so its generated
bodies are kept to what a test machine can take and what the server can know, without
changing whether a body is valid by the description:

- ``stem_cells`` above 1 becomes 1: every stem cell is a worker process that imports
  torch, and the pool keeps as many ready as there are spare slots (up to 1024).
- ``max_workers`` below 4 becomes 4, and an idle TTL (the default or a model's) under
  60 s becomes 60 s: a pool of one slot, or workers that leave within seconds, make
  most of the run's requests cold starts (3 s each for the general model on this
  machine's CPU), and the run's length a matter of which values were drawn (40 to
  80 s). Those pools have tests of their own (tests/integration, tests/e2e/test_settings.py).
- ``model_ttl_s`` names the served model: the description cannot list the models a
  gateway serves, and any other name is rightly a 400. The value kept is an invalid one
  if the body had one, so a negative case stays negative.

One check of our own runs on every answer (``no_internals``): no answer gives away a
path on the gateway's machine, a worker's image, a version or a traceback, unless the
request itself sent that text (a label or model name echoed back in a 400 or 404); the
description (``/openapi.json``) and the dashboard's page are documents and are skipped.
``WANWU_TEST_INTERNALS`` (os.pathsep-separated) names this gateway's own directories.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import schemathesis

SETTINGS = "/v1/pool/settings"
MIN_WORKERS = 4  # a worker for each model the run may pick (test_openapi.py gives the gateway 4)
MIN_TTL_S = 60.0
SERVED_MODEL = "demo-shapes"
MAX_STEM_CELLS = 1


GENERIC_INTERNALS = (
    r"Traceback \(most recent call last\)",
    r'File "[^"]+", line \d+',
    r"site-packages",
    r"/(?:tmp|var|run|root|home|work|proc|opt|srv|usr)/[\w.-]+",
    r"wanwu-worker:\w+",
    r"wanwu-base:\w+",
    r"\bengine \d+\.\d+",
    r"\btorch \d+\.\d+",
    r"\bPython 3\.\d+",
)


def _internals() -> re.Pattern[str]:
    own = [re.escape(p) for p in os.environ.get("WANWU_TEST_INTERNALS", "").split(os.pathsep) if p]
    return re.compile("|".join([*own, *GENERIC_INTERNALS]))


INTERNALS = _internals()


@schemathesis.check
def no_internals(ctx: Any, response: Any, case: schemathesis.Case) -> None:
    """No answer carries a path, image, version or traceback the request did not send.
    The API's own description and the dashboard's page are documents, not answers: their
    examples name made-up paths."""
    if case.path == "/openapi.json" or case.path.startswith("/dashboard"):
        return
    sent = repr((case.path, case.path_parameters, case.query, case.headers, case.cookies, case.body))
    answer = response.text + "\n" + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    for match in INTERNALS.finditer(answer):
        if match.group() not in sent:
            raise AssertionError(f"the answer gives away {match.group()!r}: {answer[:500]}")


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
    workers = body.get("max_workers")
    if _number(workers) and float(workers).is_integer() and 1 <= workers < MIN_WORKERS:
        body["max_workers"] = MIN_WORKERS
    if _valid_ttl(body.get("idle_ttl_s")) and body.get("idle_ttl_s") is not None:
        body["idle_ttl_s"] = max(body["idle_ttl_s"], MIN_TTL_S)
    ttls = body.get("model_ttl_s")
    if isinstance(ttls, dict) and ttls:
        values = list(ttls.values())
        kept = next((v for v in values if not _valid_ttl(v)), values[0])
        body["model_ttl_s"] = {SERVED_MODEL: max(kept, MIN_TTL_S) if _valid_ttl(kept) and kept is not None else kept}
    return body


def _valid_ttl(value: Any) -> bool:
    return value is None or (_number(value) and value > 0)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
