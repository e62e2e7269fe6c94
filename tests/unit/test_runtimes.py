"""Model runtimes (TorchScript, torch.export, ONNX) and the two tasks, in-process with the
host's torch and onnxruntime: each format gives the network's own numbers; embed answers
unit vectors; labels named by a request answer their raw outputs; ``check`` reports."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torch import nn
from wanwu_worker.__main__ import main as worker_main
from wanwu_worker.bundle import load_bundle
from wanwu_worker.demo.export import export_onnx, export_program
from wanwu_worker.errors import BundleError, InputError
from wanwu_worker.predictor import Predictor
from wanwu_worker.preprocess import preprocess
from wanwu_worker.runtimes import PRIMER_ONNX, prime_onnxruntime
from wanwu_worker.server import WorkerServer
from wanwu_worker.stem import Stem

from tests.images import encode
from tests.unit.conftest import serving
from tests.unit.test_server import raw_request

LABELS = ("红", "绿", "蓝", "白")
SIDE = 16
INPUT_SIZE = (3, SIDE, SIDE)
MODEL_FILES = {"torchscript": "model.pt", "export": "model.pt2", "onnx": "model.onnx"}


def tiny_network() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, len(LABELS)),
    ).eval()


@pytest.fixture(scope="module")
def network() -> nn.Module:
    return tiny_network()


@pytest.fixture(scope="module")
def model_files(network: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The network in each format, plus ONNX with its batch fixed at 1 (exported once:
    the ONNX export alone takes seconds)."""
    root = tmp_path_factory.mktemp("models")
    torch.jit.script(network).save(str(root / "model.pt"))
    export_program(network, INPUT_SIZE, root / "model.pt2")
    export_onnx(network, INPUT_SIZE, root / "model.onnx")
    fixed = root / "fixed"
    fixed.mkdir()
    export_onnx(network, INPUT_SIZE, fixed / "model.onnx", dynamic_batch=False)
    return {
        "torchscript": root / "model.pt",
        "export": root / "model.pt2",
        "onnx": root / "model.onnx",
        "onnx-fixed": fixed / "model.onnx",
    }


def make_bundle(
    directory: Path, model_file: Path, fmt: str, task: str = "classify", labels: bool = True, **extra: Any
) -> Path:
    directory.mkdir(parents=True)
    shutil.copy(model_file, directory / MODEL_FILES[fmt])
    config: dict[str, Any] = {
        "name": directory.name,
        "format": fmt,
        "task": task,
        "input_size": list(INPUT_SIZE),
        "resize": SIDE,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        **extra,
    }
    (directory / "model.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    if labels:
        (directory / "labels.txt").write_text("\n".join(LABELS) + "\n", encoding="utf-8")
    return directory


def picture(seed: int) -> bytes:
    rng = random.Random(seed)
    width, height = 20 + seed % 7, 24
    return encode(Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3)))


def expected_outputs(network: nn.Module, data: bytes, bundle_dir: Path) -> torch.Tensor:
    """What the network gives for ``data``, preprocessed as the worker does, in-process."""
    with torch.inference_mode():
        return network(preprocess(data, load_bundle(bundle_dir)).unsqueeze(0))[0]


FORMATS = ("torchscript", "export", "onnx")


@pytest.fixture(scope="module")
def predictors(model_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Predictor]:
    """A classify and an embed predictor per format, batching 4: keyed "onnx", "onnx-embed"."""
    root = tmp_path_factory.mktemp("bundles")
    loaded = {}
    for fmt in FORMATS:
        batching = {"max_batch_size": 4, "max_wait_ms": 1}
        classify = make_bundle(root / fmt, model_files[fmt], fmt, batching=batching)
        embed = make_bundle(root / f"{fmt}-embed", model_files[fmt], fmt, "embed", labels=False, batching=batching)
        loaded[fmt] = Predictor(load_bundle(classify), device="cpu")
        loaded[f"{fmt}-embed"] = Predictor(load_bundle(embed), device="cpu")
    return loaded


# -- each format -------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_scores_as_the_network_does(fmt: str, predictors: dict[str, Predictor], network: nn.Module) -> None:
    predictor = predictors[fmt]
    assert predictor.health()["format"] == fmt and predictor.health()["task"] == "classify"
    images = [picture(seed) for seed in range(5)]
    batch = predictor.predict_batch(images, top_k=len(LABELS))
    for data, entry in zip(images, batch.results, strict=True):
        scores = torch.softmax(expected_outputs(network, data, predictor.bundle.path), dim=0).tolist()
        single = predictor.predict(data, top_k=len(LABELS))
        assert set(single.result) == {"predictions"}
        for answer in (single.predictions, entry["predictions"]):
            assert [p["label"] for p in answer] == [LABELS[i] for i in sorted(range(4), key=lambda i: -scores[i])]
            for p in answer:
                assert p["score"] == pytest.approx(scores[LABELS.index(p["label"])], abs=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_named_labels_answer_the_raw_outputs_in_their_order(
    fmt: str, predictors: dict[str, Predictor], network: nn.Module
) -> None:
    predictor = predictors[fmt]
    data = picture(11)
    logits = expected_outputs(network, data, predictor.bundle.path)
    named = ("蓝", "红")
    single = predictor.predict(data, top_k=2, labels=named)
    [entry] = predictor.predict_batch([data], top_k=2, labels=named).results
    for result in (single.result, entry):
        assert len(result["predictions"]) == 2  # top_k over all labels, as without labels
        assert all(isinstance(v, float) for v in result["logits"])
        assert result["logits"] == pytest.approx([logits[2].item(), logits[0].item()], abs=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_embed_answers_unit_vectors_of_the_model_width(
    fmt: str, predictors: dict[str, Predictor], network: nn.Module
) -> None:
    predictor = predictors[f"{fmt}-embed"]
    assert predictor.bundle.labels == ()
    health = predictor.health()
    assert (health["task"], health["format"], health["embedding_dim"]) == ("embed", fmt, len(LABELS))
    images = [picture(seed) for seed in range(3)]
    batch = predictor.predict_batch(images, top_k=3)
    for data, entry in zip(images, batch.results, strict=True):
        single = predictor.predict(data, top_k=3).result
        expected = torch.nn.functional.normalize(expected_outputs(network, data, predictor.bundle.path), dim=0)
        for result in (single, entry):
            assert set(result) == {"embedding", "dim"} and result["dim"] == len(LABELS)
            vector = torch.tensor(result["embedding"])
            assert vector.norm().item() == pytest.approx(1, abs=1e-5)
            assert vector.tolist() == pytest.approx(expected.tolist(), abs=1e-4)


@pytest.mark.parametrize(
    ("key", "labels", "message"),
    [
        ("torchscript", ("红", "紫"), "label '紫' is not one of"),
        ("torchscript", ("红", "红"), "label '红' is named more than once"),
        ("torchscript", (*LABELS, "红"), "5 labels named; model torchscript has 4"),
        ("torchscript-embed", ("红",), "answers embeddings; it takes no labels"),
    ],
)
@pytest.mark.parametrize("batch", [False, True])
def test_bad_labels_are_bad_parameters(
    predictors: dict[str, Predictor], key: str, labels: tuple[str, ...], message: str, batch: bool
) -> None:
    predictor, data = predictors[key], picture(1)
    with pytest.raises(InputError, match=message) as caught:
        if batch:
            predictor.predict_batch([data], 2, labels)
        else:
            predictor.predict(data, 2, labels)
    assert caught.value.code == "bad_parameter"


# -- load-time checks --------------------------------------------------------------------


def test_fixed_batch_onnx_with_batching_is_refused_clearly(model_files: dict[str, Path], tmp_path: Path) -> None:
    fixed = model_files["onnx-fixed"]
    alone = make_bundle(tmp_path / "alone", fixed, "onnx")
    assert Predictor(load_bundle(alone), device="cpu").max_batch_size == 1  # fine without batching
    batched = make_bundle(tmp_path / "batched", fixed, "onnx", batching={"max_batch_size": 8})
    with pytest.raises(BundleError, match=r"model\.onnx: the model takes a fixed batch of 1; export it with a dynamic"):
        Predictor(load_bundle(batched), device="cpu")


class OneRow(nn.Module):
    """A model that folds its batch into one row: right for one image, wrong for two."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(1, -1)[:, :4]


def test_a_model_that_cannot_batch_is_refused_at_load(tmp_path: Path) -> None:
    torch.jit.script(OneRow()).save(str(tmp_path / "m.pt"))
    bundle = make_bundle(tmp_path / "b", tmp_path / "m.pt", "torchscript", batching={"max_batch_size": 2})
    with pytest.raises(BundleError, match=r"a batch of 2 gave 1 rows; export it with a dynamic batch dimension"):
        Predictor(load_bundle(bundle), device="cpu")


class Pooled(nn.Module):
    def __init__(self, trailing: tuple[int, ...]) -> None:
        super().__init__()
        self.trailing = trailing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1, :1, :1].expand([x.shape[0], 4, *self.trailing]).contiguous()


def test_trailing_singleton_dimensions_are_flattened_and_other_shapes_refused(tmp_path: Path) -> None:
    torch.jit.script(Pooled((1, 1))).save(str(tmp_path / "ok.pt"))
    ok = make_bundle(tmp_path / "ok", tmp_path / "ok.pt", "torchscript")
    assert Predictor(load_bundle(ok), device="cpu").outputs == 4
    torch.jit.script(Pooled((1, 2))).save(str(tmp_path / "bad.pt"))
    bad = make_bundle(tmp_path / "bad", tmp_path / "bad.pt", "torchscript")
    with pytest.raises(BundleError, match=r"model\.pt: output is \[1, 4, 1, 2\]; expected \[batch, outputs\]"):
        Predictor(load_bundle(bad), device="cpu")


@pytest.mark.parametrize(
    ("fmt", "message"), [("export", "not a loadable torch.export program"), ("onnx", "not a loadable ONNX model")]
)
def test_a_file_that_is_not_a_model_is_named(fmt: str, message: str, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"definitely not a model")
    bundle = make_bundle(tmp_path / "b", junk, fmt)
    with pytest.raises(BundleError, match=rf"{MODEL_FILES[fmt]}: {message}"):
        Predictor(load_bundle(bundle), device="cpu")


def test_embedding_dim_must_match_the_output(model_files: dict[str, Path], tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", model_files["onnx"], "onnx", "embed", embedding_dim=16)
    with pytest.raises(BundleError, match=r"field 'embedding_dim' is 16 but model\.onnx outputs 4 values"):
        Predictor(load_bundle(bundle), device="cpu")


def test_labels_of_the_wrong_count_are_refused_for_every_format(model_files: dict[str, Path], tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", model_files["export"], "export")
    (bundle / "labels.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(BundleError, match=r"has 2 labels but model\.pt2 outputs 4 classes"):
        Predictor(load_bundle(bundle), device="cpu")


# -- serving -----------------------------------------------------------------------------


@pytest.fixture
def served(predictors: dict[str, Predictor], tmp_path: Path) -> Iterator[dict[str, str]]:
    """Worker sockets for the ONNX classify and embed predictors."""
    with (
        serving(WorkerServer(str(tmp_path / "c.sock"), predictors["onnx"])) as classify,
        serving(WorkerServer(str(tmp_path / "e.sock"), predictors["onnx-embed"])) as embed,
    ):
        yield {"classify": classify.final_path, "embed": embed.final_path}


def post(socket: str, url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    status, _, raw = raw_request(socket, "POST", url, body, headers)
    return status, json.loads(raw)


def test_labels_query_parameters_add_logits(served: dict[str, str], network: nn.Module) -> None:
    data = picture(3)
    status, answer = post(served["classify"], "/predict?top_k=3&labels=%E7%BB%BF&labels=%E7%99%BD", data)
    assert status == 200 and set(answer) == {"predictions", "logits", "logits_of", "timing_ms"}
    assert len(answer["predictions"]) == 3 and len(answer["logits"]) == 2
    status, plain = post(served["classify"], "/predict?top_k=3", data)
    assert status == 200 and set(plain) == {"predictions", "timing_ms"}
    parts = {"X-Wanwu-Parts": f"{len(data)},{len(data)}"}
    status, batch = post(served["classify"], "/predict_batch?top_k=1&labels=%E7%BB%BF", data + data, parts)
    assert status == 200 and [r["logits"] for r in batch["results"]] == [answer["logits"][:1]] * 2


def test_a_column_mask_asks_as_columns_do_and_answers_are_tagged_with_their_labels(served: dict[str, str]) -> None:
    from wanwu_worker.bundle import labels_digest

    data = picture(6)
    status, listed = post(served["classify"], "/predict?columns=0,2", data)
    assert status == 200 and listed["logits_of"] == labels_digest(("红", "蓝"))
    status, masked = post(served["classify"], "/predict?column_mask=BQ", data)  # 0b101: labels 0 and 2
    assert status == 200 and masked["logits"] == listed["logits"] and masked["logits_of"] == listed["logits_of"]
    status, answer = post(served["classify"], "/predict?column_mask=IA", data)  # bit 5 of a 4-label model
    assert status == 400 and "wider than" in answer["error"]["message"]
    status, plain = post(served["classify"], "/predict", data)
    assert status == 200 and "logits_of" not in plain


def test_columns_and_labels_ask_for_each_label_once_in_order(served: dict[str, str]) -> None:
    data = picture(5)
    status, by_name = post(served["classify"], "/predict?labels=%E7%BB%BF&labels=%E7%BA%A2", data)  # 绿, 红
    assert status == 200
    status, mixed = post(served["classify"], "/predict?columns=1,0&labels=%E7%BB%BF", data)  # 绿 asked twice
    assert status == 200 and mixed["logits"] == by_name["logits"] and len(mixed["logits"]) == 2


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("labels=%E7%B4%AB", "label '紫' is not one of"),
        ("labels=", "label '' is not one of"),
        ("labels=%FF", "not valid UTF-8"),
        ("columns=4", "column '4' is not a label index"),
        ("columns=1,x", "column 'x' is not a label index"),
        ("columns=-1", "column '-1' is not a label index"),
        ("subset=%E5%89%8D", "has no subset '前'"),
    ],
)
def test_bad_labels_are_400(served: dict[str, str], query: str, message: str) -> None:
    status, answer = post(served["classify"], f"/predict?{query}", picture(2))
    assert status == 400 and answer["error"]["code"] == "bad_parameter"
    assert message in answer["error"]["message"]


def test_an_embed_worker_answers_vectors_and_refuses_labels(served: dict[str, str]) -> None:
    status, answer = post(served["embed"], "/predict?top_k=2", picture(4))
    assert status == 200 and set(answer) == {"embedding", "dim", "timing_ms"} and answer["dim"] == 4
    status, answer = post(served["embed"], "/predict?labels=%E7%BA%A2", picture(4))
    assert status == 400 and answer["error"]["code"] == "bad_parameter"


def test_a_stem_cell_loads_every_format_and_task(model_files: dict[str, Path], tmp_path: Path) -> None:
    make_bundle(tmp_path / "onnx-embed", model_files["onnx"], "onnx", "embed", embedding_dim=4)
    make_bundle(tmp_path / "export", model_files["export"], "export")
    stem = Stem(tmp_path, device="cpu")
    assert stem.onnxruntime  # primed while it waits: onnxruntime is installed here
    embed = stem.load("onnx-embed")
    assert embed.predict(picture(1)).result["dim"] == 4
    assert len(stem.load("export").predict(picture(1), top_k=2).predictions) == 2


# -- python -m wanwu_worker check ----------------------------------------------------------


def run_check(bundle: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    status = worker_main(["--model", str(bundle), "--device", "cpu", "--threads", "0", "check"])
    [line] = capsys.readouterr().out.splitlines()
    return status, json.loads(line)


@pytest.mark.parametrize(("fmt", "task"), [("onnx", "classify"), ("torchscript", "embed")])
def test_check_prints_one_json_line(
    fmt: str, task: str, model_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = make_bundle(tmp_path / "m", model_files[fmt], fmt, task, batching={"max_batch_size": 4})
    status, report = run_check(bundle, capsys)
    assert status == 0
    assert report["ok"] is True
    assert {k: report[k] for k in ("name", "format", "task", "device", "precision", "outputs", "labels")} == {
        "name": "m",
        "format": fmt,
        "task": task,
        "device": "cpu",
        "precision": "fp32",
        "outputs": 4,
        "labels": 4,
    }
    assert report["embedding_dim"] == (4 if task == "embed" else None)
    assert report["max_batch_size"] == 4
    assert report["load_ms"] > 0 and report["first_ms"] > 0 and report["peak_rss_mb"] > 0
    assert report["infer_ms"] > 0  # the median of five warm requests
    assert report["gpu_memory_mb"] is None and report["gpu_memory_method"] is None


def test_check_reports_a_broken_bundle_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(b"not onnx")
    status, report = run_check(make_bundle(tmp_path / "b", junk, "onnx"), capsys)
    assert status == 2 and report["ok"] is False
    assert report["error"]["code"] == "bad_bundle" and "not a loadable ONNX model" in report["error"]["message"]
    status, report = run_check(tmp_path / "nowhere", capsys)
    assert status == 2 and "model.json: missing" in report["error"]["message"]


def test_predict_mode_prints_embeddings(model_files: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    bundle = make_bundle(tmp_path / "e", model_files["torchscript"], "torchscript", "embed", labels=False)
    image = tmp_path / "a.png"
    image.write_bytes(picture(5))
    status = worker_main(["--model", str(bundle), "--device", "cpu", "--threads", "0", "predict", str(image)])
    [line] = capsys.readouterr().out.splitlines()
    answer = json.loads(line)
    assert status == 0 and set(answer) == {"file", "embedding", "dim"} and answer["dim"] == 4


def test_the_primer_is_the_one_node_model_onnx_helper_writes() -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "p",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    assert model.SerializeToString() == PRIMER_ONNX
    assert prime_onnxruntime(torch.device("cpu")) is True


class WarmUpRecorder(Predictor):
    """Remembers the size of every batch it runs, the warm-up's included."""

    def predict_batch(self, images: list[bytes], top_k: int = 5, labels: tuple[str, ...] | None = None) -> Any:
        self.sizes = [*getattr(self, "sizes", []), len(images)]
        return super().predict_batch(images, top_k, labels)


def test_an_onnx_model_warms_up_once_and_only_the_smallest_batch(model_files: dict[str, Path], tmp_path: Path) -> None:
    """onnxruntime optimises at load, not on first runs: its warm-up is one pass of each
    kind; the torch formats' runs the largest batch too (tests/unit/test_batch.py)."""
    onnx_bundle = make_bundle(tmp_path / "o", model_files["onnx"], "onnx", batching={"max_batch_size": 8})
    torch_bundle = make_bundle(
        tmp_path / "t", model_files["torchscript"], "torchscript", batching={"max_batch_size": 8}
    )
    assert WarmUpRecorder(load_bundle(onnx_bundle), device="cpu").sizes == [2]
    assert WarmUpRecorder(load_bundle(torch_bundle), device="cpu").sizes == [2, 2, 8, 8]


def test_a_broken_onnxruntime_leaves_the_stem_cell_serving_torch(
    model_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("libonnxruntime.so: cannot open shared object file")

    monkeypatch.setattr(onnxruntime, "InferenceSession", broken)
    make_bundle(tmp_path / "ts", model_files["torchscript"], "torchscript")
    stem = Stem(tmp_path, device="cpu")
    assert stem.onnxruntime is False and stem.health()["onnxruntime"] is False
    assert len(stem.load("ts").predict(picture(1), top_k=2).predictions) == 2
