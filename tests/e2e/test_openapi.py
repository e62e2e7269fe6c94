"""``gateway/openapi.json`` against the gateway itself.

1. It is a valid OpenAPI 3.1 document: the 3.1 meta-schema, each schema in it against
   JSON Schema 2020-12, every ``$ref`` resolving.
2. It describes exactly the routes Flask registers: a new route without a description
   fails here.
3. Schemathesis, run against a real gateway (``wanwu serve`` with the process backend)
   over HTTP, finds nothing the description does not say: each status documented,
   bodies, headers and content types as described, no 5xx but the 502/503/504 the
   model endpoints document, and no answer giving away a path, an image, a version or
   a traceback (``no_internals`` in ``openapi_hooks.py``). The run's counts are printed (``pytest -rP`` or ``-s``)
   and written to ``schemathesis-counts.json`` in the test's tmp directory.

``WANWU_SCHEMATHESIS_ARGS`` adds arguments to the schemathesis run, e.g.
``--exclude-path-regex settings`` or ``--seed 1234`` to replay a failure.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import jsonschema_rs
import pytest
import schemathesis
from werkzeug.routing import Rule

from gateway.app import create_app
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.pool import INLINE, WarmPool
from scheduler.settings import Settings
from tests.gatewayproc import ROOT, running_gateway
from tests.unit.fakes import FakeBackend, FakeClock, make_bundle

SPEC = ROOT / "gateway" / "openapi.json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Flask answers these for every route by itself; the description lists what the routes do.
IMPLICIT = {"HEAD", "OPTIONS"}
# Flask's own static route (Flask(static_folder=...)), not part of the API.
NOT_API = {"static"}

TOKEN = "t0ken-for-schemathesis"
MAX_EXAMPLES = 25  # per operation and phase
RUN_LIMIT_S = 900  # the whole schemathesis run
MODEL_ROUTES = "predict|embed"  # path regex of the routes that may answer 502/503/504


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SPEC.read_text(encoding="utf-8"))
    return loaded


def test_the_description_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1."), document["openapi"]
    schemathesis.openapi.from_dict(document).validate()  # the OpenAPI 3.1 meta-schema
    for where, schema in _schemas(document):
        try:
            jsonschema_rs.meta.validate(schema)  # JSON Schema 2020-12, 3.1's dialect
        except jsonschema_rs.ValidationError as exc:
            pytest.fail(f"{where} is not a valid JSON Schema: {exc}")
    for where, target in _refs(document):
        assert target.startswith("#/"), f"{where}: only local references ({target})"
        node: Any = document
        for part in target[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            assert isinstance(node, dict) and part in node, f"{where}: {target} does not resolve"
            node = node[part]


def test_its_examples_match_their_schemas(document: dict[str, Any]) -> None:
    checked = 0
    for where, schema, example in _examples(document):
        # The document's components beside the schema: its "#/components/..." references resolve.
        validator = jsonschema_rs.Draft202012Validator({"components": document["components"], "allOf": [schema]})
        errors = [error.message for error in validator.iter_errors(example)]
        assert not errors, f"the example at {where} does not match its schema: {errors}"
        checked += 1
    assert checked > 20


def test_it_describes_exactly_the_routes_flask_registers(document: dict[str, Any], tmp_path: Path) -> None:
    described = {
        (path, method.upper()) for path, item in document["paths"].items() for method in item if method in METHODS
    }
    with _app_rules(tmp_path) as rules:
        registered = {
            (re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule), method)
            for rule in rules
            if rule.endpoint not in NOT_API
            for method in (rule.methods or set()) - IMPLICIT
        }
    undescribed, unrouted = sorted(registered - described), sorted(described - registered)
    assert not undescribed, f"routes gateway/openapi.json does not describe: {undescribed}"
    assert not unrouted, f"gateway/openapi.json describes what is no route: {unrouted}"


@pytest.mark.docker  # the demo bundle is copied out of the worker image
def test_schemathesis_finds_the_gateway_as_described(
    tmp_path: Path, docker_client: docker.DockerClient, general_bundles: tuple[Path, Path]
) -> None:
    from tests.dockerutil import demo_bundle_dir
    from tests.workerprocs import seed_general

    workdir = tmp_path / "gateway"
    demo_bundle_dir(workdir / "models")
    seed_general(workdir / "models", general_bundles)  # the default model, made once for the session
    settings = {
        "backend": "process",
        "worker_user": "gateway",  # uid 10001 is test_process_backend.py's
        "stem_cells": "0",
        # A worker for each of the four models it may pick (demo-shapes, general and their
        # embedding models): with two, its random picks made the workers take turns, a
        # cold start for most requests and a run that took from 40 to 80 s.
        "max_workers": "4",
        "admin_token": TOKEN,
        "state_file": str(tmp_path / "state.json"),
    }
    started = time.monotonic()
    with running_gateway(workdir, docker_client, **settings) as gw:
        internals = [str(workdir), str(tmp_path), str(gw.models_dir), str(gw.socket_dir), str(ROOT)]
        run = _schemathesis(gw.url, tmp_path / "schemathesis", internals)
        log = gw.log
    counts = _counts(run, time.monotonic() - started)
    saved = tmp_path / "schemathesis-counts.json"
    saved.write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(counts, indent=2))
    print(f"schemathesis counts: {saved}\nreports: {run.reports}\ngateway log: {log}")
    report = run.report
    problems = report["failures"] or report["errors"] or run.returncode != 0
    assert not problems, f"schemathesis (exit {run.returncode}):\n{run.output[-20000:]}"
    assert report["operations"]["tested"] == report["operations"]["selected"], report["operations"]


# -- helpers -------------------------------------------------------------------------


def _schemas(document: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every schema object in the document, with where it is."""
    for name, schema in document["components"]["schemas"].items():
        yield f"components/schemas/{name}", schema

    def walk(node: Any, where: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "schema":
                    yield f"{where}/schema", value
                elif key != "examples" and key != "example":
                    yield from walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                yield from walk(value, f"{where}/{index}")

    for key in ("paths", "components"):
        parts = {k: v for k, v in document[key].items() if k != "schemas"}
        yield from walk(parts, key)


def _examples(node: Any, where: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(where, schema, example) of every object with a schema and examples: media
    types, parameters, headers."""
    if isinstance(node, dict):
        if isinstance(node.get("schema"), dict):
            if "example" in node:
                yield where, node["schema"], node["example"]
            for name, example in (node.get("examples") or {}).items():
                yield f"{where}/examples/{name}", node["schema"], example["value"]
        for key, value in node.items():
            if key not in ("schema", "example", "examples"):
                yield from _examples(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _examples(value, f"{where}/{index}")


def _refs(node: Any, where: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield where, value
            elif key not in ("example", "examples"):
                yield from _refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _refs(value, f"{where}/{index}")


@contextmanager
def _app_rules(tmp_path: Path) -> Iterator[list[Rule]]:
    """The URL rules of an app built as the unit tests build it (a FakeBackend pool)."""
    make_bundle(tmp_path, "demo-shapes")
    clock = FakeClock()
    settings = Settings(models_dir=tmp_path, stem_cells=0, state_file=str(tmp_path / "state.json"))
    catalog = ModelCatalog(tmp_path, clock=clock)
    pool = WarmPool(FakeBackend(), catalog, settings, clock=clock, gpu=GpuMonitor(()), executor=INLINE)
    pool.start(background=False)
    try:
        yield list(create_app(settings, pool, {"TESTING": True}).url_map.iter_rules())
    finally:
        pool.shutdown(grace_s=0)


class _Run:
    def __init__(self, returncode: int, output: str, reports: Path) -> None:
        self.returncode, self.output, self.reports = returncode, output, reports
        path = reports / "report.json"
        self.report: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else _empty_report(output)
        har = reports / "har.json"
        self.har: dict[str, Any] = json.loads(har.read_text()) if har.is_file() else {"log": {"entries": []}}


def _empty_report(output: str) -> dict[str, Any]:
    title = "schemathesis wrote no report: " + output[-2000:]
    return {"failures": [], "errors": [{"title": title, "count": 1}], "operations": {}, "test_cases": {}}


def _schemathesis(url: str, reports: Path, internals: list[str]) -> _Run:
    reports.mkdir(parents=True, exist_ok=True)
    config = reports / "schemathesis.toml"
    config.write_text(_config(reports / "cache"), encoding="utf-8")
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "--no-color",
        "run",
        str(SPEC),
        "--url",
        url,
        "--checks",
        "all",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--workers",
        "1",
        "--continue-on-failure",
        "--report",
        "json,junit,har",
        "--report-dir",
        str(reports),
        "--report-json-path",
        str(reports / "report.json"),
        "--report-har-path",
        str(reports / "har.json"),
        "--report-junit-path",
        str(reports / "junit.xml"),
        *shlex.split(os.environ.get("WANWU_SCHEMATHESIS_ARGS", "")),
    ]
    try:
        env = {**os.environ, "WANWU_TEST_INTERNALS": os.pathsep.join(internals)}  # for the no_internals check
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_LIMIT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        pytest.fail(f"schemathesis ran past {RUN_LIMIT_S} s:\n{output[-20000:]}")
    return _Run(done.returncode, done.stdout + done.stderr, reports)


def _config(cache: Path) -> str:
    """The run's schemathesis.toml: the hooks, the admin token, and what the model
    endpoints may answer that a schema cannot rule out."""
    statuses = json.dumps
    return f"""\
hooks = "tests.e2e.openapi_hooks"

[cache]  # what `schemathesis replay` reads; not the working directory's .schemathesis
directory = {statuses(str(cache))}

[generation]
database = "none"

[auth.openapi.adminToken]
bearer = {statuses(TOKEN)}

# The model endpoints. A schema cannot say "a decodable image" or "top_k up to this
# model's number of labels", so data valid by the description may still be a 400, 413
# or 415; a negative case may be a 413 (too many images); and a worker that fails, a full
# pool or a slow worker is a documented 502, 503 or 504.
[[operations]]
include-path-regex = {statuses(MODEL_ROUTES)}
checks.positive_data_acceptance.expected-statuses = {statuses(["2xx", "400", "404", "413", "415"])}
checks.negative_data_rejection.expected-statuses = {statuses(["400", "404", "405", "413", "415", "422"])}
checks.not_a_server_error.expected-statuses = {statuses(["2xx", "3xx", "4xx", "502", "503", "504"])}
"""


def _counts(run: _Run, seconds: float) -> dict[str, Any]:
    report = run.report
    described: dict[str, Any] = json.loads(SPEC.read_text(encoding="utf-8"))["paths"]
    templates = [(re.compile("^" + re.sub(r"\\{[^}]+\\}", "[^/]*", re.escape(p)) + "$"), p) for p in described]
    statuses: dict[str, Counter[int]] = {}
    undeclared: Counter[int] = Counter()  # methods the description does not list (405 expected)
    for entry in run.har["log"]["entries"]:
        request, status = entry["request"], entry["response"]["status"]
        path = re.sub(r"^https?://[^/]+", "", request["url"]).split("?")[0]
        template = next((t for pattern, t in templates if pattern.match(path)), "")
        if request["method"].lower() in described.get(template, ()):
            statuses.setdefault(f"{request['method']} {template}", Counter())[status] += 1
        else:
            undeclared[status] += 1
    return {
        "seconds": round(seconds, 1),
        "exit_code": run.returncode,
        "seed": report.get("seed"),
        "operations": report.get("operations"),
        "test_cases": report.get("test_cases"),
        "failures": report.get("failures"),
        "errors": report.get("errors"),
        "responses": sum(sum(c.values()) for c in statuses.values()),
        "statuses": {route: dict(sorted(c.items())) for route, c in sorted(statuses.items())},
        "undeclared_methods": dict(sorted(undeclared.items())),
    }
