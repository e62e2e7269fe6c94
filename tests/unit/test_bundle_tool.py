"""``wanwu bundle create|check`` around a backend's bundle check (a FakeBackend here;
tests/integration/test_bundles.py checks in real worker containers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.bundles import CONTEXT_MB, REPORT, BundleCreateError, Spec, check, create
from tests.unit.fakes import FakeBackend


@pytest.fixture
def files(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    (source / "net.pt").write_bytes(b"\0" * (3 * 2**20))  # 3 MB of "weights": the checker is faked
    (source / "net.onnx").write_bytes(b"onnx")
    (source / "labels.txt").write_text("甲\n乙\n", encoding="utf-8")
    (source / "subsets.json").write_text(json.dumps({"一": ["甲"]}, ensure_ascii=False), encoding="utf-8")
    return source


def quiet(_: str) -> None:
    pass


def make(spec: Spec, out: Path, backend: FakeBackend, **kwargs: object) -> dict[str, object]:
    return create(spec, out, backend, None, progress=quiet, **kwargs)  # type: ignore[arg-type]


def test_create_writes_a_bundle_with_the_estimate_when_no_gpu_measured(files: Path, tmp_path: Path) -> None:
    backend = FakeBackend()
    out = tmp_path / "models" / "net"
    spec = Spec("net", files / "net.pt", files / "labels.txt", input_size=32, subsets=files / "subsets.json")
    make(spec, out, backend)
    config = json.loads((out / "model.json").read_text(encoding="utf-8"))
    assert config["format"] == "torchscript" and config["input_size"] == [3, 32, 32] and config["resize"] == 37
    assert config["gpu_memory_mb"] == CONTEXT_MB + 6 and config["subsets"] == {"一": ["甲"]}
    assert (out / "model.pt").read_bytes() == (files / "net.pt").read_bytes()
    report = json.loads((out / REPORT).read_text(encoding="utf-8"))
    assert "estimated without a GPU" in report["gpu_memory_mb_method"]
    ((checked, device),) = backend.checked
    assert checked.name.startswith(".net.partial-") and device is None  # checked before it was moved in place
    assert [p.name for p in out.parent.iterdir()] == ["net"]
    assert oct(out.stat().st_mode & 0o777) == "0o755"  # the worker's uid reads it


def test_a_measured_gpu_figure_and_the_vector_size_go_into_model_json(files: Path, tmp_path: Path) -> None:
    backend = FakeBackend()
    backend.check_reports.append(
        {"ok": True, "outputs": 48, "embedding_dim": 48, "gpu_memory_mb": 713, "gpu_memory_method": "peak reserved"}
    )
    out = tmp_path / "vec"
    make(Spec("vec", files / "net.onnx", None, task="embed", max_batch_size=8), out, backend)
    config = json.loads((out / "model.json").read_text(encoding="utf-8"))
    assert config["format"] == "onnx" and config["task"] == "embed" and "labels" not in config
    assert config["gpu_memory_mb"] == 713 and config["embedding_dim"] == 48
    assert config["batching"] == {"max_batch_size": 8, "max_wait_ms": 5.0}


def test_gpu_memory_given_by_hand_wins(files: Path, tmp_path: Path) -> None:
    backend = FakeBackend()
    backend.check_reports.append({"ok": True, "gpu_memory_mb": 713})
    out = tmp_path / "net"
    make(Spec("net", files / "net.pt", files / "labels.txt", gpu_memory_mb=2048), out, backend)
    assert json.loads((out / "model.json").read_text(encoding="utf-8"))["gpu_memory_mb"] == 2048


def test_a_failed_check_leaves_nothing_behind(files: Path, tmp_path: Path) -> None:
    backend = FakeBackend()
    message = "/model/labels.txt: has 2 labels but model.pt outputs 1000 classes"
    backend.check_reports.append({"ok": False, "error": {"code": "bad_bundle", "message": message}})
    with pytest.raises(BundleCreateError, match=r"has 2 labels but model\.pt outputs 1000"):
        make(Spec("net", files / "net.pt", files / "labels.txt"), tmp_path / "models" / "net", backend)
    assert list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "other"}, "must be named after the model"),
        ({"labels": None}, "needs --labels"),
        ({"model": "missing.pt"}, "missing.pt: model file is missing"),
        ({"model": "labels.txt"}, "cannot tell the format"),
        ({"task": "detect"}, "--task is 'detect'"),
        ({"precision": "int4"}, "--precision is 'int4'"),
        ({"subsets": "missing.json"}, "subsets file is missing"),
    ],
)
def test_bad_arguments_are_refused_before_any_check(
    files: Path, tmp_path: Path, change: dict[str, object], message: str
) -> None:
    values: dict[str, object] = {"name": "net", "model": files / "net.pt", "labels": files / "labels.txt"}
    values.update({k: files / v if k in ("model", "subsets") else v for k, v in change.items()})  # type: ignore[operator]
    backend = FakeBackend()
    with pytest.raises(BundleCreateError, match=message):
        make(Spec(**values), tmp_path / "net", backend)  # type: ignore[arg-type]
    assert backend.checked == [] and not (tmp_path / "net").exists()


def test_labels_and_subsets_are_validated_with_the_files_named(files: Path, tmp_path: Path) -> None:
    (files / "dupes.txt").write_text("甲\n甲\n", encoding="utf-8")
    with pytest.raises(BundleCreateError, match=r"dupes.txt: label '甲' on line 2 is a duplicate"):
        make(Spec("net", files / "net.pt", files / "dupes.txt"), tmp_path / "net", FakeBackend())
    (files / "subsets.json").write_text(json.dumps({"一": ["丙"]}, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(BundleCreateError, match="丙"):
        make(
            Spec("net", files / "net.pt", files / "labels.txt", subsets=files / "subsets.json"),
            tmp_path / "net",
            FakeBackend(),
        )


def test_an_existing_bundle_is_replaced_only_with_force(files: Path, tmp_path: Path) -> None:
    out = tmp_path / "net"
    spec = Spec("net", files / "net.pt", files / "labels.txt")
    make(spec, out, FakeBackend())
    with pytest.raises(BundleCreateError, match="--force"):
        make(spec, out, FakeBackend())
    make(spec, out, FakeBackend(), force=True)
    assert (out / "model.json").is_file()


def test_check_warns_when_the_estimate_is_below_what_was_measured(files: Path, tmp_path: Path) -> None:
    out = tmp_path / "net"
    make(Spec("net", files / "net.pt", files / "labels.txt", gpu_memory_mb=100), out, FakeBackend())
    backend = FakeBackend()
    backend.check_reports.append({"ok": True, "gpu_memory_mb": 900})
    report = check(out, backend, "0", progress=quiet)
    assert backend.checked == [(out, "0")]
    assert "gpu_memory_mb 100" in report["warnings"][0] and "900" in report["warnings"][0]


@pytest.mark.parametrize("name", [".hidden", "..", ""])
def test_a_name_that_is_not_a_plain_directory_name_is_refused(files: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(BundleCreateError, match="not a plain directory name"):
        make(Spec(name, files / "net.pt", files / "labels.txt"), tmp_path / "models" / "x", FakeBackend(), force=True)
    assert not (tmp_path / "models").exists()


def test_force_swaps_the_old_bundle_for_the_new_one_and_leaves_nothing_else(files: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "net"
    make(Spec("net", files / "net.pt", files / "labels.txt", input_size=32), out, FakeBackend())
    make(Spec("net", files / "net.pt", files / "labels.txt", input_size=48), out, FakeBackend(), force=True)
    assert json.loads((out / "model.json").read_text(encoding="utf-8"))["input_size"] == [3, 48, 48]
    assert [p.name for p in out.parent.iterdir()] == ["net"]


def test_an_onnx_models_external_weights_come_into_the_bundle(tmp_path: Path) -> None:
    import numpy
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(numpy.ones((3, 2), dtype="float32"), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [weights],
    )
    model = tmp_path / "net.onnx"
    onnx.save_model(
        helper.make_model(graph), str(model), save_as_external_data=True, location="net.weights", size_threshold=0
    )
    (tmp_path / "labels.txt").write_text("a\nb\n", encoding="utf-8")
    out = tmp_path / "models" / "net"
    make(Spec("net", model, tmp_path / "labels.txt"), out, FakeBackend())
    assert sorted(p.name for p in out.iterdir()) == [REPORT, "labels.txt", "model.json", "model.onnx", "net.weights"]
    assert (out / "net.weights").read_bytes() == (tmp_path / "net.weights").read_bytes()
    (tmp_path / "net.weights").unlink()
    with pytest.raises(BundleCreateError, match=r"weights file .*net\.weights is missing"):
        make(Spec("net", model, tmp_path / "labels.txt"), out, FakeBackend(), force=True)
