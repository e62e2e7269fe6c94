"""HTTP through the real gateway and real worker containers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import docker
import pytest
import requests

from tests.gatewayproc import Gateway
from tests.images import demo_images, png_header_only, truncated_png
from tests.promtext import metric

pytestmark = pytest.mark.docker


def test_the_original_client_call_gets_each_demo_class_right(gateway: Gateway, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for label, data in demo_images(seed=2026).items():
        path = tmp_path / f"{label}.png"
        path.write_bytes(data)
        with path.open("rb") as f:
            response = requests.post(gateway.url + "/predict", files={"image": f})
        assert response.status_code == 200, response.text
        assert response.json()["result"] == label


def reference_answers(gateway: Gateway, pictures: list[tuple[str, bytes]], top_k: int) -> list[list[dict[str, object]]]:
    """What the served bundle answers for each picture, computed in-process."""
    from wanwu_worker.bundle import load_bundle
    from wanwu_worker.predictor import Predictor

    predictor = Predictor(load_bundle(gateway.models_dir / "demo-shapes"), device="cpu")
    return [predictor.predict(data, top_k).predictions for _, data in pictures]


def test_twenty_concurrent_clients_get_their_own_answers(gateway: Gateway, docker_client: docker.DockerClient) -> None:
    pictures = []
    for seed in range(4):
        pictures += list(demo_images(seed=900 + seed, fmt="JPEG").items())
    pictures = pictures[:20]
    expected = reference_answers(gateway, pictures, top_k=6)
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(len(gateway.containers(docker_client)))

    watcher = threading.Thread(target=watch)
    watcher.start()

    def call(item: tuple[int, tuple[str, bytes]]) -> tuple[int, str, requests.Response]:
        index, (label, data) = item
        model = "demo-shapes"
        response = requests.post(
            f"{gateway.url}/v1/models/{model}/predict?top_k=6",
            files={"image": (f"{index}.jpg", data)},
            headers={"X-Request-ID": f"client-{index}"},
            timeout=120,
        )
        return index, label, response

    with ThreadPoolExecutor(20) as clients:
        results = list(clients.map(call, enumerate(pictures)))
    done.set()
    watcher.join()
    assert len(results) == 20
    answered = 0
    for index, label, response in results:
        assert response.headers["X-Request-ID"] == f"client-{index}"
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1
            continue
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["request_id"] == f"client-{index}"
        # Its own picture's answer: every label's score as the model gives it in-process.
        got = {p["label"]: p["score"] for p in body["predictions"]}
        want = {p["label"]: p["score"] for p in expected[index]}
        assert got.keys() == want.keys() and all(abs(got[k] - want[k]) < 1e-4 for k in want), (index, label)
        answered += 1
    assert answered >= 1
    assert max(seen) <= 2


@pytest.mark.parametrize(
    ("files", "status", "code"),
    [
        ({"image": ("a.png", b"")}, 400, "empty"),
        ({"image": ("a.png", b"hello, not a picture")}, 415, "not_an_image"),
        ({"image": ("a.png", truncated_png())}, 400, "corrupt_image"),
        ({"image": ("a.png", png_header_only(100_000, 100_000))}, 413, "image_too_large"),
        ({"image": ("a.png", b"\x89PNG" + b"x" * (3 * 2**20))}, 413, "too_large"),
        ({"picture": ("a.png", next(iter(demo_images().values())))}, 400, "missing_field"),
    ],
)
def test_bad_uploads_get_json_errors_and_the_next_request_works(
    gateway: Gateway, files: dict[str, tuple[str, bytes]], status: int, code: str
) -> None:
    response = requests.post(gateway.url + "/predict", files=files, timeout=30)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"]["code"] == code
    label, data = next(iter(demo_images(seed=31).items()))
    good = requests.post(gateway.url + "/predict", files={"image": ("b.png", data)}, timeout=60)
    assert good.status_code == 200 and good.json()["result"] == label


def test_metrics_agree_with_what_was_sent(gateway: Gateway) -> None:
    before = requests.get(gateway.url + "/metrics", timeout=10).text
    pictures = list(demo_images(seed=4040).values())[:3]
    for data in pictures:
        assert requests.post(gateway.url + "/predict", files={"image": ("p.png", data)}, timeout=60).status_code == 200
    assert requests.post(gateway.url + "/predict", files={"image": ("p.png", pictures[0])}, timeout=60).json()["cached"]
    requests.post(gateway.url + "/predict", files={"image": ("t.txt", b"text")}, timeout=10)
    requests.post(gateway.url + "/v1/models/nope/predict", files={"image": ("p.png", pictures[0])}, timeout=10)
    after = requests.get(gateway.url + "/metrics", timeout=10).text

    def delta(series: str) -> float:
        return metric(after, series) - metric(before, series)

    assert delta('wanwu_requests_total{model="demo-shapes",outcome="ok"}') == 4
    assert delta('wanwu_cache_hits_total{model="demo-shapes"}') == 1
    assert delta('wanwu_requests_total{model="demo-shapes",outcome="not_an_image"}') == 1
    assert delta('wanwu_requests_total{model="-",outcome="unknown_model"}') == 1
    served = delta('wanwu_cold_starts_total{model="demo-shapes"}') + delta('wanwu_warm_hits_total{model="demo-shapes"}')
    assert served == 3
    assert delta('wanwu_request_seconds_count{model="demo-shapes"}') == 4
    pool = requests.get(gateway.url + "/v1/pool", timeout=10).json()
    idle = sum(1 for w in pool["workers"] if w["model"] == "demo-shapes" and w["state"] == "idle")
    assert metric(after, 'wanwu_workers{model="demo-shapes",state="idle"}') == idle


def test_pool_and_models_endpoints(gateway: Gateway) -> None:
    models = requests.get(gateway.url + "/v1/models", timeout=10).json()["models"]
    assert models[0]["name"] == "demo-shapes" and len(models[0]["labels"]) == 6
    pool = requests.get(gateway.url + "/v1/pool", timeout=10).json()
    assert pool["capacity"] == 2 and len(pool["workers"]) <= 2
