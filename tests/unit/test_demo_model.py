"""The demo model's generator and trainer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from wanwu_worker.bundle import load_bundle
from wanwu_worker.demo import train as trainer
from wanwu_worker.demo.shapes import LABELS, samples
from wanwu_worker.preprocess import decode


def test_labels_are_exactly_the_design_labels() -> None:
    assert LABELS == ("红色圆形", "红色方形", "绿色圆形", "绿色方形", "蓝色圆形", "蓝色方形")


def test_a_seed_fixes_the_data_and_another_seed_changes_it() -> None:
    first, again, other = samples(11, 12), samples(11, 12), samples(12, 12)
    assert [s.data for s in first] == [s.data for s in again]
    assert [s.data for s in first] != [s.data for s in other]


def test_pictures_vary_in_size_format_and_class() -> None:
    batch = samples(5, 300)
    assert set(Counter(s.label for s in batch)) == set(range(6))
    assert {s.format for s in batch} == {"JPEG", "PNG"}
    sizes = {s.size for s in batch}
    assert len(sizes) > 100
    assert min(w for w, _ in sizes) < 64 < max(w for w, _ in sizes)
    for s in batch[:20]:
        assert decode(s.data).size == s.size


def test_tiny_training_run_writes_a_valid_bundle_that_beats_chance(tiny_bundle: Path) -> None:
    bundle = load_bundle(tiny_bundle)
    assert bundle.labels == LABELS and bundle.input_size == (3, 64, 64)
    report = json.loads((tiny_bundle / "train_report.json").read_text())
    assert report["samples"] == 600 and report["epochs"] == 2
    # Two epochs on 600 pictures are far from the shipped model, yet well above chance (1/6).
    assert report["eval_accuracy"] > 0.4


def test_trainer_refuses_a_check_that_is_not_held_out(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        trainer.main(["--out", str(tmp_path), "--seed", "1", "--eval-seed", "1"])


def test_trainer_fails_below_the_accuracy_floor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = trainer.main(
        [
            "--out",
            str(tmp_path / "m"),
            "--samples",
            "60",
            "--epochs",
            "1",
            "--eval-samples",
            "30",
            "--min-accuracy",
            "0.999",
        ]
    )
    assert status == 1
    assert "below 0.999" in capsys.readouterr().err
