"""Label subsets and embeddings through the HTTP API, with the pool on a FakeBackend
(the fake worker's raw scores are ``fake_logit``; models named embed* answer vectors)."""

from __future__ import annotations

import base64
import io
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from wanwu_worker.bundle import labels_digest

from scheduler.scoring import subset_predictions
from scheduler.settings import Settings
from scheduler.worker_client import Scores
from tests.images import demo_images
from tests.unit.fakes import FakeBackend, fake_gateway, fake_logit, make_bundle

LABELS = ("红色圆形", "红色方形", "绿色圆形", "绿色方形", "蓝色圆形", "蓝色方形")
FRUIT = ["红色圆形", "绿色圆形"]


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def app(tmp_path: Path, backend: FakeBackend) -> Iterator[Flask]:
    make_bundle(tmp_path, "shapes", labels=LABELS, subsets={"圆形": FRUIT})
    make_bundle(tmp_path, "batched", labels=LABELS, batching={"max_batch_size": 4, "max_wait_ms": 0})
    make_bundle(tmp_path, "embedder", task="embed", embedding_dim=3)
    settings = Settings(models_dir=tmp_path, max_workers=2, queue_timeout_s=2, stem_cells=0)
    with fake_gateway(backend, settings) as app:
        yield app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


IMAGE = next(iter(demo_images(seed=3).values()))


def post(client: FlaskClient, url: str, count: int = 1):  # type: ignore[no-untyped-def]
    files = [(io.BytesIO(IMAGE), f"{i}.png") for i in range(count)]
    return client.post(url, data={"image": files if count > 1 else files[0]}, content_type="multipart/form-data")


def reference(subset: list[str]) -> list[tuple[str, float]]:
    """A softmax over the subset's raw scores, best first."""
    weights = {label: math.exp(fake_logit(label)) for label in subset}
    total = sum(weights.values())
    return sorted(((label, w / total) for label, w in weights.items()), key=lambda item: -item[1])


def scored(predictions: list[dict[str, object]]) -> list[tuple[str, float]]:
    return [(str(p["label"]), float(p["score"])) for p in predictions]  # type: ignore[arg-type]


def same(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> bool:
    """The same labels in the same order, with scores within 1e-6."""
    return [label for label, _ in got] == [label for label, _ in expected] and all(
        abs(a - b) <= 1e-6 for (_, a), (_, b) in zip(got, expected, strict=True)
    )


def test_labels_are_scored_over_the_subset_and_renormalised(client: FlaskClient, backend: FakeBackend) -> None:
    subset = ["蓝色方形", "红色圆形", "绿色方形"]
    response = post(client, f"/v1/models/shapes/predict?labels={','.join(subset)}&top_k=3")
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert same(scored(body["predictions"]), reference(subset))
    assert sum(score for _, score in scored(body["predictions"])) == pytest.approx(1.0, abs=1e-5)
    assert body["labels"] == subset and body["result"] == body["predictions"][0]["label"]
    assert "logits" not in body
    (connection,) = backend.connections.values()
    # The worker was asked for exactly those raw scores, by column, and ranks nothing itself.
    asked = ("红色圆形", "绿色方形", "蓝色方形")  # by column: 0, 3, 5
    assert connection.scores[-1] == Scores((), (0, 3, 5), len(LABELS), asked, labels_digest(asked))


def test_repeated_label_parameters_and_a_named_subset(client: FlaskClient) -> None:
    one = post(client, "/v1/models/shapes/predict?label=红色圆形&label=绿色圆形").get_json()
    named = post(client, "/v1/models/shapes/predict?subset=圆形").get_json()
    assert named["subset"] == "圆形" and named["labels"] == FRUIT and "subset" not in one
    assert scored(one["predictions"]) == scored(named["predictions"])
    assert same(scored(one["predictions"]), reference(FRUIT))


def test_an_unknown_label_or_subset_is_a_400_that_names_it(client: FlaskClient, backend: FakeBackend) -> None:
    response = post(client, "/v1/models/shapes/predict?labels=红色圆形,紫色星形")
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "unknown_label" and "紫色星形" in error["message"]
    response = post(client, "/v1/models/shapes/predict?subset=水果")
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "unknown_subset" and "水果" in error["message"] and "圆形" in error["message"]
    both = post(client, "/v1/models/shapes/predict?subset=圆形&labels=红色圆形")
    assert both.status_code == 400 and both.get_json()["error"]["code"] == "bad_parameter"
    too_many = post(client, "/v1/models/shapes/predict?labels=红色圆形,绿色圆形&top_k=3")
    assert too_many.status_code == 400 and "top_k" in too_many.get_json()["error"]["message"]
    assert backend.spawns == []  # nothing reached a worker


def test_the_cache_keeps_subsets_apart(client: FlaskClient) -> None:
    full = post(client, "/v1/models/shapes/predict").get_json()
    subset = post(client, "/v1/models/shapes/predict?subset=圆形").get_json()
    again = post(client, "/v1/models/shapes/predict?subset=圆形").get_json()
    assert subset["cached"] is False and again["cached"] is True
    assert scored(again["predictions"]) == scored(subset["predictions"]) != scored(full["predictions"])


def test_batched_requests_with_different_subsets_share_a_call_and_get_their_own_scores() -> None:
    # Two members of one worker call: the call asks for both subsets' raw scores.
    asked = ("红色圆形", "绿色圆形", "蓝色方形")
    logits = [fake_logit(label) for label in asked]
    first = subset_predictions(logits, asked, ("红色圆形", "绿色圆形"), 2)
    second = subset_predictions(logits, asked, ("蓝色方形", "红色圆形"), 1)
    assert same(scored(first), reference(["红色圆形", "绿色圆形"]))
    assert same(scored(second), reference(["蓝色方形", "红色圆形"])[:1])


def test_subset_scores_do_not_underflow_for_very_unlikely_labels() -> None:
    asked = ("a", "b")
    predictions = subset_predictions([-2000.0, -2001.0], asked, asked, 2)
    assert same(scored(predictions), [("a", 1 / (1 + math.exp(-1))), ("b", 1 / (1 + math.e))])


def test_predict_batch_takes_a_subset(client: FlaskClient) -> None:
    response = post(client, "/v1/models/batched/predict:batch?labels=蓝色圆形,绿色方形&top_k=1", count=3)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    for entry in body["results"]:
        assert same(scored(entry["predictions"]), reference(["蓝色圆形", "绿色方形"])[:1])
        assert "logits" not in entry


def test_embed_answers_a_unit_vector_as_json_or_base64(client: FlaskClient) -> None:
    plain = post(client, "/v1/models/embedder/embed")
    assert plain.status_code == 200, plain.get_json()
    body = plain.get_json()
    assert body["dim"] == 3 == len(body["embedding"]) and body["encoding"] == "json"
    assert math.fsum(v * v for v in body["embedding"]) == pytest.approx(1.0, abs=1e-6)
    packed = post(client, "/v1/models/embedder/embed?encoding=base64").get_json()
    assert packed["encoding"] == "base64" and packed["cached"] is True  # the same vector, cached
    decoded = struct.unpack("<3f", base64.b64decode(packed["embedding"]))
    assert decoded == pytest.approx(body["embedding"], abs=1e-6)


def test_embed_batch_answers_one_vector_per_image(client: FlaskClient) -> None:
    response = post(client, "/v1/models/embedder/embed:batch", count=3)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["count"] == 3 and body["failed"] == 0
    assert all(len(entry["embedding"]) == entry["dim"] == 3 for entry in body["results"])


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("/v1/models/embedder/predict", "/v1/models/embedder/embed"),
        ("/v1/models/shapes/embed", "/v1/models/shapes/predict"),
        ("/v1/models/embedder/predict:batch", "/v1/models/embedder/embed"),
    ],
)
def test_the_wrong_route_for_a_task_says_which_one_to_use(client: FlaskClient, url: str, hint: str) -> None:
    response = post(client, url)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "wrong_task" and hint in error["message"]


def test_a_bad_encoding_or_a_classify_parameter_on_embed_is_a_400(client: FlaskClient) -> None:
    response = post(client, "/v1/models/embedder/embed?encoding=hex")
    assert response.status_code == 400 and "encoding" in response.get_json()["error"]["message"]
    response = post(client, "/v1/models/embedder/embed?top_k=3&labels=a")
    assert response.status_code == 400 and "top_k, labels" in response.get_json()["error"]["message"]


def test_top_k_over_all_labels_stops_at_what_a_worker_ranks(tmp_path: Path) -> None:
    from tests.unit.fakes import make_bundle as bundle

    bundle(tmp_path, "many", labels=tuple(f"l{i}" for i in range(1500)))
    settings = Settings(models_dir=tmp_path, max_workers=1, stem_cells=0)
    with fake_gateway(FakeBackend(), settings) as app:
        client = app.test_client()
        over = post(client, "/v1/models/many/predict?top_k=1001")
        assert over.status_code == 400 and "1 to 1000" in over.get_json()["error"]["message"]
        subset = ",".join(f"l{i}" for i in range(1100))
        many = post(client, f"/v1/models/many/predict?top_k=1050&labels={subset}")
        assert many.status_code == 200 and len(many.get_json()["predictions"]) == 1050


def test_models_lists_task_subsets_and_fallback(client: FlaskClient) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").get_json()["models"]}
    assert models["shapes"]["task"] == "classify" and models["shapes"]["subsets"] == {"圆形": FRUIT}
    assert models["embedder"]["task"] == "embed" and models["embedder"]["embedding_dim"] == 3
    assert models["shapes"]["cpu_fallback"] is False and models["shapes"]["format"] == "torchscript"


def test_raw_scores_of_other_labels_fail_loudly_rather_than_mislabel(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker still running a replaced bundle answers scores of other labels: its
    digest differs from the catalog's, and the request fails rather than mislabel."""
    from tests.unit import fakes

    real = fakes.fake_scores
    monkeypatch.setattr(fakes, "fake_scores", lambda scores: {**real(scores), "logits_of": "0" * 16} if scores else {})
    response = post(client, "/v1/models/shapes/predict?subset=圆形")
    assert response.status_code == 502 and response.get_json()["error"]["code"] == "worker_failed"
    assert any("bundle differs" in r.getMessage() for r in caplog.records)  # the operator learns why
    assert post(client, "/v1/models/shapes/predict").status_code == 200  # scoring over all labels is unaffected
