"""Real photographs through a real gateway and real worker containers serving the
general model (the default): cold from a new container, from a stem cell, warm, in
``predict:batch``, in ``wanwu backfill``, in JPEG, PNG and WebP, stored sideways with an
EXIF orientation, in English, and its embedding model.

Expected answers are written from what each photo shows (tests/photos/README.md), as
sets of ImageNet classes by their English names (the answers are Chinese; the bundle's
own translation maps them), never copied from the model's output; no score is asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
import requests

from tests.gatewayproc import ROOT, Gateway, running_gateway
from tests.photos import NAMES, as_format, photo, sideways

pytestmark = pytest.mark.docker

LABELS = ROOT / "worker_image" / "wanwu_worker" / "general"
ZH, EN = ((LABELS / f"labels_{lang}.txt").read_text(encoding="utf-8").splitlines() for lang in ("zh", "en"))
ENGLISH = dict(zip(ZH, EN, strict=True))
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
COFFEE = {"espresso", "cup", "coffee mug"}
# Photo: (classes a person would accept as its top-1, its group); see test_general_model.
EXPECTED: dict[str, tuple[set[str], str | None]] = {
    "chelsea.png": (CATS, "猫"),
    "coffee.png": (COFFEE, "食物"),
    "motorcycle_left.png": ({"moped", "motor scooter"}, "车辆"),
    "china.jpg": ({"palace", "monastery", "stupa", "bell cote", "castle", "dome"}, "建筑"),
    "flower.jpg": ({"daisy"}, "植物"),
    "rocket.jpg": ({"missile", "projectile", "space shuttle"}, None),
    "grace_hopper.jpg": (set(), "服装"),
}
TIMEOUT = 120  # a cold start of the real model on two busy cores


def settings(stem_cells: int) -> dict[str, str]:
    return {"max_workers": "2", "stem_cells": str(stem_cells), "queue_timeout_s": "120", "idle_ttl_s": "600"}


@pytest.fixture(scope="module")
def general(docker_client: docker.DockerClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """The default model, no stem cells: the first request starts a new container."""
    with running_gateway(tmp_path_factory.mktemp("general"), docker_client, **settings(0)) as gw:
        yield gw


def predict(gateway: Gateway, data: bytes, name: str = "photo", query: str = "") -> dict[str, object]:
    response = requests.post(f"{gateway.url}/predict{query}", files={"image": (name, data)}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def check(name: str, answer: dict[str, object]) -> None:
    """The answer shows what the photo shows: its top-1 class and top group."""
    classes, group = EXPECTED[name]
    assert answer["model"] == "general"
    if classes:
        assert ENGLISH[str(answer["result"])] in classes, f"{name}: {answer['predictions']}"
    if group is not None:
        groups = answer["groups"]
        assert isinstance(groups, list) and groups[0]["label"] == group, f"{name}: {groups}"


def test_cold_from_a_new_container_then_warm(general: Gateway) -> None:
    first = predict(general, photo("chelsea.png"), "chelsea.png")
    assert first["cold_start"] is True and first["start"] == "container"
    check("chelsea.png", first)
    assert isinstance(first["confident"], bool)
    second = predict(general, photo("coffee.png"), "coffee.png")
    assert second["cold_start"] is False and second["start"] == "warm"
    check("coffee.png", second)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_photo_gets_what_it_shows(general: Gateway, name: str) -> None:
    check(name, predict(general, photo(name), name))


def test_a_person_is_not_a_confident_answer(general: Gateway) -> None:
    """ImageNet-1k has no class for a person: the astronaut's answer says it is a guess."""
    assert predict(general, photo("astronaut.png"))["confident"] is False
    assert predict(general, photo("coffee.png"))["confident"] is True


@pytest.mark.parametrize("variant", ["JPEG", "PNG", "WEBP", "sideways-6", "sideways-8"])
def test_every_encoding_and_a_sideways_phone_photo(general: Gateway, variant: str) -> None:
    for name in ("chelsea.png", "motorcycle_left.png"):
        data = (
            sideways(photo(name), int(variant[-1]))
            if variant.startswith("sideways")
            else as_format(photo(name), variant)
        )
        check(name, predict(general, data, f"{name}.{variant.lower()}"))


def test_english_names_on_request(general: Gateway) -> None:
    answer = predict(general, photo("chelsea.png"), query="?lang=en")
    assert answer["result"] in CATS and answer["lang"] == "en"
    assert answer["groups"][0]["label"] == "cat"  # type: ignore[index]
    bad = requests.post(f"{general.url}/predict?lang=fr", files={"image": ("c.png", photo("chelsea.png"))}, timeout=30)
    assert bad.status_code == 400 and "zh, en" in bad.json()["error"]["message"]


def test_a_batch_of_photos_in_three_formats(general: Gateway) -> None:
    names = ["chelsea.png", "coffee.png", "motorcycle_left.png"]
    files = [("image", (f"{n}.{fmt}", as_format(photo(n), fmt))) for n in names for fmt in ("JPEG", "PNG", "WEBP")]
    files.insert(4, ("image", ("notes.txt", b"not an image")))
    response = requests.post(f"{general.url}/v1/models/general/predict:batch", files=files, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 10 and results[4]["error"]["code"] == "not_an_image"
    for entry in results[:4] + results[5:]:
        name = entry["file"].rsplit(".", 1)[0]
        check(name, {"model": "general", **entry})


def test_backfill_of_a_directory_of_photos(general: Gateway, tmp_path: Path) -> None:
    source = tmp_path / "photos"
    source.mkdir()
    for name in EXPECTED:
        (source / name).write_bytes(photo(name))
    (source / "phone.jpg").write_bytes(sideways(photo("chelsea.png"), 8))
    out = tmp_path / "results.jsonl"
    command = [sys.executable, "-m", "gateway.cli", "backfill", str(source), "--out", str(out), "--url", general.url]
    done = subprocess.run([*command, "--quiet"], cwd=ROOT, capture_output=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr.decode()
    lines = {line["file"]: line for line in map(json.loads, out.read_text(encoding="utf-8").splitlines())}
    assert set(lines) == {*EXPECTED, "phone.jpg"}
    for name in EXPECTED:
        top = lines[name]["predictions"][0]["label"]
        check(name, {"model": "general", "result": top, "groups": lines[name]["groups"]})
    check(
        "chelsea.png",
        {"model": "general", "result": lines["phone.jpg"]["predictions"][0]["label"], **lines["phone.jpg"]},
    )


def test_the_embedding_of_a_photo_is_nearest_to_itself_re_encoded(general: Gateway) -> None:
    def embed(data: bytes) -> list[float]:
        url = f"{general.url}/v1/models/general-embed/embed"
        response = requests.post(url, files={"image": ("p", data)}, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        vector: list[float] = response.json()["embedding"]
        assert len(vector) == 1280 and math.isclose(sum(v * v for v in vector), 1.0, rel_tol=1e-3)
        return vector

    vectors = {name: embed(photo(name)) for name in NAMES}
    for name in ("chelsea.png", "china.jpg"):
        query = embed(as_format(photo(name), "JPEG", quality=70))
        nearest = max(NAMES, key=lambda other: sum(a * b for a, b in zip(query, vectors[other], strict=True)))
        assert nearest == name


def test_a_stem_cell_becomes_the_general_model(docker_client: docker.DockerClient, tmp_path: Path) -> None:
    with running_gateway(tmp_path, docker_client, **settings(1)) as gateway:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            workers = requests.get(gateway.url + "/v1/pool", timeout=10).json()["workers"]
            if any(w["model"] == "(stem)" and w["state"] == "idle" for w in workers):
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"no stem cell was ready in {TIMEOUT} s")
        answer = predict(gateway, photo("chelsea.png"), "chelsea.png")
        assert answer["cold_start"] is True and answer["start"] == "stem"
        check("chelsea.png", answer)
        check("coffee.png", predict(gateway, photo("coffee.png"), "coffee.png"))


def _variants() -> dict[str, bytes]:
    """The cat as clients send it in odd shapes: every colour mode, animated, a 48 MP
    phone JPEG, and a strip 20000 pixels long."""
    import io

    from PIL import Image

    cat = Image.open(io.BytesIO(photo("chelsea.png"))).convert("RGB")

    def save(image: Image.Image, fmt: str, **params: object) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **params)
        return buffer.getvalue()

    frames = [cat, cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "greyscale.png": save(cat.convert("L"), "PNG"),
        "cmyk.jpg": save(cat.convert("CMYK"), "JPEG"),
        "16-bit.png": save(cat.convert("L").point(lambda v: v * 257, "I").convert("I;16"), "PNG"),
        "palette.png": save(cat.quantize(64), "PNG"),
        "animated.gif": save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "animated.webp": save(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
        "phone-48mp.jpg": save(cat.resize((8000, 6000)), "JPEG", quality=85),
        "strip.png": save(Image.new("RGB", (1, 20000), (120, 90, 60)), "PNG"),
    }


def test_odd_shapes_are_answered_and_no_worker_is_lost(general: Gateway) -> None:
    """Every colour mode, animation, a 48 MP phone JPEG and a 1x20000 strip get an answer
    (the cat is still a cat), and the worker that answered them is the one that answers
    next: none crashed and was replaced."""
    predict(general, photo("coffee.png"))  # a warm worker of the model
    before = {w["id"] for w in requests.get(general.url + "/v1/pool", timeout=10).json()["workers"]}
    for name, data in _variants().items():
        response = requests.post(f"{general.url}/predict", files={"image": (name, data)}, timeout=TIMEOUT)
        assert response.status_code == 200, (name, response.text)
        if name != "strip.png":  # the strip is a brown line: any answer will do
            assert response.json()["groups"][0]["label"] == "猫", (name, response.json()["groups"])
    check("coffee.png", predict(general, photo("coffee.png"), "coffee.png"))
    pool = requests.get(general.url + "/v1/pool", timeout=10).json()
    assert {w["id"] for w in pool["workers"]} == before
