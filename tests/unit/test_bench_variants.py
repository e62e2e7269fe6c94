"""The variants benchmark's fixed parts (tests/bench/variants.py): the evaluation set the
README states, the generated calibration images, and how agreement is counted."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from tests.bench.variants import QUICK_VIEWS, VIEWS, agreement, calibration_images, evaluation_set
from tests.photos import NAMES


def test_the_evaluation_set_is_eight_photos_times_21_views() -> None:
    assert len(VIEWS) == 21 and set(QUICK_VIEWS) <= set(VIEWS)
    images = evaluation_set(QUICK_VIEWS)
    assert len(images) == len(NAMES) * len(QUICK_VIEWS) == 48
    assert images == evaluation_set(QUICK_VIEWS)  # deterministic
    with Image.open(io.BytesIO(images[0])) as full, Image.open(io.BytesIO(images[4])) as half:
        assert full.format == "PNG" and half.size == (round(full.width / 2), round(full.height / 2))


def test_calibration_images_are_generated_deterministically() -> None:
    first, again = calibration_images(4, 64, seed=3), calibration_images(4, 64, seed=3)
    assert [i.tobytes() for i in first] == [i.tobytes() for i in again]
    assert all(i.size == (64, 64) and i.mode == "RGB" for i in first)
    assert first[0].tobytes() != calibration_images(1, 64, seed=4)[0].tobytes()
    assert all(float(np.asarray(i).std()) > 5 for i in first)  # not flat


def test_agreement_counts_top1_top5_and_confident_answers() -> None:
    reference = [[("a", 0.9), ("b", 0.05), ("c", 0.01), ("d", 0.01), ("e", 0.01)]] * 2 + [
        [("x", 0.2), ("y", 0.1), ("z", 0.1), ("w", 0.1), ("v", 0.1)]
    ]
    answers = [reference[0], [("b", 0.5), ("a", 0.4), ("c", 0.0), ("d", 0.0), ("f", 0.0)], reference[2]]
    got = agreement(reference, answers, threshold=0.3)
    assert got["top1_disagreements"] == 1 and got["top1_agreement"] == round(2 / 3, 4)
    assert got["top5_overlap"] == round((1 + 0.8 + 1) / 3, 4)
    assert (got["confident_images"], got["top1_agreement_confident"]) == (2, 0.5)
