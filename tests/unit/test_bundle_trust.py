"""A bundle is trusted no further than its own directory: its files are read as regular
files inside it (no link followed out, no FIFO or device, each within a cap), and a
bundle that breaks this is invalid with a reason naming the file relative to the bundle,
never a server path (the gateway shows the reason to HTTP clients)."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from wanwu_worker.bundle import MAX_LABELS_BYTES, MAX_METADATA_BYTES, MAX_MODEL_BYTES, load_bundle
from wanwu_worker.errors import BundleError

from gateway.bundles import BundleCreateError, check
from scheduler.models import ModelCatalog
from scheduler.settings import Settings
from tests.unit.fakes import FakeBackend, fake_gateway, make_bundle

CANARY = "canary-line-from-outside-the-bundle"
NOT_REGULAR = "bundle files must be regular files inside the bundle"


@pytest.fixture
def models(tmp_path: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    return directory


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    """A file outside every bundle, whose lines would be valid labels."""
    path = tmp_path / "secret.txt"
    path.write_text(f"{CANARY}\nanother-secret-line\n", encoding="utf-8")
    return path


def refused(directory: Path, timeout_s: float = 10.0, unblock: Callable[[], None] | None = None) -> str:
    """The BundleError message ``load_bundle(directory)`` raises, in a thread: a test of
    a FIFO or a device fails (rather than hangs) if the loader ever blocks on one."""
    outcome: list[BaseException | object] = []
    thread = threading.Thread(target=lambda: _capture(outcome, directory), daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        if unblock is not None:
            unblock()
        pytest.fail(f"load_bundle did not return within {timeout_s} s")
    (result,) = outcome
    assert isinstance(result, BundleError), f"expected a BundleError, got {result!r}"
    message = str(result)
    assert str(directory.parent) not in message  # no server path
    assert CANARY not in message
    return message


def _capture(outcome: list[BaseException | object], directory: Path) -> None:
    try:
        outcome.append(load_bundle(directory))
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        outcome.append(exc)


def relink(path: Path, target: Path | str) -> None:
    path.unlink()
    path.symlink_to(target)


def test_a_labels_link_to_a_file_outside_is_refused(models: Path, canary: Path) -> None:
    bundle = make_bundle(models, "m")
    relink(bundle / "labels.txt", canary)
    assert refused(bundle) == f"labels.txt: is a symbolic link; {NOT_REGULAR}"


def test_a_labels_link_within_the_bundle_is_refused_too(models: Path) -> None:
    bundle = make_bundle(models, "m")
    (bundle / "labels.txt").rename(bundle / "real.txt")
    (bundle / "labels.txt").symlink_to("real.txt")
    assert refused(bundle) == f"labels.txt: is a symbolic link; {NOT_REGULAR}"


def test_a_labels_link_to_the_process_environment_is_refused(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANWU_TEST_CANARY", CANARY)
    bundle = make_bundle(models, "m")
    relink(bundle / "labels.txt", "/proc/self/environ")
    assert refused(bundle) == f"labels.txt: is a symbolic link; {NOT_REGULAR}"


def test_a_labels_link_to_dev_zero_is_refused_at_once(models: Path) -> None:
    bundle = make_bundle(models, "m")
    relink(bundle / "labels.txt", "/dev/zero")
    assert refused(bundle) == f"labels.txt: is a symbolic link; {NOT_REGULAR}"


def test_a_labels_fifo_is_refused_without_blocking(models: Path) -> None:
    bundle = make_bundle(models, "m")
    fifo = bundle / "labels.txt"
    fifo.unlink()
    os.mkfifo(fifo)

    def unblock() -> None:  # a reader stuck in open() is let go by a writer coming and going
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    assert refused(bundle, unblock=unblock) == f"labels.txt: is a FIFO; {NOT_REGULAR}"


def test_a_model_json_link_is_refused(models: Path, tmp_path: Path) -> None:
    bundle = make_bundle(models, "m")
    outside = tmp_path / "model.json"
    shutil.copyfile(bundle / "model.json", outside)  # valid: only the link is wrong
    relink(bundle / "model.json", outside)
    assert refused(bundle) == f"model.json: is a symbolic link; {NOT_REGULAR}"


def test_a_translation_labels_link_is_refused(models: Path, canary: Path) -> None:
    bundle = make_bundle(models, "m", translations={"en": {"labels": "labels.en.txt"}})
    (bundle / "labels.en.txt").symlink_to(canary)  # two lines, as many as labels.txt
    assert refused(bundle) == f"labels.en.txt: is a symbolic link; {NOT_REGULAR}"


def test_a_model_file_link_to_outside_is_refused(models: Path, tmp_path: Path) -> None:
    bundle = make_bundle(models, "m")
    (tmp_path / "elsewhere.pt").write_bytes(b"")
    relink(bundle / "model.pt", tmp_path / "elsewhere.pt")
    assert refused(bundle) == f"model.pt: is a symbolic link; {NOT_REGULAR}"


def test_any_other_link_in_the_bundle_is_refused(models: Path, canary: Path) -> None:
    """ONNX external weights are opened by onnxruntime by their name in the model, which
    the loader does not read: no file of a bundle may be a link."""
    bundle = make_bundle(models, "m", format="onnx")
    (bundle / "model.pt").rename(bundle / "model.onnx")
    (bundle / "model.onnx.data").symlink_to(canary)
    assert refused(bundle) == f"model.onnx.data: is a symbolic link; {NOT_REGULAR}"


def test_an_oversize_labels_file_is_refused(models: Path) -> None:
    bundle = make_bundle(models, "m")
    os.truncate(bundle / "labels.txt", MAX_LABELS_BYTES + 1)  # sparse: nothing is written
    assert refused(bundle) == "labels.txt: labels file is over 64 MB"


def test_an_oversize_model_json_is_refused(models: Path) -> None:
    bundle = make_bundle(models, "m")
    with (bundle / "model.json").open("a", encoding="utf-8") as meta:
        meta.write(" " * MAX_METADATA_BYTES)  # still valid JSON
    assert refused(bundle) == "model.json: file is over 1 MB"


def test_an_oversize_model_file_is_refused(models: Path) -> None:
    bundle = make_bundle(models, "m")
    os.truncate(bundle / "model.pt", MAX_MODEL_BYTES + 1)  # sparse
    assert refused(bundle) == "model.pt: model file is over 8 GB"


def test_a_bundle_directory_that_is_a_link_is_the_operators_choice(models: Path, tmp_path: Path) -> None:
    make_bundle(tmp_path / "versions", "m")
    (models / "m").symlink_to(tmp_path / "versions" / "m", target_is_directory=True)
    assert load_bundle(models / "m").labels == ("a", "b")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: (b / "model.json").write_text('{"name": "m"}', encoding="utf-8"), "model.json: field 'format'"),
        (lambda b: (b / "labels.txt").write_text("a\na\n", encoding="utf-8"), "labels.txt: label 'a' on line 2"),
        (lambda b: (b / "model.pt").unlink(), "model.pt: missing (model.json 'format' is torchscript)"),
    ],
)
def test_messages_name_files_relative_to_the_bundle(
    models: Path, change: Callable[[Path], object], message: str
) -> None:
    bundle = make_bundle(models, "m")
    change(bundle)
    assert refused(bundle).startswith(message)


def test_the_catalog_lists_a_bundle_with_a_link_out_as_invalid(models: Path, canary: Path) -> None:
    make_bundle(models, "good")
    relink(make_bundle(models, "bad") / "labels.txt", canary)
    relink(make_bundle(models, "meta") / "model.json", canary)  # listed, not skipped as "no bundle"
    catalog = ModelCatalog(models)
    assert [m.name for m in catalog.all()] == ["good"]
    assert catalog.problems == {
        "bad": f"labels.txt: is a symbolic link; {NOT_REGULAR}",
        "meta": f"model.json: is a symbolic link; {NOT_REGULAR}",
    }


def test_get_v1_models_shows_neither_the_canary_nor_a_path(models: Path, canary: Path) -> None:
    make_bundle(models, "good")
    relink(make_bundle(models, "bad") / "labels.txt", canary)
    settings = Settings(models_dir=models, max_workers=1, stem_cells=0, default_model="good")
    with fake_gateway(FakeBackend(), settings) as app:
        response = app.test_client().get("/v1/models")
    body = response.get_data(as_text=True)
    assert response.status_code == 200 and CANARY not in body and str(models) not in body
    assert json.loads(body)["invalid"] == {"bad": f"labels.txt: is a symbolic link; {NOT_REGULAR}"}


def test_bundle_check_refuses_a_link_out_before_the_worker_sees_it(models: Path, canary: Path) -> None:
    bundle = make_bundle(models, "bad")
    relink(bundle / "labels.txt", canary)
    backend = FakeBackend()
    with pytest.raises(BundleCreateError) as caught:
        check(bundle, backend, None, progress=lambda _: None)
    assert str(caught.value) == f"{bundle}/labels.txt: is a symbolic link; {NOT_REGULAR}"  # the CLI names the directory
    assert backend.checked == []


def test_the_worker_checks_the_model_file_again_before_loading_it(tiny_bundle: Path, tmp_path: Path) -> None:
    """A model file swapped for a link after ``load_bundle`` is not followed by the load."""
    import torch
    from wanwu_worker.runtimes import load_model

    copy = tmp_path / "demo-shapes"
    shutil.copytree(tiny_bundle, copy)
    bundle = load_bundle(copy)
    (copy / "model.pt").rename(tmp_path / "outside.pt")  # a loadable model, outside the bundle
    (copy / "model.pt").symlink_to(tmp_path / "outside.pt")
    with pytest.raises(BundleError, match=rf"^model\.pt: is a symbolic link; {NOT_REGULAR}$"):
        load_model(bundle, torch.device("cpu"), torch.float32)


def test_a_fifo_or_link_in_a_subdirectory_makes_the_bundle_invalid(tmp_path: Path) -> None:
    """Subdirectories are held to the same rules as the top level (ONNX external weights
    may be read from one)."""
    fifo = make_bundle(tmp_path, "fifo")
    (fifo / "d").mkdir()
    os.mkfifo(fifo / "d" / "w.bin")
    linked = make_bundle(tmp_path, "linked")
    (linked / "d").mkdir()
    (linked / "d" / "w.bin").symlink_to("/etc/hostname")
    for bundle in (fifo, linked):
        with pytest.raises(BundleError, match=r"^d/w\.bin: is a (FIFO|symbolic link); bundle files must be regular"):
            load_bundle(bundle)
