"""What the gateway adds to a model with groups, translations and a confidence
threshold (the general model's model.json features), on a FakeBackend: groups pass
through to single and batch answers, ``?lang=`` translates labels and groups and is part
of the cache key, an unknown language is a 400 naming the model's, ``confident`` follows
the threshold, and groups are named subsets."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.app import create_app
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.pool import INLINE, WarmPool
from scheduler.settings import Settings
from tests.images import demo_images
from tests.unit.fakes import FakeBackend, FakeClock, make_bundle

LABELS = ("虎斑猫", "埃及猫", "意大利浓咖啡", "杯子", "雪橇")
ENGLISH = ("tabby", "Egyptian cat", "espresso", "cup", "bobsled")
GROUPS = {"猫": ["虎斑猫", "埃及猫"], "食物": ["意大利浓咖啡"], "厨房用品": ["杯子"]}
IMAGE = next(iter(demo_images(seed=5).values()))


def answer(top: float) -> dict[str, object]:
    """A worker's answer: tabby first with score ``top``, groups as a worker sums them."""
    rest = (1 - top) / 4
    predictions = [{"label": LABELS[0], "score": top}] + [{"label": label, "score": rest} for label in LABELS[1:]]
    return {
        "predictions": predictions,
        "groups": [
            {"label": "猫", "score": top + rest},
            {"label": "食物", "score": rest},
            {"label": "厨房用品", "score": rest},
        ],
    }


@pytest.fixture
def backend() -> FakeBackend:
    fake = FakeBackend()
    fake.answers["general"] = answer(0.9)
    fake.answers["unsure"] = answer(0.2)
    return fake


@pytest.fixture
def app(tmp_path: Path, backend: FakeBackend) -> Iterator[Flask]:
    for name in ("general", "unsure"):
        path = make_bundle(
            tmp_path,
            name,
            labels=LABELS,
            language="zh",
            groups=GROUPS,
            confidence_threshold=0.3,
            translations={
                "en": {"labels": "labels_en.txt", "groups": {"猫": "cat", "食物": "food", "厨房用品": "kitchenware"}}
            },
        )
        (path / "labels_en.txt").write_text("\n".join(ENGLISH) + "\n", encoding="utf-8")
    make_bundle(tmp_path, "plain")
    clock = FakeClock()
    settings = Settings(models_dir=tmp_path, max_workers=2, queue_timeout_s=2, stem_cells=0, default_model="general")
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


def post(client: FlaskClient, url: str = "/predict", images: tuple[bytes, ...] = (IMAGE,)):  # type: ignore[no-untyped-def]
    data = {"image": [(io.BytesIO(image), f"{i}.png") for i, image in enumerate(images)]}
    return client.post(url, data=data, content_type="multipart/form-data")


def test_an_answer_carries_groups_and_is_confident(client: FlaskClient) -> None:
    body = post(client).get_json()
    assert body["result"] == "虎斑猫" and body["model"] == "general"
    assert [g["label"] for g in body["groups"]] == ["猫", "食物", "厨房用品"]
    assert body["confident"] is True


def test_below_the_threshold_an_answer_is_not_confident(client: FlaskClient) -> None:
    body = post(client, "/v1/models/unsure/predict").get_json()
    assert body["confident"] is False and body["result"] == "虎斑猫"


def test_a_model_without_a_threshold_says_nothing_of_confidence(client: FlaskClient) -> None:
    body = post(client, "/v1/models/plain/predict").get_json()
    assert "confident" not in body and "groups" not in body


def test_lang_en_translates_labels_and_groups(client: FlaskClient) -> None:
    body = post(client, "/predict?lang=en&top_k=2").get_json()
    assert body["result"] == "tabby" and body["lang"] == "en"
    assert [p["label"] for p in body["predictions"]] == ["tabby", "Egyptian cat"]
    assert [g["label"] for g in body["groups"]] == ["cat", "food", "kitchenware"]
    again = post(client, "/predict?top_k=2").get_json()  # Chinese again: lang is in the cache key
    assert again["result"] == "虎斑猫" and "lang" not in again
    assert post(client, "/predict?lang=zh&top_k=2").get_json()["result"] == "虎斑猫"  # the model's own language


def test_a_cached_answer_keeps_its_language(client: FlaskClient) -> None:
    first = post(client, "/predict?lang=en").get_json()
    second = post(client, "/predict?lang=en").get_json()
    assert second["cached"] is True and second["result"] == first["result"] == "tabby"


def test_an_unknown_language_is_a_400_naming_the_models_languages(client: FlaskClient) -> None:
    response = post(client, "/predict?lang=fr")
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "bad_parameter" and "zh, en" in error["message"]
    plain = post(client, "/v1/models/plain/predict?lang=en")
    assert plain.status_code == 400 and "only its own labels" in plain.get_json()["error"]["message"]


def test_a_group_is_a_subset_and_an_unknown_one_names_the_groups(client: FlaskClient) -> None:
    body = post(client, "/predict?subset=猫").get_json()
    assert body["subset"] == "猫" and body["labels"] == ["虎斑猫", "埃及猫"]
    assert "confident" not in body  # renormalised over two labels, a score says nothing of confidence
    assert "confident" not in post(client, "/v1/models/unsure/predict?labels=杯子,雪橇").get_json()
    assert {p["label"] for p in body["predictions"]} <= {"虎斑猫", "埃及猫"}
    english = post(client, "/predict?subset=猫&lang=en").get_json()
    assert english["labels"] == ["tabby", "Egyptian cat"]
    response = post(client, "/predict?subset=鱼")
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error["code"] == "unknown_subset" and "猫" in error["message"] and "食物" in error["message"]


def test_batch_entries_carry_groups_confidence_and_language(client: FlaskClient) -> None:
    body = post(client, "/v1/models/general/predict:batch?lang=en", (IMAGE, b"not an image", IMAGE)).get_json()
    first, bad, third = body["results"]
    assert first["result"] == third["result"] == "tabby" and first["confident"] is True
    assert [g["label"] for g in first["groups"]][:1] == ["cat"]
    assert "error" in bad and "groups" not in bad
    assert body["lang"] == "en"


def test_the_model_list_shows_groups_languages_and_threshold(client: FlaskClient) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").get_json()["models"]}
    general = models["general"]
    assert general["groups"] == ["猫", "食物", "厨房用品"]
    assert general["languages"] == ["zh", "en"] and general["confidence_threshold"] == 0.3
    assert general["default"] is True and models["plain"]["languages"] == []
