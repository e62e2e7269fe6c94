"""``gateway/openapi.json`` against the code, without Docker.

(a) Each body the gateway sends or takes is a type in ``gateway.shapes``; its schema
    (properties, required keys, JSON types) is derived from the type and must be the
    document's: a key added to a shape and not described, or described and never sent,
    fails here. Every JSON answer the document describes is some shape's.
(b) The routes Flask registers are the document's paths and methods.
(c) The real app (a pool on a FakeBackend) is driven through every route's answers,
    success and the main errors, and each body is validated against the schema the
    document gives for its path, method, status and content type.

``tests/e2e/test_openapi.py`` adds what needs a running gateway (schemathesis over HTTP).
"""

from __future__ import annotations

import io
import json
import re
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict

import jsonschema_rs
import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from gateway import shapes
from gateway.app import create_app
from scheduler.errors import UnknownModel, WorkerStartError
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.pool import INLINE, WarmPool
from scheduler.settings import Settings
from tests.images import demo_images
from tests.unit.fakes import FakeBackend, FakeClock, make_bundle

SPEC = Path(__file__).resolve().parents[2] / "gateway" / "openapi.json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
IMPLICIT = {"HEAD", "OPTIONS"}  # Flask answers these for every route by itself
ANY = frozenset({"string", "number", "integer", "boolean", "null", "array", "object"})
JSON_TYPES = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}

# The document's schema of each shape. Nested shapes (Prediction, Timing, Worker, Model,
# the batch entries, ...) are checked where their parent refers to them.
COMPONENTS: dict[str, Any] = {
    "Error": shapes.ErrorBody,
    "PredictResponse": shapes.PredictBody,
    "EmbedResponse": shapes.EmbedBody,
    "BatchResponse": shapes.BatchBody,
    "ModelList": shapes.ModelList,
    "Pool": shapes.PoolBody,
    "Readiness": shapes.Readiness,
    "SettingsView": shapes.SettingsView,
    "SettingsChanged": shapes.SettingsChanged,
    "SettingsPatch": shapes.SettingsPatch,
}
# Each JSON answer the document describes that is not an error: the shape it is.
ANSWERS: dict[tuple[str, str, str], Any] = {
    ("/predict", "post", "200"): shapes.PredictBody,
    ("/v1/models/{name}/predict", "post", "200"): shapes.PredictBody,
    ("/v1/models/{name}/embed", "post", "200"): shapes.EmbedBody,
    ("/v1/models/{name}/predict:batch", "post", "200"): shapes.BatchBody,
    ("/v1/models/{name}/embed:batch", "post", "200"): shapes.BatchBody,
    ("/v1/models", "get", "200"): shapes.ModelList,
    ("/v1/pool", "get", "200"): shapes.PoolBody,
    ("/v1/pool/settings", "get", "200"): shapes.SettingsView,
    ("/v1/pool/settings", "patch", "200"): shapes.SettingsChanged,
    ("/healthz", "get", "200"): shapes.Health,
    ("/readyz", "get", "200"): shapes.Readiness,
    ("/readyz", "get", "503"): shapes.Readiness,
}
NOT_SHAPED = {("/openapi.json", "get", "200")}  # the document itself


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SPEC.read_text(encoding="utf-8"))
    return loaded


# -- (a) the shapes are the document's ------------------------------------------------------


def derived(tp: Any) -> dict[str, Any]:
    """A type's JSON schema, as far as this test compares them."""
    if is_typeddict(tp):
        hints = get_type_hints(tp)
        return {
            "type": "object",
            "properties": {key: derived(value) for key, value in hints.items()},
            "required": sorted(tp.__required_keys__),
        }
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (Union, types.UnionType):
        return {"anyOf": [derived(arg) for arg in args]}
    if origin is list:
        return {"type": "array", "items": derived(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": derived(args[1])}
    if tp is Any:
        return {}
    return {"type": JSON_TYPES[tp]}


class Document:
    """The document's schemas, with ``$ref`` and ``allOf`` resolved as this test needs."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.seen: set[str] = set()  # components/schemas reached

    def node(self, pointer: str) -> Any:
        node: Any = self.document
        for part in pointer.lstrip("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in schema:
            ref = schema["$ref"]
            if ref.startswith("#/components/schemas/"):
                self.seen.add(ref.rsplit("/", 1)[1])
            schema = {**self.node(ref), **{k: v for k, v in schema.items() if k != "$ref"}}
        if "allOf" in schema:
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                merged = _merge(merged, self.resolve(part))
            return merged
        return schema

    def types(self, schema: dict[str, Any]) -> frozenset[str]:
        """The JSON types a schema admits."""
        schema = self.resolve(schema)
        if "type" in schema:
            given = schema["type"]
            return frozenset([given] if isinstance(given, str) else given)
        if "const" in schema:
            return frozenset({_json_type(schema["const"])})
        if "enum" in schema:
            return frozenset(_json_type(value) for value in schema["enum"])
        variants = schema.get("oneOf") or schema.get("anyOf")
        if variants:
            return frozenset().union(*(self.types(v) for v in variants))
        if "properties" in schema or "additionalProperties" in schema:
            return frozenset({"object"})
        return ANY


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    merged = dict(a)
    for key, value in b.items():
        if key == "required":
            merged[key] = sorted(set(merged.get(key, [])) | set(value))
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _json_type(value: Any) -> str:
    return JSON_TYPES[type(value)]


def mismatches(shape: dict[str, Any], schema: dict[str, Any], doc: Document, where: str) -> list[str]:
    """How a derived schema and the document's differ (empty: they agree)."""
    schema = doc.resolve(schema)
    if not shape:  # Any: whatever the document says
        return []
    if "anyOf" in shape:
        return _union(shape["anyOf"], schema, doc, where)
    if "enum" in shape:
        listed = schema.get("enum", [schema["const"]] if "const" in schema else None)
        if listed is None or sorted(map(str, listed)) != sorted(map(str, shape["enum"])):
            return [f"{where}: the code gives {shape['enum']}, the document says {listed or schema}"]
        return []
    found = _type_mismatch(shape["type"], doc.types(schema), where)
    if found:
        return found
    if shape["type"] == "array":
        return mismatches(shape["items"], schema.get("items", {}), doc, f"{where}[]")
    if shape["type"] == "object" and "properties" in shape:
        return _object(shape, schema, doc, where)
    if shape["type"] == "object":  # a mapping: name to value
        if "properties" in schema:
            return [f"{where}: a mapping in the code, an object of named properties in the document"]
        extra = schema.get("additionalProperties")
        return mismatches(shape["additionalProperties"], extra, doc, f"{where}.*") if isinstance(extra, dict) else []
    return []


def _type_mismatch(given: str, admitted: frozenset[str], where: str) -> list[str]:
    if admitted == ANY:
        return []
    ok = given in admitted or (given == "integer" and "number" in admitted)
    if not ok or (admitted - {given} - ({"integer"} if given == "number" else set())):
        return [f"{where}: the code gives {given}, the document says {sorted(admitted)}"]
    return []


def _object(shape: dict[str, Any], schema: dict[str, Any], doc: Document, where: str) -> list[str]:
    described = schema.get("properties", {})
    found = []
    undescribed = sorted(set(shape["properties"]) - set(described))
    unsent = sorted(set(described) - set(shape["properties"]))
    if undescribed:
        found.append(f"{where}: {undescribed} in the code, not in the document")
    if unsent:
        found.append(f"{where}: {unsent} in the document, not in the code")
    if sorted(schema.get("required", [])) != shape["required"]:
        found.append(f"{where}: required {shape['required']} in the code, {sorted(schema.get('required', []))} in it")
    for key in sorted(set(shape["properties"]) & set(described)):
        found += mismatches(shape["properties"][key], described[key], doc, f"{where}.{key}")
    return found


def _union(members: list[dict[str, Any]], schema: dict[str, Any], doc: Document, where: str) -> list[str]:
    """A union: each member is one of the document's variants and each variant is some
    member's; without variants, the union's JSON types are the document's."""
    variants = schema.get("oneOf") or schema.get("anyOf")
    if not variants:
        given = frozenset(m["type"] for m in members if "type" in m and "properties" not in m)
        if len(given) != len(members) or any(m.get("type") in ("array", "object") for m in members):
            return [f"{where}: a union of shapes in the code, no variants in the document"]
        admitted = doc.types(schema)
        return (
            [] if given == admitted else [f"{where}: the code gives {sorted(given)}, the document {sorted(admitted)}"]
        )
    found = []
    matched: set[int] = set()
    for index, member in enumerate(members):
        fits = [i for i, v in enumerate(variants) if not mismatches(member, v, doc, where)]
        if not fits:
            tried = [m for v in variants for m in mismatches(member, v, doc, f"{where}|{index}")]
            found.append(f"{where}: member {index} is none of the document's variants: {tried}")
        matched.update(fits)
    unmatched = sorted(set(range(len(variants))) - matched)
    if unmatched:
        found.append(f"{where}: the document's variants {unmatched} are no member of the code's union")
    return found


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_each_shape_is_the_documents_schema(document: dict[str, Any], name: str) -> None:
    doc = Document(document)
    found = mismatches(derived(COMPONENTS[name]), {"$ref": f"#/components/schemas/{name}"}, doc, name)
    assert not found, "\n".join(found)


def test_every_answer_the_document_describes_is_a_shapes(document: dict[str, Any]) -> None:
    doc = Document(document)
    found, errors = [], 0
    for (path, method, status), media in _json_answers(document):
        where = f"{method.upper()} {path} {status}"
        if (path, method, status) in NOT_SHAPED:
            continue
        shape = ANSWERS.get((path, method, status))
        if shape is None and int(status) >= 400:
            shape, errors = shapes.ErrorBody, errors + 1
        assert shape is not None, f"{where}: no shape in gateway.shapes (add it to ANSWERS)"
        found += mismatches(derived(shape), media["schema"], doc, where)
    assert not found, "\n".join(found)
    assert errors > 40  # every error answer of every route is the one error body
    missed = set(ANSWERS) - {key for key, _ in _json_answers(document)}
    assert not missed, f"answers the document no longer describes: {sorted(missed)}"
    unreached = set(document["components"]["schemas"]) - doc.seen - {"SettingsPatch", "KeepAlive"}
    assert not unreached, f"schemas no answer uses: {sorted(unreached)}"


def test_the_shape_check_fails_on_drift(document: dict[str, Any]) -> None:
    """The check catches what it is for: a key added, a key dropped, a type changed."""
    doc = Document(document)
    shape = derived(shapes.PredictBody)
    added = {**shape, "properties": {**shape["properties"], "novel": {"type": "string"}}}
    dropped = {**shape, "properties": {k: v for k, v in shape["properties"].items() if k != "lang"}}
    retyped = {**shape, "properties": {**shape["properties"], "cached": {"type": "string"}}}
    optional = {**shape, "required": [k for k in shape["required"] if k != "model"]}
    schema = {"$ref": "#/components/schemas/PredictResponse"}
    assert any("novel" in m for m in mismatches(added, schema, doc, "x"))
    assert any("lang" in m for m in mismatches(dropped, schema, doc, "x"))
    assert any("cached" in m for m in mismatches(retyped, schema, doc, "x"))
    assert any("required" in m for m in mismatches(optional, schema, doc, "x"))
    assert mismatches(shape, schema, doc, "x") == []


def _json_answers(document: dict[str, Any]) -> Iterator[tuple[tuple[str, str, str], dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method not in METHODS:
                continue
            for status, answer in operation["responses"].items():
                resolved = Document(document).resolve(answer)
                media = resolved.get("content", {}).get("application/json")
                if media is not None:
                    yield (path, method, status), media


# -- (b) the routes are the document's ------------------------------------------------------


def routes(app: Flask) -> set[tuple[str, str]]:
    return {
        (re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule), method)
        for rule in app.url_map.iter_rules()
        for method in (rule.methods or set()) - IMPLICIT
    }


def described(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, m.upper()) for path, item in document["paths"].items() for m in item if m in METHODS}


def test_the_routes_are_the_documents_paths_and_methods(document: dict[str, Any], app: Flask) -> None:
    registered, listed = routes(app), described(document)
    assert not registered - listed, f"routes gateway/openapi.json does not describe: {sorted(registered - listed)}"
    assert not listed - registered, f"gateway/openapi.json describes what is no route: {sorted(listed - registered)}"


def test_the_route_check_fails_on_a_new_route(document: dict[str, Any], app: Flask) -> None:
    app.add_url_rule("/v1/undescribed", "undescribed", lambda: "")
    assert ("/v1/undescribed", "GET") in routes(app) - described(document)


# -- (c) the app's answers are the document's -------------------------------------------------

TOKEN = "t0ken-for-the-shape-tests"
LABELS = ("虎斑猫", "埃及猫", "杯子")
IMAGE = next(iter(demo_images(seed=4).values()))


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    models = tmp_path / "models"
    general = make_bundle(
        models,
        "general",
        labels=LABELS,
        language="zh",
        groups={"猫": ["虎斑猫", "埃及猫"]},
        subsets={"猫科": ["虎斑猫", "埃及猫"]},
        confidence_threshold=0.3,
        translations={"en": {"labels": "labels_en.txt", "groups": {"猫": "cat"}}},
        cpu_fallback=True,
    )
    (general / "labels_en.txt").write_text("tabby\nEgyptian cat\ncup\n", encoding="utf-8")
    make_bundle(models, "batched", batching={"max_batch_size": 4, "max_wait_ms": 0})
    make_bundle(models, "embedder", task="embed", embedding_dim=3)
    broken = make_bundle(models, "broken")
    (broken / "labels.txt").write_text("", encoding="utf-8")
    backend = FakeBackend()
    backend.answers["general"] = {
        "predictions": [{"label": "虎斑猫", "score": 0.9}, {"label": "埃及猫", "score": 0.05}],
        "groups": [{"label": "猫", "score": 0.95}],
    }
    clock = FakeClock()
    settings = Settings(
        models_dir=models,
        max_workers=2,
        queue_timeout_s=1,
        queue_max=1,
        stem_cells=0,
        default_model="general",
        max_upload_mb=1,
        max_batch_images=3,
        admin_token=TOKEN,
        state_file=str(tmp_path / "state.json"),
    )
    pool = WarmPool(
        backend, ModelCatalog(models, clock=clock), settings, clock=clock, gpu=GpuMonitor(()), executor=INLINE
    )
    pool.start(background=False)
    built = create_app(settings, pool, {"TESTING": True})
    built.extensions["fake_backend"] = backend
    try:
        yield built
    finally:
        pool.shutdown(grace_s=0)


class Checked:
    """Answers validated against the document as they come; remembers which
    (path, method, status) each check covered."""

    def __init__(self, document: dict[str, Any], client: FlaskClient) -> None:
        self.document, self.client = document, client
        self.covered: set[tuple[str, str, str]] = set()

    def __call__(self, method: str, path: str, template: str, status: int, **kwargs: Any) -> TestResponse:
        response = self.client.open(path, method=method.upper(), **kwargs)
        assert response.status_code == status, f"{method} {path}: {response.status_code} {response.get_data(True)}"
        problems = answer_problems(self.document, template, method, response)
        assert not problems, f"{method} {path} {status}: {problems}"
        self.covered.add((template, method, str(status)))
        return response


def answer_problems(document: dict[str, Any], template: str, method: str, response: TestResponse) -> list[str]:
    """How an answer differs from what the document says of its path, method and status."""
    operation = document["paths"][template].get(method)
    if operation is None:
        return [f"no {method} on {template}"]
    answer = operation["responses"].get(str(response.status_code))
    if answer is None:
        return [f"status {response.status_code} is not described"]
    answer = Document(document).resolve(answer)
    media = answer.get("content", {}).get(response.mimetype)
    if media is None:
        return [f"content type {response.mimetype} is not described: {sorted(answer.get('content', {}))}"]
    problems = [f"header {name} missing" for name in answer.get("headers", {}) if _required_header(name, response)]
    if response.mimetype == "application/json":
        validator = jsonschema_rs.Draft202012Validator(
            {"components": document["components"], "allOf": [media["schema"]]}
        )
        problems += [f"{error.instance_path}: {error.message}" for error in validator.iter_errors(response.get_json())]
    return problems


def _required_header(name: str, response: TestResponse) -> bool:
    """A documented header the answer lacks (X-Request-ID and Retry-After are always sent where described)."""
    return name in ("X-Request-ID", "Retry-After") and name not in response.headers


def fresh() -> dict[str, Any]:
    """One image, answered by a worker whatever the result cache holds."""
    return {"headers": {"Cache-Control": "no-cache"}, **multipart(ONE)}


def multipart(*images: tuple[bytes, str], field: str = "image") -> dict[str, Any]:
    return {"data": {field: [(io.BytesIO(data), name) for data, name in images]}, "content_type": "multipart/form-data"}


ONE = (IMAGE, "a.png")


def test_every_route_answers_as_described(document: dict[str, Any], app: Flask) -> None:
    check = Checked(document, app.test_client())
    backend: FakeBackend = app.extensions["fake_backend"]
    for step in (_predictions, _batches, _embeddings, _catalog_and_health, _settings, _static):
        step(check, backend, app)
    answered = {key for key in check.covered if key[2].startswith("2")}
    assert answered >= {(p, m.lower(), "200") for p, m in described(document)}, "a route's success was not driven"
    assert len(check.covered) >= 37, sorted(check.covered)


def _predictions(check: Checked, backend: FakeBackend, app: Flask) -> None:
    model = "/v1/models/{name}/predict"
    body = check("post", "/predict", "/predict", 200, **multipart(ONE)).get_json()
    assert body["groups"] and body["confident"] is True
    check("post", "/predict", "/predict", 200, **multipart(ONE))  # cached
    check("post", "/v1/models/general/predict?lang=en&subset=猫科", model, 200, **multipart(ONE))
    check("post", "/v1/models/general/predict?labels=杯子,虎斑猫&top_k=1", model, 200, **multipart(ONE))
    check("post", "/v1/models/batched/predict", model, 200, data=IMAGE, content_type="image/png")
    check("post", "/predict", "/predict", 400, **multipart(ONE, field="file"))
    check("post", "/v1/models/general/predict?top_k=0", model, 400, **multipart(ONE))
    check("post", "/v1/models/general/predict?labels=狗", model, 400, **multipart(ONE))
    check("post", "/v1/models/embedder/predict", model, 400, **multipart(ONE))
    check("post", "/v1/models/nope/predict", model, 404, **multipart(ONE))
    check("post", "/v1/models/broken/predict", model, 404, **multipart(ONE))
    check("post", "/predict", "/predict", 413, **multipart((b"x" * (2 << 20), "big.png")))
    check("post", "/predict", "/predict", 415, **multipart((b"text", "a.txt")))
    check("post", "/predict", "/predict", 415, data=IMAGE, content_type="image/png")
    backend.outcomes["batched"].extend(["crash", "crash"])
    check("post", "/v1/models/batched/predict", model, 502, **fresh())
    backend.outcomes["batched"].extend(["timeout", "timeout"])
    check("post", "/v1/models/batched/predict", model, 504, **fresh())
    backend.fail_next_spawns("embedder", error=WorkerStartError("exited with status 1"))
    check("post", "/v1/models/embedder/embed", "/v1/models/{name}/embed", 502, **fresh())
    check("post", "/v1/models/embedder/embed", "/v1/models/{name}/embed", 503, **fresh())  # backing off
    app.extensions["wanwu"].pool.core.backoff.clear()


def _batches(check: Checked, backend: FakeBackend, app: Flask) -> None:
    batch = "/v1/models/{name}/predict:batch"
    url = "/v1/models/general/predict:batch?lang=en"
    answer = check("post", url, batch, 200, **multipart(ONE, (b"junk", "b.txt"), ONE)).get_json()
    assert [sorted(e) for e in answer["results"]][1] == ["error", "file", "index", "retryable"]
    check("post", "/v1/models/general/predict:batch", batch, 400, **multipart(ONE, field="file"))
    check("post", "/v1/models/general/predict:batch", batch, 413, **multipart(*[ONE] * 4))
    check("post", "/v1/models/general/predict:batch", batch, 415, data=IMAGE, content_type="image/png")
    check("post", "/v1/models/nope/predict:batch", batch, 404, **multipart(ONE))
    backend.fail_next_spawns("batched", error=WorkerStartError("exited with status 1"))
    check("post", "/v1/models/batched/predict:batch", batch, 502, **multipart(ONE, ONE))
    check("post", "/v1/models/batched/predict:batch", batch, 503, **multipart(ONE, ONE))  # backing off
    app.extensions["wanwu"].pool.core.backoff.clear()


def _embeddings(check: Checked, backend: FakeBackend, app: Flask) -> None:
    embed, batch = "/v1/models/{name}/embed", "/v1/models/{name}/embed:batch"
    check("post", "/v1/models/embedder/embed", embed, 200, **multipart(ONE))
    check("post", "/v1/models/embedder/embed?encoding=base64", embed, 200, **multipart(ONE))
    check("post", "/v1/models/general/embed", embed, 400, **multipart(ONE))
    check("post", "/v1/models/embedder/embed:batch?encoding=base64", batch, 200, **multipart(ONE, ONE))
    check("post", "/v1/models/embedder/embed:batch", batch, 200, **multipart((b"junk", "b.txt")))


def _catalog_and_health(check: Checked, backend: FakeBackend, app: Flask) -> None:
    listed = check("get", "/v1/models", "/v1/models", 200).get_json()
    assert "broken" in listed["invalid"] and listed["models"]
    pool = check("get", "/v1/pool", "/v1/pool", 200).get_json()
    assert pool["workers"]
    check("get", "/healthz", "/healthz", 200)
    check("get", "/readyz", "/readyz", 200)
    check("get", "/metrics", "/metrics", 200)
    check("get", "/openapi.json", "/openapi.json", 200)
    catalog = app.extensions["wanwu"].catalog
    real = catalog.get
    catalog.get = _unknown  # the default model is gone: not ready
    try:
        check("get", "/readyz", "/readyz", 503)
    finally:
        catalog.get = real


def _unknown(name: str) -> Any:
    raise UnknownModel(f"no model named {name!r}")


def _settings(check: Checked, backend: FakeBackend, app: Flask) -> None:
    path = "/v1/pool/settings"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    check("get", path, path, 200)
    check("patch", path, path, 200, json={"max_workers": 3, "model_ttl_s": {"general": 60}}, headers=auth)
    check("patch", path, path, 200, json={"persist": True}, headers=auth)
    check("patch", path, path, 400, json={"max_workers": "many"}, headers=auth)
    check("patch", path, path, 401, json={"max_workers": 3})
    check("patch", path, path, 415, data="max_workers=3", headers=auth)
    app.extensions["wanwu_admin"].token = ""
    check("patch", path, path, 403, json={"max_workers": 3}, headers=auth)


def _static(check: Checked, backend: FakeBackend, app: Flask) -> None:
    check("get", "/dashboard", "/dashboard", 200)
    check("get", "/dashboard/dashboard.js", "/dashboard/{asset}", 200)
    check("get", "/dashboard/nope.js", "/dashboard/{asset}", 404)


def test_too_many_requests_is_answered_as_described(document: dict[str, Any], tmp_path: Path) -> None:
    make_bundle(tmp_path, "m")
    clock = FakeClock()
    settings = Settings(models_dir=tmp_path, stem_cells=0, default_model="m", client_max_requests=1)
    pool = WarmPool(
        FakeBackend(), ModelCatalog(tmp_path, clock=clock), settings, clock=clock, gpu=GpuMonitor(()), executor=INLINE
    )
    pool.start(background=False)
    try:
        app = create_app(settings, pool, {"TESTING": True})
        app.extensions["wanwu"].gate.enter("127.0.0.1")  # one request of this client is in the app
        check = Checked(document, app.test_client())
        check("get", "/v1/models", "/v1/models", 429)
        check("post", "/predict", "/predict", 429, **multipart(ONE))
    finally:
        pool.shutdown(grace_s=0)


def test_the_answer_check_fails_on_an_undescribed_body(document: dict[str, Any], app: Flask) -> None:
    """The validation catches what it is for: a body, a status or a type not described."""
    client = app.test_client()
    ok = client.get("/healthz")
    assert answer_problems(document, "/healthz", "get", ok) == []
    ok.set_data(json.dumps({"status": "fine"}))
    assert answer_problems(document, "/healthz", "get", ok)
    models = client.get("/v1/models")
    body = models.get_json()
    body["models"][0]["labels"] = "not a list"
    models.set_data(json.dumps(body))
    assert answer_problems(document, "/v1/models", "get", models)
    teapot = client.get("/healthz")
    teapot.status_code = 418
    assert answer_problems(document, "/healthz", "get", teapot) == ["status 418 is not described"]
