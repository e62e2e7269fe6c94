"""Batched inference in the worker: the predictor, POST /predict_batch over a real Unix
socket, and the one-shot predict mode, all with the real tiny demo model."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from wanwu_worker.__main__ import main
from wanwu_worker.bundle import load_bundle
from wanwu_worker.demo.shapes import samples
from wanwu_worker.errors import InferenceError, InputError
from wanwu_worker.predictor import BatchPrediction, Predictor, default_preprocess_threads
from wanwu_worker.preprocess import preprocess
from wanwu_worker.server import WorkerServer
from wanwu_worker.stem import Stem

from scheduler.errors import WorkerCrashed, WorkerRejected
from scheduler.worker_client import ONE_WRITE_LIMIT, WorkerClient
from tests.images import demo_images, encode, png_header_only, truncated_png
from tests.unit.conftest import serving
from tests.unit.test_server import UnixHTTPConnection, raw_request

# One image runs through other convolution kernels than a batch (PyTorch picks them by
# batch size), so a score may differ from predict's in its last rounded digit.
SCORE_TOLERANCE = 1.5e-6


def with_batching(tiny_bundle: Path, directory: Path, batching: dict[str, Any] | None) -> Path:
    """A copy of the tiny bundle with ``batching`` in model.json (None: no batching)."""
    copy = directory / "demo-shapes"
    shutil.copytree(tiny_bundle, copy)
    meta = copy / "model.json"
    config = json.loads(meta.read_text(encoding="utf-8"))
    config.pop("batching", None)
    if batching is not None:
        config["batching"] = batching
    meta.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return copy


@pytest.fixture(scope="module")
def predictor(tiny_bundle: Path) -> Predictor:
    return Predictor(load_bundle(tiny_bundle), device="cpu")


@pytest.fixture(scope="module")
def small_batch_bundle(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_batching(tiny_bundle, tmp_path_factory.mktemp("small"), {"max_batch_size": 2, "max_wait_ms": 1})


def mixed_images() -> list[bytes]:
    """PNG and JPEG pictures of every demo class, in many sizes and aspects."""
    generated = [s.data for s in samples(31, 10)]
    return [*demo_images(fmt="PNG").values(), *generated, *demo_images(seed=8, fmt="JPEG").values()]


def noise_png(seed: int, side: int = 210) -> bytes:
    """A PNG that hardly compresses: about 3 bytes per pixel."""
    rng = random.Random(seed)
    return encode(Image.frombytes("RGB", (side, side), rng.randbytes(side * side * 3)))


def assert_same_answer(batched: list[dict[str, Any]], single: list[dict[str, Any]]) -> None:
    assert [p["label"] for p in batched] == [p["label"] for p in single]
    assert [p["score"] for p in batched] == pytest.approx([p["score"] for p in single], abs=SCORE_TOLERANCE)


# -- the predictor ---------------------------------------------------------------------


def test_batch_answers_equal_single_answers_image_by_image(predictor: Predictor) -> None:
    images = mixed_images()
    assert {Image.open(io.BytesIO(data)).format for data in images} == {"PNG", "JPEG"}
    answer = predictor.predict_batch(images, top_k=6)
    assert isinstance(answer, BatchPrediction) and len(answer.results) == len(images)
    for data, result in zip(images, answer.results, strict=True):
        assert_same_answer(result["predictions"], predictor.predict(data, 6).predictions)


def test_predict_answers_exactly_what_one_image_through_the_model_gives(predictor: Predictor) -> None:
    """predict's scores are unchanged by batching: the same numbers as preprocessing one
    image on its own (as the trainer does) and running it alone through the model."""
    for data in mixed_images():
        tensor = preprocess(data, predictor.bundle).unsqueeze(0)
        with torch.inference_mode():
            top = torch.topk(torch.softmax(predictor.model(tensor), dim=1)[0], 4)
        labels = [predictor.bundle.labels[i] for i in top.indices.tolist()]
        expected = [
            {"label": label, "score": round(v, 6)} for label, v in zip(labels, top.values.tolist(), strict=True)
        ]
        assert predictor.predict(data, 4).predictions == expected


def test_a_batch_of_one_is_exactly_predict(predictor: Predictor) -> None:
    for data in mixed_images()[:4]:
        assert predictor.predict_batch([data], 3).results == [{"predictions": predictor.predict(data, 3).predictions}]


def test_bad_images_get_their_own_errors_and_the_rest_are_answered(predictor: Predictor) -> None:
    good = mixed_images()[:4]
    images = [good[0], truncated_png(), good[1], b"", good[2], b"plain text", png_header_only(100_000, 100_000)]
    images.append(good[3])
    before = predictor.requests
    answer = predictor.predict_batch(images, top_k=2)
    codes = [r["error"]["code"] if "error" in r else None for r in answer.results]
    assert codes == [None, "corrupt_image", None, "empty", None, "not_an_image", "image_too_large", None]
    for index, data in ((0, good[0]), (2, good[1]), (4, good[2]), (7, good[3])):
        assert_same_answer(answer.results[index]["predictions"], predictor.predict(data, 2).predictions)
    assert all(r["error"]["message"] for r in answer.results if "error" in r)
    assert predictor.requests == before + 4 + 4  # the batch's good images, then the four singles
    assert answer.timing_ms["batch"] == 8 and answer.timing_ms["failed"] == 4


def test_timing_has_every_stage(predictor: Predictor) -> None:
    timing = predictor.predict_batch(mixed_images()[:5], 1).timing_ms
    assert set(timing) == {"decode", "preprocess", "inference", "total", "batch", "failed"}
    assert all(timing[k] >= 0 for k in ("decode", "preprocess", "inference"))
    assert timing["decode"] + timing["preprocess"] + timing["inference"] <= timing["total"] + 0.01


def test_top_k_is_capped_at_the_label_count(predictor: Predictor) -> None:
    [result] = predictor.predict_batch(mixed_images()[:1], 50).results
    assert len(result["predictions"]) == 6


@contextmanager
def failing_model(predictor: Predictor, message: str) -> Iterator[None]:
    """The predictor's model raises ``message`` on every forward pass for a while."""
    real = predictor.model

    def broken(_batch: object) -> object:
        raise RuntimeError(message)

    predictor.model = broken  # type: ignore[assignment]
    try:
        yield
    finally:
        predictor.model = real


def test_a_model_failure_fails_the_whole_batch_but_bad_images_alone_need_no_model(predictor: Predictor) -> None:
    with failing_model(predictor, "CUDA error: an illegal memory access was encountered"):
        with pytest.raises(InferenceError, match="illegal memory access"):
            predictor.predict_batch([mixed_images()[0], b""], 3)
        only_bad = predictor.predict_batch([b"", b"not an image"], 3)
        assert [r["error"]["code"] for r in only_bad.results] == ["empty", "not_an_image"]
        assert predictor.predict_batch([], 3).results == []


class RecordingPredictor(Predictor):
    """Remembers the size of every batch it runs, the warm-up's included."""

    def predict_batch(self, images: list[bytes], top_k: int = 5) -> BatchPrediction:
        self.sizes = [*getattr(self, "sizes", []), len(images)]
        return super().predict_batch(images, top_k)


def test_warm_up_runs_the_smallest_and_largest_batches(tiny_bundle: Path) -> None:
    warmed = RecordingPredictor(load_bundle(tiny_bundle), device="cpu")
    assert set(warmed.sizes) == {2, 16}  # the bundle's max_batch_size is 16
    assert warmed.requests == 0
    assert warmed.health()["max_batch_size"] == 16
    answer = warmed.predict_batch(mixed_images()[:3], 2)
    assert [len(r["predictions"]) for r in answer.results] == [2, 2, 2]


def test_without_batching_the_predictor_still_answers_batches(tiny_bundle: Path, tmp_path: Path) -> None:
    plain = RecordingPredictor(load_bundle(with_batching(tiny_bundle, tmp_path, None)), device="cpu")
    assert getattr(plain, "sizes", []) == []  # no batch warm-up
    assert plain.max_batch_size == 1 and plain.health()["max_batch_size"] == 1
    images = mixed_images()[:3]
    for data, result in zip(images, plain.predict_batch(images, 3).results, strict=True):
        assert_same_answer(result["predictions"], plain.predict(data, 3).predictions)


def test_preprocess_threads_default_to_the_usable_cpus_up_to_four(tiny_bundle: Path, tmp_path: Path) -> None:
    assert default_preprocess_threads() == min(4, len(os.sched_getaffinity(0)))
    one = Predictor(load_bundle(with_batching(tiny_bundle, tmp_path, None)), device="cpu", preprocess_threads=1)
    assert one.health()["preprocess_threads"] == 1
    assert len(one.predict_batch(mixed_images()[:3], 1).results) == 3


# -- POST /predict_batch ----------------------------------------------------------------


def post_batch(path: str, parts: str | None, body: bytes, query: str = "") -> tuple[int, dict[str, str], Any]:
    """The whole request in one write: a worker that refuses it after the headers closes
    the connection, and a body sent after that would meet a broken pipe."""
    import http.client
    import socket

    head = f"POST /predict_batch{query} HTTP/1.1\r\nHost: worker\r\nContent-Length: {len(body)}\r\n"
    if parts is not None:
        head += f"X-Wanwu-Parts: {parts}\r\n"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(head.encode() + b"\r\n" + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, dict(response.getheaders()), json.loads(response.read())


def test_predict_batch_over_the_socket(client: WorkerClient, predictor: Predictor) -> None:
    images = mixed_images()[:7]
    images[3] = truncated_png()
    images[5] = b""
    answer = client.predict_batch(images, top_k=3)
    assert [r["error"]["code"] for r in answer.results if "error" in r] == ["corrupt_image", "empty"]
    for index in (0, 1, 2, 4, 6):
        assert_same_answer(answer.results[index]["predictions"], predictor.predict(images[index], 3).predictions)
    assert set(answer.timing_ms) >= {"decode", "preprocess", "inference", "total", "batch", "failed", "server"}
    assert answer.timing_ms["batch"] == 7 and answer.round_trip_ms > 0
    assert client.health()["max_batch_size"] == 16
    assert client.connections == 1


def test_a_body_larger_than_one_write_goes_part_by_part(client: WorkerClient, predictor: Predictor) -> None:
    images = [noise_png(seed) for seed in range(3)]
    assert all(len(data) < 200_000 for data in images) and sum(map(len, images)) > ONE_WRITE_LIMIT
    answer = client.predict_batch(images, top_k=2)
    for data, result in zip(images, answer.results, strict=True):
        assert_same_answer(result["predictions"], predictor.predict(data, 2).predictions)
    small = mixed_images()[:2]
    assert len(client.predict_batch(small).results) == 2  # the same connection, still in step
    assert client.connections == 1


@pytest.mark.parametrize(
    ("parts", "body", "message"),
    [
        (None, b"abc", "send X-Wanwu-Parts"),
        ("", b"abc", "send X-Wanwu-Parts"),
        ("1,x,1", b"abc", "expected byte lengths"),
        ("1,-1,3", b"abc", "expected byte lengths"),
        ("1,,2", b"abc", "expected byte lengths"),
        ("1,2,3", b"abc", "adds up to 6 bytes but Content-Length is 3"),
        ("1,1", b"abc", "adds up to 2 bytes but Content-Length is 3"),
        ("9" * 40, b"abc", "expected byte lengths"),
    ],
)
def test_malformed_parts_are_bad_parts(server: WorkerServer, parts: str | None, body: bytes, message: str) -> None:
    status, _, answer = post_batch(server.final_path, parts, body)
    assert status == 400 and answer["error"]["code"] == "bad_parts"
    assert message in answer["error"]["message"]


def test_too_many_parts_is_batch_too_large(client: WorkerClient, server: WorkerServer) -> None:
    status, _, answer = post_batch(server.final_path, ",".join(["1"] * 17), b"x" * 17)
    assert status == 400 and answer["error"]["code"] == "batch_too_large"
    assert "at most 16" in answer["error"]["message"]
    with pytest.raises(WorkerRejected) as caught:
        client.predict_batch([b"x"] * 17)
    assert (caught.value.status, caught.value.code) == (400, "batch_too_large")


def test_without_batching_a_worker_takes_one_image_per_batch(
    tiny_bundle: Path, tmp_path: Path, predictor: Predictor
) -> None:
    plain = Predictor(load_bundle(with_batching(tiny_bundle, tmp_path, None)), device="cpu")
    with serving(WorkerServer(str(tmp_path / "plain.sock"), plain)) as srv:
        client = WorkerClient(srv.final_path, "plain", timeout=30)
        image = mixed_images()[0]
        assert len(client.predict_batch([image]).results) == 1
        with pytest.raises(WorkerRejected, match="2 images in one batch; this worker takes at most 1"):
            client.predict_batch([image, image])
        client.close()


def test_too_large_is_refused_without_reading_the_body(predictor: Predictor, tmp_path: Path) -> None:
    with serving(WorkerServer(str(tmp_path / "small.sock"), predictor, max_body=1000)) as srv:
        for parts, body in (("1001", b"x" * 1001), ("10,10", b"x" * 2001)):
            status, headers, answer = post_batch(srv.final_path, parts, body)
            assert status == 413 and answer["error"]["code"] == "too_large"
            assert headers.get("Connection") == "close"
        status, _, answer = post_batch(srv.final_path, "1000,1000", b"x" * 2000)
        assert status == 200 and [r["error"]["code"] for r in answer["results"]] == ["not_an_image"] * 2


def test_a_stem_cell_answers_not_loaded(tiny_bundle: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(tiny_bundle, root / "demo-shapes")
    with serving(WorkerServer(str(tmp_path / "stem.sock"), None, stem=Stem(root, device="cpu"))) as srv:
        status, _, answer = post_batch(srv.final_path, "3", b"abc")
        assert status == 409 and answer["error"]["code"] == "not_loaded"


def test_wrong_method_and_top_k(server: WorkerServer) -> None:
    status, headers, raw = raw_request(server.final_path, "GET", "/predict_batch")
    assert status == 405 and headers["Content-Type"].startswith("application/json")
    assert json.loads(raw)["error"]["code"] == "method_not_allowed"
    status, _, answer = post_batch(server.final_path, "3", b"abc", "?top_k=0")
    assert status == 400 and answer["error"]["code"] == "bad_parameter"


def test_a_connection_stays_in_step_after_refusing_a_request(server: WorkerServer) -> None:
    image = mixed_images()[0]
    conn = UnixHTTPConnection(server.final_path, timeout=30)
    try:
        for url, headers, body, status in [
            ("/predict_batch", {"X-Wanwu-Parts": "1,x"}, b"abc", 400),
            ("/predict?top_k=0", {}, image, 400),
            ("/predict_batch?top_k=abc", {"X-Wanwu-Parts": str(len(image))}, image, 400),
            ("/predict_batch", {"X-Wanwu-Parts": f"{len(image)},0"}, image, 200),
            ("/predict", {}, image, 200),
        ]:
            conn.request("POST", url, body=body, headers=headers)
            response = conn.getresponse()
            assert (url, response.status) == (url, status)
            response.read()
    finally:
        conn.close()


def test_unexpected_errors_are_500_and_the_worker_keeps_serving(
    client: WorkerClient, predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(_images: list[bytes], _top_k: int) -> BatchPrediction:
        raise KeyError("a bug")

    with monkeypatch.context() as patch:
        patch.setattr(predictor, "predict_batch", bug)
        with pytest.raises(WorkerCrashed, match="500: internal: KeyError"):
            client.predict_batch(mixed_images()[:2])
    with (
        failing_model(predictor, "out of memory"),
        pytest.raises(WorkerCrashed, match=r"500: inference_failed: .*out of memory"),
    ):
        client.predict_batch(mixed_images()[:2])
    assert len(client.predict_batch(mixed_images()[:2]).results) == 2


# -- python -m wanwu_worker predict -----------------------------------------------------


def one_by_one(predictor: Predictor, files: list[Path], top_k: int) -> list[dict[str, Any]]:
    """What the one-shot mode printed before batching: each file on its own."""
    lines: list[dict[str, Any]] = []
    for path in files:
        line: dict[str, Any] = {"file": str(path)}
        try:
            line["predictions"] = predictor.predict(path.read_bytes(), top_k).predictions
        except InputError as exc:
            line["error"] = exc.to_json()
        except OSError as exc:
            line["error"] = {"code": "unreadable", "message": f"{path}: {exc.strerror or exc}"}
        lines.append(line)
    return lines


def run_one_shot(bundle: Path, files: list[Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[Any]]:
    status = main(
        ["--model", str(bundle), "--device", "cpu", "--threads", "0", "predict", "--top-k", "3"]
        + [str(f) for f in files]
    )
    return status, [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_one_shot_predict_output_is_unchanged_for_good_and_bad_files(
    small_batch_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = mixed_images()
    contents = [images[0], truncated_png(), None, b"", images[20], "dir", images[9], b"GIF89a no", images[3]]
    files: list[Path] = []
    for index, content in enumerate(contents):
        path = tmp_path / f"f{index}.img"
        if content == "dir":
            path.mkdir()
        elif isinstance(content, bytes):
            path.write_bytes(content)
        files.append(path)  # None: a file that does not exist
    status, lines = run_one_shot(small_batch_bundle, files, capsys)
    expected = one_by_one(Predictor(load_bundle(small_batch_bundle), device="cpu"), files, 3)
    assert status == 1
    assert [line["file"] for line in lines] == [str(f) for f in files]
    assert [line.get("error") for line in lines] == [line.get("error") for line in expected]
    assert [line.get("error", {}).get("code") for line in lines] == [
        None, "corrupt_image", "unreadable", "empty", None, "unreadable", None, "not_an_image", None
    ]  # fmt: skip
    for got, want in zip(lines, expected, strict=True):
        assert set(got) == set(want)
        if "predictions" in want:
            assert_same_answer(got["predictions"], want["predictions"])


def test_one_shot_predict_exits_0_when_every_file_is_answered(
    small_batch_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = []
    for index, data in enumerate(mixed_images()[:5]):
        files.append(tmp_path / f"{index}.img")
        files[-1].write_bytes(data)
    status, lines = run_one_shot(small_batch_bundle, files, capsys)
    assert status == 0
    assert [len(line["predictions"]) for line in lines] == [3] * 5
