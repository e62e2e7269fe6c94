"""Model bundle validation: every problem names the file and the field."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from wanwu_worker.bundle import Batching, load_bundle
from wanwu_worker.errors import BundleError


@pytest.fixture
def bundle_dir(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    return copy


def edit_json(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    meta = directory / "model.json"
    config = json.loads(meta.read_text(encoding="utf-8"))
    change(config)
    meta.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def test_valid_bundle_loads(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert bundle.name == "demo-shapes"
    assert bundle.input_size == (3, 64, 64)
    assert bundle.labels == ("红色圆形", "红色方形", "绿色圆形", "绿色方形", "蓝色圆形", "蓝色方形")
    assert bundle.precision == "fp32"
    assert bundle.idle_ttl_s is None
    assert bundle.batching == Batching(max_batch_size=16, max_wait_ms=2.0)  # the demo trainer writes it


def test_missing_model_json(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"model\.json: missing"):
        load_bundle(tmp_path)


def test_bad_json_names_file(bundle_dir: Path) -> None:
    (bundle_dir / "model.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(BundleError, match=r"model\.json: not valid JSON"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("format", "tflite", r"'format' is 'tflite'; expected one of torchscript, export, onnx"),
        ("task", "detect", r"'task' is 'detect'; expected one of classify, embed"),
        ("precision", "int4", r"'precision' is 'int4'; expected one of fp32, fp16"),
        ("input_size", [3, 64], r"'input_size' .* list of 3"),
        ("input_size", [1, 64, 64], r"'input_size' has 1 channels"),
        ("resize", 0, r"'resize' is 0; expected a positive integer"),
        ("resize", 32, r"'resize' is 32; must be at least"),
        ("crop", [32, 32], r"'crop' .* must equal input_size"),
        ("mean", [0.5, 0.5], r"'mean' .* list of 3 numbers"),
        ("std", [0.5, 0, 0.5], r"'std' .* positive numbers"),
        ("gpu_memory_mb", -1, r"'gpu_memory_mb' is -1"),
        ("idle_ttl_s", -5, r"'idle_ttl_s' is -5"),
        ("idle_ttl_s", 1e10, r"'idle_ttl_s' is 10000000000\.0; expected seconds above 0, at most 604800"),
        ("batching", {"max_batch_size": 0}, r"'batching.max_batch_size' is 0"),
        ("labels", "../etc/passwd", r"'labels' .* inside the bundle"),
        ("name", "", r"'name' is ''"),
    ],
)
def test_bad_field_is_named(bundle_dir: Path, field: str, value: object, message: str) -> None:
    edit_json(bundle_dir, lambda c: c.__setitem__(field, value))
    with pytest.raises(BundleError, match=message) as caught:
        load_bundle(bundle_dir)
    assert "model.json" in str(caught.value)


@pytest.mark.parametrize("field", ["name", "format", "task", "input_size", "resize", "mean", "std"])
def test_missing_field_is_named(bundle_dir: Path, field: str) -> None:
    edit_json(bundle_dir, lambda c: c.pop(field))
    with pytest.raises(BundleError, match=rf"model\.json: field '{field}' is missing"):
        load_bundle(bundle_dir)


def test_missing_model_file(bundle_dir: Path) -> None:
    (bundle_dir / "model.pt").unlink()
    with pytest.raises(BundleError, match=r"model\.pt: missing"):
        load_bundle(bundle_dir)


def test_missing_labels(bundle_dir: Path) -> None:
    (bundle_dir / "labels.txt").unlink()
    with pytest.raises(BundleError, match=r"labels\.txt: labels file is missing"):
        load_bundle(bundle_dir)


def test_labels_not_utf8(bundle_dir: Path) -> None:
    (bundle_dir / "labels.txt").write_bytes("红色圆形\n".encode("gbk"))
    with pytest.raises(BundleError, match=r"labels\.txt: not valid UTF-8"):
        load_bundle(bundle_dir)


def test_duplicate_label(bundle_dir: Path) -> None:
    (bundle_dir / "labels.txt").write_text("a\nb\na\n", encoding="utf-8")
    with pytest.raises(BundleError, match=r"labels\.txt: label 'a' on line 3 is a duplicate"):
        load_bundle(bundle_dir)


def test_label_count_must_match_model_output(bundle_dir: Path) -> None:
    from wanwu_worker.predictor import Predictor

    (bundle_dir / "labels.txt").write_text("a\nb\nc\n", encoding="utf-8")
    with pytest.raises(BundleError, match=r"labels\.txt: has 3 labels but model\.pt outputs 6 classes"):
        Predictor(load_bundle(bundle_dir), device="cpu")


def test_model_file_not_torchscript(bundle_dir: Path) -> None:
    from wanwu_worker.predictor import Predictor

    (bundle_dir / "model.pt").write_bytes(b"definitely not a zip archive")
    with pytest.raises(BundleError, match=r"model\.pt: not a loadable TorchScript archive"):
        Predictor(load_bundle(bundle_dir), device="cpu")


def test_fp16_falls_back_to_fp32_on_cpu(bundle_dir: Path) -> None:
    from wanwu_worker.predictor import Predictor

    edit_json(bundle_dir, lambda c: c.__setitem__("precision", "fp16"))
    predictor = Predictor(load_bundle(bundle_dir), device="cpu")
    assert predictor.bundle.precision == "fp16"
    assert predictor.precision == "fp32"
    assert predictor.health()["gpu_memory_mb"] is None


def test_cuda_requested_without_cuda_is_clear(bundle_dir: Path) -> None:
    import torch
    from wanwu_worker.predictor import Predictor

    if torch.cuda.is_available():
        pytest.skip("this check is for hosts without CUDA")
    with pytest.raises(BundleError, match="CUDA is not available"):
        Predictor(load_bundle(bundle_dir), device="cuda")


# -- formats, tasks and the optional fields ------------------------------------------------

LABELS = ("红色圆形", "红色方形", "绿色圆形", "绿色方形", "蓝色圆形", "蓝色方形")


def make_embed(directory: Path) -> None:
    """Turn the classify bundle in ``directory`` into an embed bundle without labels."""
    edit_json(directory, lambda c: (c.update(task="embed"), c.pop("labels")))
    (directory / "labels.txt").unlink()


def test_optional_fields_default(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    assert (bundle.format, bundle.task) == ("torchscript", "classify")
    assert bundle.subsets == {} and bundle.cpu_fallback is False and bundle.embedding_dim is None


def test_subsets_and_cpu_fallback_are_read(bundle_dir: Path) -> None:
    subsets = {"红色": ["红色方形", "红色圆形"], "圆形": ["红色圆形", "绿色圆形", "蓝色圆形"]}
    edit_json(bundle_dir, lambda c: c.update(subsets=subsets, cpu_fallback=True))
    bundle = load_bundle(bundle_dir)
    assert bundle.subsets == {"红色": ("红色方形", "红色圆形"), "圆形": ("红色圆形", "绿色圆形", "蓝色圆形")}
    assert bundle.cpu_fallback is True


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["红色圆形"], r"'subsets' is \['红色圆形'\]; expected an object"),
        ({"红色": ["红色圆形", "紫色圆形"]}, r"'subsets\.红色' has label '紫色圆形', which is not in the labels file"),
        ({"红色": []}, r"'subsets\.红色' is \[\]; expected a non-empty list of labels"),
        ({"红色": "红色圆形"}, r"'subsets\.红色' is '红色圆形'; expected a non-empty list"),
        ({"红色": ["红色圆形", 3]}, r"'subsets\.红色' .* expected a non-empty list of labels"),
        ({"红色": ["红色圆形", "红色圆形"]}, r"'subsets\.红色' lists '红色圆形' more than once"),
        ({"": ["红色圆形"]}, r"'subsets' has a subset named ''"),
    ],
)
def test_bad_subsets_are_named(bundle_dir: Path, value: object, message: str) -> None:
    edit_json(bundle_dir, lambda c: c.__setitem__("subsets", value))
    with pytest.raises(BundleError, match=message) as caught:
        load_bundle(bundle_dir)
    assert "model.json" in str(caught.value)


def test_subsets_are_for_classify_only(bundle_dir: Path) -> None:
    make_embed(bundle_dir)
    edit_json(bundle_dir, lambda c: c.__setitem__("subsets", {"红色": ["红色圆形"]}))
    with pytest.raises(BundleError, match=r"model\.json: field 'subsets' is only for task classify"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_cpu_fallback_must_be_a_bool(bundle_dir: Path, value: object) -> None:
    edit_json(bundle_dir, lambda c: c.__setitem__("cpu_fallback", value))
    with pytest.raises(BundleError, match=rf"model\.json: field 'cpu_fallback' is {value!r}; expected true or false"):
        load_bundle(bundle_dir)


def test_an_embed_bundle_needs_no_labels(bundle_dir: Path) -> None:
    make_embed(bundle_dir)
    edit_json(bundle_dir, lambda c: c.update(embedding_dim=64))
    bundle = load_bundle(bundle_dir)
    assert (bundle.task, bundle.labels, bundle.embedding_dim) == ("embed", (), 64)


def test_an_embed_bundle_reads_labels_it_names(bundle_dir: Path) -> None:
    edit_json(bundle_dir, lambda c: c.update(task="embed"))
    assert load_bundle(bundle_dir).labels == LABELS
    (bundle_dir / "labels.txt").unlink()
    edit_json(bundle_dir, lambda c: c.update(labels="labels.txt"))
    with pytest.raises(BundleError, match=r"labels\.txt: labels file is missing"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    ("value", "message"),
    [(0, r"is 0; expected a positive integer"), ("64", r"is '64'; expected"), (True, r"is True; expected")],
)
def test_bad_embedding_dim_is_named(bundle_dir: Path, value: object, message: str) -> None:
    make_embed(bundle_dir)
    edit_json(bundle_dir, lambda c: c.__setitem__("embedding_dim", value))
    with pytest.raises(BundleError, match=rf"model\.json: field 'embedding_dim' {message}"):
        load_bundle(bundle_dir)


def test_embedding_dim_is_for_embed_only(bundle_dir: Path) -> None:
    edit_json(bundle_dir, lambda c: c.__setitem__("embedding_dim", 64))
    with pytest.raises(BundleError, match=r"field 'embedding_dim' is only for task embed"):
        load_bundle(bundle_dir)


@pytest.mark.parametrize(
    ("fmt", "file"), [("torchscript", "model.pt"), ("export", "model.pt2"), ("onnx", "model.onnx")]
)
def test_each_format_names_its_model_file(bundle_dir: Path, fmt: str, file: str) -> None:
    edit_json(bundle_dir, lambda c: c.__setitem__("format", fmt))
    if fmt != "torchscript":
        with pytest.raises(BundleError, match=rf"{file}: missing \(model\.json 'format' is {fmt}\)"):
            load_bundle(bundle_dir)
        (bundle_dir / file).write_bytes(b"")  # presence is checked here, loading by the runtime
    bundle = load_bundle(bundle_dir)
    assert bundle.model_file == bundle_dir / file and bundle.format == fmt


def test_groups_threshold_and_translations_are_read(bundle_dir: Path) -> None:
    groups = {"红": ["红色圆形", "红色方形"], "绿": ["绿色圆形"]}
    english = ["red circle", "red square", "green circle", "green square", "blue circle", "blue square"]
    (bundle_dir / "labels_en.txt").write_text("\n".join(english) + "\n", encoding="utf-8")
    translations = {"en": {"labels": "labels_en.txt", "groups": {"红": "red", "绿": "green"}}}
    edit_json(
        bundle_dir,
        lambda c: c.update(groups=groups, confidence_threshold=0.4, translations=translations, language="zh"),
    )
    bundle = load_bundle(bundle_dir)
    assert bundle.groups == {"红": ("红色圆形", "红色方形"), "绿": ("绿色圆形",)}
    assert bundle.subsets["红"] == ("红色圆形", "红色方形")  # a group is a subset too
    assert bundle.confidence_threshold == 0.4 and bundle.language == "zh"
    assert bundle.translations["en"].labels[1] == "red square" and bundle.translations["en"].groups["绿"] == "green"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"groups": {"红": ["红色圆形"], "圆": ["红色圆形"]}},
            r"'groups\.圆' has label '红色圆形', which is already in group '红'",
        ),
        ({"groups": {"红": ["紫色圆形"]}}, r"'groups\.红' has label '紫色圆形', which is not in the labels file"),
        ({"groups": {"红,绿": ["红色圆形"]}}, r"'groups' has a group named '红,绿'"),
        ({"groups": {"红": []}}, r"'groups\.红' expected a non-empty list"),
        ({"confidence_threshold": 1.5}, r"'confidence_threshold' is 1\.5; expected a number from 0 to 1"),
        ({"groups": {"红色圆形": ["红色方形"]}}, r"'groups' has a group named '红色圆形', which is also a label"),
        ({"translations": {"en": {"labels": ""}}}, r"'translations\.en\.labels' is ''"),
        ({"language": "中文"}, r"'language' is '中文'; expected a language code"),
        ({"translations": {"en": {"labels": "../labels.txt"}}}, r"'translations\.en\.labels' is '\.\./labels\.txt'"),
        (
            {"translations": {"en": {"labels": "labels.txt", "groups": {}}}, "groups": {"红": ["红色圆形"]}},
            r"has no name for group '红'",
        ),
    ],
)
def test_bad_groups_and_translations_are_named(bundle_dir: Path, change: dict[str, object], message: str) -> None:
    edit_json(bundle_dir, lambda c: c.update(change))
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_dir)


def test_a_translation_must_have_a_label_per_class(bundle_dir: Path) -> None:
    (bundle_dir / "labels_en.txt").write_text("red circle\nred square\n", encoding="utf-8")
    edit_json(bundle_dir, lambda c: c.update(translations={"en": {"labels": "labels_en.txt"}}))
    with pytest.raises(BundleError, match=r"labels_en\.txt: has 2 labels; the labels file has 6"):
        load_bundle(bundle_dir)


def test_a_translated_group_name_may_not_be_a_label(bundle_dir: Path) -> None:
    english = ["red circle", "red square", "green circle", "green square", "blue circle", "blue square"]
    (bundle_dir / "labels_en.txt").write_text("\n".join(english) + "\n", encoding="utf-8")
    translations = {"en": {"labels": "labels_en.txt", "groups": {"红": "red circle"}}}
    edit_json(bundle_dir, lambda c: c.update(groups={"红": ["红色圆形"]}, translations=translations))
    with pytest.raises(BundleError, match=r"names a group 'red circle', which is also a label there"):
        load_bundle(bundle_dir)


def test_a_labels_file_that_is_a_directory_is_a_bundle_error(bundle_dir: Path) -> None:
    (bundle_dir / "labels_en.txt").mkdir()
    edit_json(bundle_dir, lambda c: c.update(translations={"en": {"labels": "labels_en.txt"}}))
    with pytest.raises(BundleError, match=r"labels_en\.txt: is a directory; bundle files must be regular files"):
        load_bundle(bundle_dir)
