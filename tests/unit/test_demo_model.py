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


def test_the_embed_bundle_is_the_classifier_without_its_last_layer(tiny_bundle: Path) -> None:
    import torch
    from wanwu_worker.demo.export import rebuild

    classify = load_bundle(tiny_bundle)
    embed = load_bundle(tiny_bundle.parent / trainer.EMBED_NAME)
    assert (embed.name, embed.task, embed.format, embed.labels) == ("demo-shapes-embed", "embed", "torchscript", ())
    assert embed.embedding_dim == 64 and embed.gpu_memory_mb == 256
    assert (embed.input_size, embed.resize, embed.mean, embed.std, embed.batching) == (
        classify.input_size,
        classify.resize,
        classify.mean,
        classify.std,
        classify.batching,
    )
    network, _ = rebuild(tiny_bundle)
    pooled, _ = rebuild(embed.path)
    x = torch.randn(3, *classify.input_size)
    with torch.inference_mode():
        features = torch.jit.load(str(embed.model_file))(x)
        assert features.shape == (3, 64)
        assert torch.allclose(pooled(x), features, atol=1e-5)
        assert torch.allclose(network[-1](features), torch.jit.load(str(classify.model_file))(x), atol=1e-5)


def test_export_writes_the_same_network_as_a_torch_export_program(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from wanwu_worker.demo import export
    from wanwu_worker.predictor import Predictor

    from tests.images import demo_images

    copy = tmp_path / "demo-shapes"
    shutil.copytree(tiny_bundle, copy)
    assert export.main(["--bundle", str(tiny_bundle), "--format", "export", "--out", str(copy / "model.pt2")]) == 0
    config = json.loads((copy / "model.json").read_text(encoding="utf-8"))
    (copy / "model.json").write_text(json.dumps({**config, "format": "export"}), encoding="utf-8")
    scripted = Predictor(load_bundle(tiny_bundle), device="cpu")
    exported = Predictor(load_bundle(copy), device="cpu")
    for data in list(demo_images().values())[:3]:
        want, got = scripted.predict(data, 6).predictions, exported.predict(data, 6).predictions
        assert [p["label"] for p in got] == [p["label"] for p in want]
        assert [p["score"] for p in got] == pytest.approx([p["score"] for p in want], abs=1e-4)
