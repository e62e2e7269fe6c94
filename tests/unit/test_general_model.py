"""The general model (EfficientNet-Lite0 on ImageNet-1k) in process: real photographs
get the class and group they show, in Chinese; groups add up their members; the embed
bundle is the classifier's own features; the bundle carries its translations.

Expected answers are written from what each photo shows (tests/photos/README.md), as
sets of ImageNet classes by their English names, never copied from the model's output,
and no score is asserted."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image
from wanwu_worker.bundle import load_bundle
from wanwu_worker.general import build, network
from wanwu_worker.predictor import Predictor
from wanwu_worker.runtimes import load_model

from tests.photos import NAMES, as_format, photo, sideways

CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
# Each photo: the classes a person would accept as its top-1, and its group (None where
# the photo's subject is in no group, or ImageNet has no class for it).
EXPECTED: dict[str, tuple[set[str], str | None]] = {
    "chelsea.png": (CATS, "猫"),
    "coffee.png": ({"espresso", "cup", "coffee mug"}, "食物"),
    "motorcycle_left.png": ({"moped", "motor scooter"}, "车辆"),
    "china.jpg": ({"palace", "monastery", "stupa", "bell cote", "castle", "dome"}, "建筑"),
    "flower.jpg": ({"daisy"}, "植物"),
    "rocket.jpg": ({"missile", "projectile", "space shuttle"}, None),
    # Grace Hopper in uniform and cap: whatever the garment's class, it is clothing.
    "grace_hopper.jpg": (set(), "服装"),
}


@pytest.fixture(scope="module")
def classifier(general_bundles: tuple[Path, Path]) -> Predictor:
    return Predictor(load_bundle(general_bundles[0]), device="cpu", threads=1)


@pytest.fixture(scope="module")
def embedder(general_bundles: tuple[Path, Path]) -> Predictor:
    return Predictor(load_bundle(general_bundles[1]), device="cpu", threads=1)


@pytest.fixture(scope="module")
def english(general_bundles: tuple[Path, Path]) -> dict[str, str]:
    """Chinese label to English label."""
    bundle = load_bundle(general_bundles[0])
    return dict(zip(bundle.labels, bundle.translations["en"].labels, strict=True))


def test_the_weights_fit_the_network_exactly() -> None:
    net = network.load(str(build.weights_path()))  # strict: every key and shape
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(4.65e6, rel=0.01)


def test_the_bundle_describes_the_model(general_bundles: tuple[Path, Path]) -> None:
    bundle = load_bundle(general_bundles[0])
    assert (bundle.name, bundle.task, len(bundle.labels), bundle.language) == ("general", "classify", 1000, "zh")
    assert bundle.labels[151] == "奇瓦瓦" and bundle.translations["en"].labels[151] == "Chihuahua"
    assert set(bundle.groups["狗"]) == set(bundle.labels[151:269])
    assert bundle.translations["en"].groups["狗"] == "dog"
    assert bundle.subsets["猫"] == bundle.groups["猫"]  # every group is a subset too
    grouped = sum(len(members) for members in bundle.groups.values())
    assert grouped >= 850
    embed = load_bundle(general_bundles[1])
    assert (embed.task, embed.embedding_dim) == ("embed", 1280)
    report = (general_bundles[0] / "build_report.json").read_text()
    assert build.weights_path().name in (general_bundles[0] / "README.md").read_text() and "sha256" in report


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_photo_gets_the_class_and_group_it_shows(name: str, classifier: Predictor, english: dict[str, str]) -> None:
    classes, group = EXPECTED[name]
    answer = classifier.predict(photo(name), 5).result
    top = english[answer["predictions"][0]["label"]]
    if classes:
        assert top in classes, f"{name}: {top}"
    if group is not None:
        assert answer["groups"][0]["label"] == group, f"{name}: {answer['groups']}"


@pytest.mark.parametrize("variant", ["JPEG", "PNG", "WEBP", "sideways-6", "sideways-8"])
def test_the_cat_in_every_encoding_and_orientation(
    variant: str, classifier: Predictor, english: dict[str, str]
) -> None:
    original = photo("chelsea.png")
    data = sideways(original, int(variant[-1])) if variant.startswith("sideways") else as_format(original, variant)
    answer = classifier.predict(data, 3).result
    assert english[answer["predictions"][0]["label"]] in CATS
    assert answer["groups"][0]["label"] == "猫"


def test_a_sideways_photo_is_turned_upright(classifier: Predictor) -> None:
    """The model sees the same pixels from a phone's sideways JPEG as from the upright
    one: the class ranking is the same (JPEG's loss aside, the same top three)."""
    upright = as_format(photo("motorcycle_left.png"), "JPEG")
    turned = sideways(photo("motorcycle_left.png"), 6)
    ranks = [[p["label"] for p in classifier.predict(data, 3).result["predictions"]] for data in (upright, turned)]
    assert ranks[0] == ranks[1]


def test_group_scores_are_the_sums_of_their_members(classifier: Predictor, general_bundles: tuple[Path, Path]) -> None:
    bundle = load_bundle(general_bundles[0])
    answer = classifier.predict(photo("coffee.png"), 1000).result
    probability = {p["label"]: p["score"] for p in answer["predictions"]}
    for group in answer["groups"]:
        total = sum(probability[label] for label in bundle.groups[group["label"]])
        assert group["score"] == pytest.approx(total, abs=1e-4)
    scores = [g["score"] for g in answer["groups"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)


def test_a_batch_answers_groups_per_image(classifier: Predictor) -> None:
    images = [photo("chelsea.png"), b"not an image", photo("coffee.png")]
    results = classifier.predict_batch(images, 2).results
    assert results[0]["groups"][0]["label"] == "猫"
    assert "error" in results[1]
    assert results[2]["groups"][0]["label"] == "食物"


def test_the_classifier_on_the_embedding_gives_the_classifiers_top1(general_bundles: tuple[Path, Path]) -> None:
    classify, embed = (load_bundle(path) for path in general_bundles)
    cpu = torch.device("cpu")
    classifier_model = load_model(classify, cpu, torch.float32)
    features_model = load_model(embed, cpu, torch.float32)
    fc = network.load(str(build.weights_path()))._fc
    from wanwu_worker.preprocess import decode, resize_and_crop, to_tensor

    for name in NAMES:
        image = resize_and_crop(decode(photo(name)), classify.resize, classify.crop)
        batch = to_tensor(image, classify.mean, classify.std).unsqueeze(0)
        with torch.inference_mode():
            expected = classifier_model(batch).argmax(1)
            via_embedding = fc(features_model(batch)).argmax(1)
        assert int(via_embedding) == int(expected), name


def test_a_photos_embedding_is_nearest_to_itself_resized_and_reencoded(embedder: Predictor) -> None:
    vectors = {name: torch.tensor(embedder.predict(photo(name)).result["embedding"]) for name in NAMES}
    for name in NAMES:
        with Image.open(io.BytesIO(photo(name))) as image:
            smaller = image.convert("RGB").resize((image.width * 2 // 3, image.height * 2 // 3))
        buffer = io.BytesIO()
        smaller.save(buffer, "JPEG", quality=80)
        query = torch.tensor(embedder.predict(buffer.getvalue()).result["embedding"])
        nearest = max(NAMES, key=lambda other: float(query @ vectors[other]))
        assert nearest == name


def test_a_person_is_not_a_confident_answer(general_bundles: tuple[Path, Path], classifier: Predictor) -> None:
    """ImageNet-1k has no class for a person: the astronaut's answer is a guess, and the
    bundle's threshold says so."""
    threshold = load_bundle(general_bundles[0]).confidence_threshold
    assert threshold is not None
    top = classifier.predict(photo("astronaut.png"), 1).result["predictions"][0]
    assert top["score"] < threshold
    assert classifier.predict(photo("coffee.png"), 1).result["predictions"][0]["score"] >= threshold
