"""Bundles in every format and task, made with ``wanwu bundle create`` (checked in a
one-shot worker container) and served by a pool of real containers.

The same network, the demo CNN, is written as TorchScript (the image's own bundle), as a
``torch.export`` program and as ONNX (``python -m wanwu_worker.demo.export``); each must
give the image's labels and scores. Its embedding model (the penultimate layer) is
served as TorchScript and as ONNX.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from click.testing import CliRunner
from wanwu_worker.bundle import load_bundle

from gateway.bundles import BundleCreateError, Spec, check, create
from gateway.cli import cli
from scheduler.assembly import build_backend
from scheduler.backends.docker_image import export_builtin_model
from scheduler.models import ModelCatalog
from scheduler.pool import WarmPool
from scheduler.settings import Settings
from tests.dockerutil import IMAGE
from tests.images import demo_images

pytestmark = pytest.mark.docker

DEMO = {"input_size": 64, "resize": 64, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def export(bundle: Path, fmt: str, out: Path) -> Path:
    """The demo network of ``bundle`` as a ``fmt`` file, the way an operator would make one."""
    command = [sys.executable, "-m", "wanwu_worker.demo.export", "--bundle", str(bundle), "--format", fmt]
    result = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def made(docker_client: docker.DockerClient) -> Iterator[tuple[Path, Settings, dict[str, dict[str, object]]]]:
    """A models directory with the demo in three formats and its embedding model in
    two, every bundle made by ``bundle create``; and each create's report."""
    root = Path(tempfile.mkdtemp(prefix="wanwu-formats-"))
    root.chmod(0o755)
    files = root / ".files"  # hidden: the catalog skips it
    files.mkdir()
    sockets = Path(tempfile.mkdtemp(prefix="wbf-", dir="/tmp"))
    settings = Settings(
        models_dir=root,
        socket_dir=sockets,
        pool_id="bf" + root.name[-6:].lower().replace("_", "x"),
        worker_image=IMAGE,
        max_workers=2,
        stem_cells=0,
        worker_memory="1g",
    )
    backend = build_backend(settings)
    try:
        demo = export_builtin_model(IMAGE, "demo-shapes", files)
        embed = export_builtin_model(IMAGE, "demo-shapes-embed", files)
        labels = demo / "labels.txt"
        models = {
            "demo-ts": (demo / "model.pt", "classify"),
            "demo-export": (export(demo, "export", files / "demo.pt2"), "classify"),
            "demo-onnx": (export(demo, "onnx", files / "demo.onnx"), "classify"),
            "embed-ts": (embed / "model.pt", "embed"),
            "embed-onnx": (export(embed, "onnx", files / "embed.onnx"), "embed"),
        }
        reports = {}
        for name, (model, task) in models.items():
            spec = Spec(
                name,
                model,
                labels if task == "classify" else None,
                task=task,
                max_batch_size=4,
                **DEMO,  # type: ignore[arg-type]
            )
            reports[name] = create(spec, root / name, backend, None, progress=lambda _: None)
        yield root, settings, reports
    finally:
        backend.close()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)


def test_bundle_create_records_what_the_worker_measured(made: tuple[Path, Settings, dict]) -> None:  # type: ignore[type-arg]
    root, _, reports = made
    for name in ("demo-ts", "demo-export", "demo-onnx"):
        report = reports[name]
        assert report["ok"] and report["outputs"] == 6 and report["labels"] == 6
        assert report["device"] == "cpu" and report["gpu_memory_mb"] is None  # no GPU here
        assert report["load_ms"] > 0 and report["first_ms"] > 0 and report["peak_rss_mb"] > 50
        config = json.loads((root / name / "model.json").read_text(encoding="utf-8"))
        assert config["format"] == {"demo-ts": "torchscript", "demo-export": "export", "demo-onnx": "onnx"}[name]
        assert config["gpu_memory_mb"] > 0  # the estimate, said to be one
        saved = json.loads((root / name / "bundle_report.json").read_text(encoding="utf-8"))
        assert "estimated without a GPU" in saved["gpu_memory_mb_method"]
    for name in ("embed-ts", "embed-onnx"):
        config = json.loads((root / name / "model.json").read_text(encoding="utf-8"))
        assert config["task"] == "embed" and config["embedding_dim"] == reports[name]["embedding_dim"] == 64


def test_every_format_gives_the_same_answers_through_real_containers(made: tuple[Path, Settings, dict]) -> None:  # type: ignore[type-arg]
    root, settings, _ = made
    # A worker per format: with two slots the three formats took turns, a cold start for
    # nearly every answer (the formats are what this compares, not eviction).
    settings = settings.replace(max_workers=3)
    pool = WarmPool(build_backend(settings), ModelCatalog(root), settings)
    pool.start()
    try:
        images = demo_images(seed=5)
        for label, data in images.items():
            answers = {name: pool.predict(name, data, top_k=6) for name in ("demo-ts", "demo-export", "demo-onnx")}
            reference = {p["label"]: p["score"] for p in answers["demo-ts"].predictions}
            assert answers["demo-ts"].predictions[0]["label"] == label
            for name, answer in answers.items():
                assert answer.predictions[0]["label"] == label, name
                for p in answer.predictions:
                    assert p["score"] == pytest.approx(reference[p["label"]], abs=1e-4), (name, p)
        # Batched calls answer as single ones, for every format.
        batch = list(images.values())[:4]
        for name in ("demo-export", "demo-onnx"):
            answer = pool.predict_batch(name, batch, top_k=1)
            assert [r["predictions"][0]["label"] for r in answer.results] == list(images)[:4]  # type: ignore[index]
    finally:
        pool.shutdown(grace_s=1)


def distance(a: list[float], b: list[float]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def test_embeddings_are_unit_vectors_closer_within_a_class_in_both_formats(made: tuple[Path, Settings, dict]) -> None:  # type: ignore[type-arg]
    root, settings, _ = made
    pool = WarmPool(build_backend(settings), ModelCatalog(root), settings)
    pool.start()
    try:
        first, second = demo_images(seed=7), demo_images(seed=8)  # two pictures of each class
        for name in ("embed-ts", "embed-onnx"):
            a = {label: pool.predict(name, data).embedding for label, data in first.items()}
            b = {label: pool.predict(name, data).embedding for label, data in second.items()}
            for vector in (*a.values(), *b.values()):
                assert vector is not None and len(vector) == 64
                assert math.fsum(v * v for v in vector) == pytest.approx(1.0, abs=1e-4)
            for label in first:
                same = distance(a[label], b[label])  # type: ignore[arg-type]
                others = [distance(a[label], b[other]) for other in second if other != label]  # type: ignore[arg-type]
                assert same < min(others), (name, label, same, min(others))
        ts = pool.predict("embed-ts", first["红色圆形"]).embedding
        onnx = pool.predict("embed-onnx", first["红色圆形"]).embedding
        assert distance(ts, onnx) < 1e-4  # type: ignore[arg-type]
    finally:
        pool.shutdown(grace_s=1)


def test_bundle_check_revalidates_and_flags_a_low_gpu_estimate(made: tuple[Path, Settings, dict]) -> None:  # type: ignore[type-arg]
    root, settings, _ = made
    backend = build_backend(settings)
    try:
        report = check(root / "demo-onnx", backend, None, progress=lambda _: None)
    finally:
        backend.close()
    assert report["ok"] and report["format"] == "onnx" and report["warnings"] == []
    result = CliRunner().invoke(cli, ["bundle", "check", str(root / "embed-onnx"), "--json"], env=_env(settings))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output[result.output.index("{") :])["embedding_dim"] == 64


def _env(settings: Settings) -> dict[str, str]:
    return {
        "WANWU_WORKER_IMAGE": settings.worker_image,
        "WANWU_POOL_ID": settings.pool_id,
        "WANWU_SOCKET_DIR": str(settings.socket_dir),
        "WANWU_GPUS": "",
        "WANWU_BACKEND": "docker",
    }


@pytest.fixture
def bad_files(made: tuple[Path, Settings, dict], tmp_path: Path) -> Path:  # type: ignore[type-arg]
    root = made[0]
    shutil.copy(root / "demo-ts" / "model.pt", tmp_path / "demo.pt")
    shutil.copy(root / "demo-onnx" / "model.onnx", tmp_path / "demo.onnx")
    (tmp_path / "three.txt").write_text("甲\n乙\n丙\n", encoding="utf-8")
    (tmp_path / "six.txt").write_text((root / "demo-ts" / "labels.txt").read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07not an onnx model")
    (tmp_path / "garbage.pt2").write_bytes(b"PK\x03\x04 not a zip")
    return tmp_path


@pytest.mark.parametrize(
    ("model", "labels", "expected"),
    [
        ("demo.pt", "three.txt", ["labels.txt", "3 labels", "6"]),
        ("demo.onnx", "three.txt", ["labels.txt", "3 labels", "6"]),
        ("garbage.onnx", "six.txt", ["model.onnx"]),
        ("garbage.pt2", "six.txt", ["model.pt2"]),
    ],
)
def test_bundle_create_refuses_a_model_that_does_not_fit_and_leaves_nothing(
    made: tuple[Path, Settings, dict],  # type: ignore[type-arg]
    bad_files: Path,
    tmp_path: Path,
    model: str,
    labels: str,
    expected: list[str],
) -> None:
    settings = made[1]
    out = tmp_path / "models" / "broken"
    result = CliRunner().invoke(
        cli,
        [
            *("bundle", "create", "broken", "--model", str(bad_files / model), "--labels", str(bad_files / labels)),
            *("--out", str(out), "--input-size", "64", "--resize", "64"),
        ],
        env=_env(settings),
    )
    assert result.exit_code == 1, result.output
    for part in expected:
        assert part in result.output, (part, result.output)
    assert not out.exists() and list((tmp_path / "models").iterdir()) == []  # no half-made bundle


def test_a_fixed_batch_onnx_model_with_batching_is_refused_with_the_fix(
    made: tuple[Path, Settings, dict],  # type: ignore[type-arg]
    tmp_path: Path,
) -> None:
    from wanwu_worker.demo.export import export_onnx
    from wanwu_worker.demo.train import build_model

    fixed = tmp_path / "fixed.onnx"
    export_onnx(build_model().eval(), (3, 64, 64), fixed, dynamic_batch=False)
    (tmp_path / "six.txt").write_text("\n".join("abcdef") + "\n", encoding="utf-8")
    backend = build_backend(made[1])
    try:
        with pytest.raises(BundleCreateError, match="dynamic batch"):
            spec = Spec("fixed", fixed, tmp_path / "six.txt", max_batch_size=8, **DEMO)  # type: ignore[arg-type]
            create(spec, tmp_path / "fixed", backend, None, progress=lambda _: None)
    finally:
        backend.close()
    assert not (tmp_path / "fixed").exists()


def test_bundle_create_pretrained_rebuilds_the_general_model_in_the_image(
    made: tuple[Path, Settings, dict],  # type: ignore[type-arg]
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`wanwu bundle create --pretrained` exports the general model in the worker image
    (a 128-pixel TorchScript variant here, the quickest), checks it, and leaves a bundle
    with the general model's labels, groups and translations, owned by the caller, at a
    relative --out; flags the build fixes are refused rather than ignored."""
    settings = made[1]
    monkeypatch.chdir(tmp_path)
    command = ["bundle", "create", "general-128", "--pretrained", "efficientnet-lite0", "--out", "models/general-128"]
    result = CliRunner().invoke(cli, [*command, "--input-size", "128", "--format", "torchscript"], env=_env(settings))
    assert result.exit_code == 0, result.output
    assert "1000 labels, output width 1000" in result.output
    bundle = load_bundle(tmp_path / "models" / "general-128")
    assert (bundle.name, bundle.format, bundle.input_size, bundle.resize) == (
        "general-128",
        "torchscript",
        (3, 128, 128),
        146,
    )
    assert bundle.groups["猫"] and bundle.translations["en"].groups["猫"] == "cat"
    report = json.loads((tmp_path / "models" / "general-128" / "bundle_report.json").read_text())
    assert report["ok"] and report["outputs"] == 1000
    assert all(path.stat().st_uid == os.getuid() for path in (tmp_path / "models").rglob("*"))
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["general-128"]  # nothing half-made beside it
    refused = CliRunner().invoke(cli, [*command, "--cpu-fallback", "--force"], env=_env(settings))
    assert refused.exit_code == 2 and "--cpu-fallback cannot be given with --pretrained" in refused.output
