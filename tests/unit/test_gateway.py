"""The HTTP API with the pool on a FakeBackend: validation, errors, cache, metrics."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.app import create_app
from scheduler.errors import WorkerStartError
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.pool import INLINE, WarmPool
from scheduler.settings import Settings
from tests.images import demo_images, encode, png_header_only, truncated_png
from tests.promtext import metric
from tests.unit.fakes import FakeBackend, FakeClock, make_bundle

DEMO = "demo-shapes"  # the models these tests make; the gateway's own default is the general model


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def app(tmp_path: Path, backend: FakeBackend) -> Iterator[Flask]:
    make_bundle(tmp_path, "demo-shapes")
    make_bundle(tmp_path, "other")
    clock = FakeClock()
    settings = Settings(
        models_dir=tmp_path, max_workers=1, queue_timeout_s=2, max_upload_mb=1, stem_cells=0, default_model=DEMO
    )
    pool = WarmPool(
        backend, ModelCatalog(tmp_path, clock=clock), settings, clock=clock, gpu=GpuMonitor(()), executor=INLINE
    )
    pool.start(background=False)
    app = create_app(settings, pool, {"TESTING": True})
    yield app
    pool.shutdown(grace_s=0)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


IMAGE = next(iter(demo_images(seed=3).values()))


def post(client: FlaskClient, data: bytes = IMAGE, url: str = "/predict", field: str = "image", **kwargs: object):  # type: ignore[no-untyped-def]
    return client.post(url, data={field: (io.BytesIO(data), "x.png")}, content_type="multipart/form-data", **kwargs)


def test_predict_answers_the_original_clients_shape(client: FlaskClient) -> None:
    response = post(client)
    assert response.status_code == 200
    body = response.get_json()
    assert body["result"] == body["predictions"][0]["label"]
    assert body["model"] == "demo-shapes" and body["cold_start"] is True and body["cached"] is False
    assert body["start"] == "container"
    assert set(body["timing_ms"]) == {"queue", "spawn", "worker", "total", "spawn_create", "spawn_ready"}
    assert response.headers["X-Request-ID"] == body["request_id"]


def test_request_id_is_echoed_when_sane(client: FlaskClient) -> None:
    assert post(client, headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    made = post(client, headers={"X-Request-ID": "<script>" + "x" * 200}).headers["X-Request-ID"]
    assert len(made) == 32 and made.isalnum()


def test_model_route_takes_multipart_or_a_raw_body(client: FlaskClient) -> None:
    assert post(client, url="/v1/models/other/predict?top_k=1").get_json()["model"] == "other"
    raw = client.post("/v1/models/other/predict", data=IMAGE, content_type="image/png")
    assert raw.status_code == 200 and len(raw.get_json()["predictions"]) == 1


@pytest.mark.parametrize(
    ("data", "field", "status", "code"),
    [
        (b"", "image", 400, "empty"),
        (b"just some text", "image", 415, "not_an_image"),
        (truncated_png(), "image", 400, "corrupt_image"),
        (png_header_only(100_000, 100_000), "image", 413, "image_too_large"),
        (
            encode(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (4, 4)), "PPM"),
            "image",
            415,
            "unsupported_format",
        ),
        (IMAGE, "file", 400, "missing_field"),
        (b"x" * (2 * 2**20), "image", 413, "too_large"),
    ],
)
def test_bad_uploads_never_reach_a_worker(
    client: FlaskClient, backend: FakeBackend, data: bytes, field: str, status: int, code: str
) -> None:
    response = post(client, data, field=field)
    assert response.status_code == status
    error = response.get_json()["error"]
    assert error["code"] == code and error["message"] and error["request_id"]
    assert backend.spawns == []
    assert post(client).status_code == 200  # and the next good one works


@pytest.mark.parametrize("top_k", ["0", "3", "x", "-1"])
def test_top_k_is_checked_against_the_model(client: FlaskClient, top_k: str) -> None:
    response = post(client, url=f"/v1/models/demo-shapes/predict?top_k={top_k}")
    assert response.status_code == 400 and response.get_json()["error"]["code"] == "bad_parameter"
    assert "from 1 to 2" in response.get_json()["error"]["message"]


def test_wrong_content_type_is_415(client: FlaskClient) -> None:
    response = client.post("/v1/models/demo-shapes/predict", data="{}", content_type="application/json")
    assert response.status_code == 415 and response.get_json()["error"]["code"] == "unsupported_media_type"
    raw_on_default = client.post("/predict", data=IMAGE, content_type="image/png")
    assert raw_on_default.status_code == 415


def test_flask_errors_are_json(client: FlaskClient) -> None:
    for response, status in (
        (client.get("/nope"), 404),
        (client.get("/predict"), 405),
        (client.delete("/v1/pool"), 405),
    ):
        assert response.status_code == status
        assert response.is_json and response.get_json()["error"]["request_id"]


def test_unknown_model_is_404(client: FlaskClient) -> None:
    response = post(client, url="/v1/models/nope/predict")
    assert response.status_code == 404 and response.get_json()["error"]["code"] == "unknown_model"


def test_no_capacity_is_503_with_retry_after(client: FlaskClient, app: Flask) -> None:
    pool = app.extensions["wanwu"].pool
    lease = pool.acquire("other", pool.clock.now() + 1)  # the only slot is busy
    response = post(client)
    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "no_capacity"
    assert int(response.headers["Retry-After"]) >= 1
    pool.release(lease)


def test_worker_failures_map_to_502_and_504(
    client: FlaskClient, backend: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    backend.fail_next_spawns("demo-shapes", error=WorkerStartError("exited with status 2; last log lines: boom"))
    response = post(client)
    error = response.get_json()["error"]
    assert response.status_code == 502 and error["code"] == "worker_start_failed"
    assert "boom" not in error["message"]  # the worker's log lines are the operator's, not the client's
    assert any(error["request_id"] in r.getMessage() and "boom" in r.getMessage() for r in caplog.records)
    backend.outcomes["other"].extend(["timeout", "timeout"])
    response = post(client, url="/v1/models/other/predict")
    assert response.status_code == 504 and response.get_json()["error"]["code"] == "worker_timeout"


def test_results_are_cached_by_content(client: FlaskClient, backend: FakeBackend) -> None:
    first = post(client).get_json()
    second = post(client).get_json()
    assert second["cached"] is True and second["predictions"] == first["predictions"]
    assert sum(c.calls for c in backend.connections.values()) == 1
    assert post(client, url="/v1/models/demo-shapes/predict?top_k=1").get_json()["cached"] is False


def test_cache_can_be_turned_off(tmp_path: Path, backend: FakeBackend) -> None:
    make_bundle(tmp_path, "demo-shapes")
    settings = Settings(models_dir=tmp_path, cache_enabled=False, default_model=DEMO)
    pool = WarmPool(backend, ModelCatalog(tmp_path), settings, gpu=GpuMonitor(()), executor=INLINE)
    client = create_app(settings, pool).test_client()
    assert post(client).get_json()["cached"] is False
    assert post(client).get_json()["cached"] is False
    pool.shutdown(grace_s=0)


def test_models_pool_health_and_readiness(client: FlaskClient) -> None:
    models = client.get("/v1/models").get_json()
    assert [m["name"] for m in models["models"]] == ["demo-shapes", "other"]
    assert models["models"][0]["default"] is True and models["models"][0]["labels"] == ["a", "b"]
    post(client)
    pool = client.get("/v1/pool").get_json()
    assert pool["capacity"] == 1 and pool["workers"][0]["model"] == "demo-shapes"
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["checks"]["model"]["ok"] is True


def test_readiness_fails_without_the_default_model(tmp_path: Path, backend: FakeBackend) -> None:
    make_bundle(tmp_path, "other")
    settings = Settings(models_dir=tmp_path, default_model=DEMO)
    pool = WarmPool(backend, ModelCatalog(tmp_path), settings, gpu=GpuMonitor(()), executor=INLINE)
    ready = create_app(settings, pool).test_client().get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["checks"]["model"]["ok"] is False
    pool.shutdown(grace_s=0)


def test_metrics_count_what_was_sent(client: FlaskClient) -> None:
    post(client)
    post(client, url="/v1/models/demo-shapes/predict?top_k=1")
    post(client)  # cached
    post(client, b"text")
    post(client, url="/v1/models/nope/predict")
    text = client.get("/metrics").get_data(as_text=True)
    assert metric(text, 'wanwu_requests_total{model="demo-shapes",outcome="ok"}') == 3
    assert metric(text, 'wanwu_requests_total{model="demo-shapes",outcome="not_an_image"}') == 1
    assert metric(text, 'wanwu_requests_total{model="-",outcome="unknown_model"}') == 1
    assert metric(text, 'wanwu_cold_starts_total{model="demo-shapes"}') == 1
    assert metric(text, 'wanwu_warm_hits_total{model="demo-shapes"}') == 1
    assert metric(text, 'wanwu_cache_hits_total{model="demo-shapes"}') == 1
    assert metric(text, 'wanwu_workers{model="demo-shapes",state="idle"}') == 1
    assert metric(text, 'wanwu_request_seconds_count{model="demo-shapes"}') == 3
    assert metric(text, 'wanwu_reaps_total{reason="ttl"}') == 0
    assert "wanwu_queue_depth 0.0" in text


def test_no_cache_asks_a_worker_again(client: FlaskClient, backend: FakeBackend) -> None:
    post(client)
    again = post(client, headers={"Cache-Control": "no-cache"}).get_json()
    assert again["cached"] is False and len(backend.connections) == 1
    assert sum(c.calls for c in backend.connections.values()) == 2


def test_pool_status_carries_the_live_settings(client: FlaskClient) -> None:
    body = client.get("/v1/pool").get_json()
    assert body["settings"]["max_workers"] == 1 and body["settings"]["queue_timeout_s"] == 2
    assert body["settings"]["keepalive"] == "adaptive" and body["keepalive"]["policy"] == "adaptive"


def test_the_json_access_log_has_a_line_per_request(tmp_path: Path, backend: FakeBackend) -> None:
    import json

    make_bundle(tmp_path / "m", "demo-shapes")
    journal = tmp_path / "logs" / "access.jsonl"
    clock = FakeClock()
    settings = Settings(models_dir=tmp_path / "m", access_log=str(journal), default_model=DEMO)
    pool = WarmPool(backend, ModelCatalog(tmp_path / "m", clock=clock), settings, clock, GpuMonitor(()), INLINE)
    client = create_app(settings, pool, {"TESTING": True}).test_client()
    post(client)
    post(client, data=b"not an image")
    client.get("/healthz")
    pool.shutdown(grace_s=0)
    lines = [json.loads(line) for line in journal.read_text(encoding="utf-8").splitlines()]
    assert [(e["method"], e["path"], e["status"]) for e in lines] == [
        ("POST", "/predict", 200),
        ("POST", "/predict", 415),
        ("GET", "/healthz", 200),
    ]
    first = lines[0]
    assert first["model"] == "demo-shapes" and first["cold_start"] is True and first["cached"] is False
    assert set(first["timing_ms"]) == {"queue", "spawn", "worker", "total"} and first["ts"] > 1.7e9

    from scheduler.traces import load_trace

    replayed = load_trace(journal)  # wanwu tune reads it back as a trace
    assert [m for _, m in replayed.arrivals] == ["demo-shapes"]  # the 415 never reached the pool


def test_an_access_log_that_cannot_be_opened_is_a_config_error(tmp_path: Path, backend: FakeBackend) -> None:
    from scheduler.errors import ConfigError

    make_bundle(tmp_path / "m", "demo-shapes")
    (tmp_path / "file").write_text("x")
    settings = Settings(models_dir=tmp_path / "m", access_log=str(tmp_path / "file" / "access.jsonl"))
    pool = WarmPool(backend, ModelCatalog(tmp_path / "m"), settings, gpu=GpuMonitor(()), executor=INLINE)
    with pytest.raises(ConfigError, match=r"WANWU_ACCESS_LOG=.*cannot open it"):
        create_app(settings, pool, {"TESTING": True})
    pool.shutdown(grace_s=0)


def test_the_model_is_resolved_once_and_its_entry_carried_to_the_pool(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = app.extensions["wanwu"]
    looked_up: list[str] = []
    served: list[object] = []
    real_get, real_predict = svc.catalog.get, svc.pool.predict

    def get(name: str):  # type: ignore[no-untyped-def]
        looked_up.append(name)
        return real_get(name)

    def predict(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        served.append(model)
        return real_predict(model, *args, **kwargs)

    assert post(client, url="/v1/models/other/predict").status_code == 200  # a worker starts (it needs the path)
    monkeypatch.setattr(svc.catalog, "get", get)
    monkeypatch.setattr(svc.pool, "predict", predict)
    fresh = {"headers": {"Cache-Control": "no-cache"}}
    assert post(client, url="/v1/models/other/predict", **fresh).status_code == 200
    # The gateway's lookup, and the pool's check as the request arrives that the model is still served.
    assert looked_up == ["other", "other"]
    assert served == [real_get("other")] and not isinstance(served[0], str)
