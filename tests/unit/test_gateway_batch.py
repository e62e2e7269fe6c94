"""POST /v1/models/<name>/predict:batch and priorities, with the pool on a FakeBackend."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from scheduler.settings import Settings
from tests.images import demo_images, truncated_png
from tests.promtext import metric
from tests.unit.fakes import FakeBackend, fake_gateway, make_bundle

IMAGES = list(demo_images(seed=5).values())


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def app(tmp_path: Path, backend: FakeBackend) -> Iterator[Flask]:
    make_bundle(tmp_path, "demo-shapes", batching={"max_batch_size": 3, "max_wait_ms": 0})
    make_bundle(tmp_path, "plain")
    settings = Settings(
        models_dir=tmp_path,
        max_workers=1,
        queue_timeout_s=2,
        max_upload_mb=1,
        max_batch_images=8,
        max_batch_upload_mb=2,
        stem_cells=0,
        default_model="demo-shapes",
    )
    with fake_gateway(backend, settings) as app:
        yield app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def post_batch(client: FlaskClient, parts: list[tuple[bytes, str]], model: str = "demo-shapes", query: str = ""):  # type: ignore[no-untyped-def]
    data = {"image": [(io.BytesIO(blob), name) for blob, name in parts]}
    return client.post(f"/v1/models/{model}/predict:batch{query}", data=data, content_type="multipart/form-data")


def test_every_image_gets_its_entry_in_order_and_a_bad_one_only_its_own_error(
    client: FlaskClient, backend: FakeBackend
) -> None:
    parts = [(IMAGES[0], "a.png"), (b"not an image", "b.txt"), (IMAGES[1], "c.png"), (truncated_png(), "d.png")]
    parts += [(IMAGES[i], f"{i}.png") for i in range(2, 6)]
    response = post_batch(client, parts, query="?top_k=1")
    assert response.status_code == 200
    body = response.get_json()
    assert body["count"] == 8 and body["failed"] == 2 and body["model"] == "demo-shapes"
    results = body["results"]
    assert [r["index"] for r in results] == list(range(8))
    assert [r["file"] for r in results] == [name for _, name in parts]
    assert results[1]["error"]["code"] == "not_an_image" and results[1]["retryable"] is False
    assert results[3]["error"]["code"] == "corrupt_image"
    # An image's error is the same error object as a whole answer's, under the batch's request id.
    assert set(results[1]["error"]) == {"code", "message", "request_id"}
    assert results[1]["error"]["request_id"] == body["request_id"] == response.headers["X-Request-ID"]
    answered = [r for r in results if "predictions" in r]
    assert len(answered) == 6 and all(len(r["predictions"]) == 1 and r["result"] for r in answered)
    # Six good images, max batch size 3: two worker calls, and the bad ones never reached a worker.
    (connection,) = backend.connections.values()
    assert connection.batches == [3, 3] and body["calls"] == 2
    assert b"not an image" not in connection.seen


def test_limits_are_per_image_and_per_request(client: FlaskClient) -> None:
    big = IMAGES[0] + b"\0" * (1024 * 1024)  # over the 1 MB per-image limit
    body = post_batch(client, [(IMAGES[0], "ok.png"), (big, "big.png")]).get_json()
    assert body["results"][1]["error"]["code"] == "too_large" and "predictions" in body["results"][0]
    too_many = post_batch(client, [(IMAGES[0], f"{i}.png") for i in range(9)])
    assert too_many.status_code == 413 and too_many.get_json()["error"]["code"] == "too_many_images"
    huge = post_batch(client, [(b"\0" * (900 * 1024), f"{i}.png") for i in range(3)])  # 2.7 MB > 2 MB
    assert huge.status_code == 413 and huge.get_json()["error"]["code"] == "too_large"
    assert post_batch(client, []).get_json()["error"]["code"] == "missing_field"
    raw = client.post("/v1/models/demo-shapes/predict:batch", data=IMAGES[0], content_type="image/png")
    assert raw.status_code == 415
    unknown = post_batch(client, [(IMAGES[0], "a.png")], model="nope")
    assert unknown.status_code == 404 and unknown.get_json()["error"]["code"] == "unknown_model"


def test_a_model_without_batching_is_served_one_image_per_call(client: FlaskClient, backend: FakeBackend) -> None:
    body = post_batch(client, [(IMAGES[i], f"{i}.png") for i in range(3)], model="plain").get_json()
    assert body["failed"] == 0 and body["calls"] == 3
    (connection,) = backend.connections.values()
    assert connection.batches == [] and len(connection.seen) == 3


def test_when_no_image_could_be_served_the_request_fails_as_one(client: FlaskClient, backend: FakeBackend) -> None:
    backend.fail_next_spawns("demo-shapes")
    response = post_batch(client, [(IMAGES[0], "a.png"), (b"junk", "b.txt")])
    assert response.status_code == 502 and response.get_json()["error"]["code"] == "worker_start_failed"
    # The model backs off now: a whole-request 503 with Retry-After, which a client waits for.
    again = post_batch(client, [(IMAGES[0], "a.png")])
    assert again.status_code == 503 and int(again.headers["Retry-After"]) >= 1


def test_priority_comes_from_a_header_or_the_query_and_is_checked(client: FlaskClient) -> None:
    parts = [(IMAGES[0], "a.png")]
    assert post_batch(client, parts, query="?priority=batch").status_code == 200
    data = {"image": [(io.BytesIO(IMAGES[0]), "a.png")]}
    headed = client.post("/v1/models/demo-shapes/predict:batch", data=data, headers={"X-Wanwu-Priority": "batch"})
    assert headed.status_code == 200
    bad = post_batch(client, parts, query="?priority=urgent")
    assert bad.status_code == 400 and "interactive or batch" in bad.get_json()["error"]["message"]
    single = client.post(
        "/predict?priority=batch", data={"image": (io.BytesIO(IMAGES[0]), "a.png")}, content_type="multipart/form-data"
    )
    assert single.status_code == 200


def test_models_list_batching_and_the_gateway_limits(client: FlaskClient) -> None:
    body = client.get("/v1/models").get_json()
    by_name = {m["name"]: m for m in body["models"]}
    assert by_name["demo-shapes"]["batching"] == {"max_batch_size": 3, "max_wait_ms": 0}
    assert by_name["plain"]["batching"] is None
    assert body["limits"] == {"max_upload_mb": 1, "max_batch_images": 8, "max_batch_upload_mb": 2}


def test_batch_images_are_counted_by_outcome(client: FlaskClient) -> None:
    post_batch(client, [(IMAGES[0], "a.png"), (b"junk", "b.txt"), (IMAGES[1], "c.png")])
    text = client.get("/metrics").get_data(as_text=True)
    assert metric(text, 'wanwu_batch_images_total{model="demo-shapes",outcome="ok"}') == 2
    assert metric(text, 'wanwu_batch_images_total{model="demo-shapes",outcome="not_an_image"}') == 1
    assert metric(text, "wanwu_batches_total") == 0  # one caller per call here: nothing was combined


def test_a_batch_request_is_batch_priority_unless_it_asks_otherwise(
    app: Flask, client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = app.extensions["wanwu"].pool
    asked: list[str] = []
    real = pool.predict_batch

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(kwargs["priority"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pool, "predict_batch", recording)
    parts = [(IMAGES[0], "a.png"), (IMAGES[1], "b.png")]
    assert post_batch(client, parts).status_code == 200
    assert post_batch(client, parts, query="?priority=interactive").status_code == 200
    assert asked == ["batch", "interactive"]
