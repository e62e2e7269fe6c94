"""Runtime settings on a real gateway over real worker containers: lowering N stops idle
containers at once and busy or starting ones once they are idle; raising it serves again."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import docker
import pytest
import requests

from tests.dockerutil import demo_bundle_dir, wait_for
from tests.gatewayproc import Gateway, running_gateway
from tests.images import demo_images
from tests.integration.pools import make_slow_bundle, white_png

pytestmark = pytest.mark.docker
TOKEN = "e2e-admin-token-long-enough"


def models(workdir: Path) -> None:
    demo = demo_bundle_dir(workdir / "models")
    other = workdir / "models" / "demo-other"
    shutil.copytree(demo, other)
    config = json.loads((other / "model.json").read_text(encoding="utf-8"))
    (other / "model.json").write_text(json.dumps({**config, "name": "demo-other"}), encoding="utf-8")
    make_slow_bundle(workdir / "models")


def predict(gw: Gateway, model: str, data: bytes) -> requests.Response:
    return requests.post(f"{gw.url}/v1/models/{model}/predict", files={"image": ("a.png", data)}, timeout=120)


def patch(gw: Gateway, body: dict[str, Any], token: str = TOKEN) -> requests.Response:
    return requests.patch(
        gw.url + "/v1/pool/settings", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def test_lowering_n_on_a_live_gateway_stops_idle_containers_and_waits_for_the_busy_one(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    models(tmp_path)
    settings = {
        "max_workers": "3",
        "stem_cells": "0",
        "admin_token": TOKEN,
        "state_file": str(tmp_path / "state.json"),
        "cache_enabled": "false",
        "request_timeout_s": "60",
    }
    with running_gateway(tmp_path, docker_client, **settings) as gw:
        image = next(iter(demo_images().values()))
        for model in ("demo-shapes", "demo-other"):
            assert predict(gw, model, image).status_code == 200
        assert predict(gw, "slow", image).status_code == 200  # warm (a dark picture is fast)
        slow: list[requests.Response] = []
        busy = threading.Thread(target=lambda: slow.append(predict(gw, "slow", white_png())))
        busy.start()
        wait_for(
            lambda: any(w["state"] == "busy" for w in requests.get(gw.url + "/v1/pool", timeout=5).json()["workers"]),
            30,
            "the slow request to reach its worker",
        )
        assert len(gw.containers(docker_client)) == 3
        assert patch(gw, {"max_workers": 1}, token="wrong").status_code == 401

        sent = time.monotonic()
        answer = patch(gw, {"max_workers": 1})
        assert answer.status_code == 200, answer.text
        assert answer.json()["changed"] == {"max_workers": {"old": 3, "new": 1}}
        wait_for(lambda: len(gw.containers(docker_client)) == 1, 30, "the idle containers to go")
        idle_gone_s = time.monotonic() - sent
        (left,) = gw.containers(docker_client)
        assert left["Labels"]["wanwu.model"] == "slow"  # the busy one is never killed

        busy.join(120)
        assert slow and slow[0].status_code == 200, slow and slow[0].text
        assert len(gw.containers(docker_client)) <= 1  # at most the new N once it finished
        after = predict(gw, "demo-shapes", image)  # evicts the idle slow worker: N is 1
        assert after.status_code == 200 and after.json()["cold_start"]
        assert [c["Labels"]["wanwu.model"] for c in gw.containers(docker_client)] == ["demo-shapes"]

        assert patch(gw, {"max_workers": 2}).status_code == 200
        assert predict(gw, "demo-other", image).status_code == 200
        assert sorted(c["Labels"]["wanwu.model"] for c in gw.containers(docker_client)) == ["demo-other", "demo-shapes"]
        metrics = requests.get(gw.url + "/metrics", timeout=10).text
        assert 'wanwu_settings_changes_total{setting="max_workers"} 2.0' in metrics
        assert "wanwu_pool_capacity 2.0" in metrics
        print(f"settings change took effect: idle containers gone {idle_gone_s:.3f} s after the PATCH was sent")


def pool(gw: Gateway) -> dict[str, Any]:
    body: dict[str, Any] = requests.get(gw.url + "/v1/pool", timeout=10).json()
    return body


def test_lowering_n_while_workers_start_and_serve_brings_the_pool_down_to_n(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """N=3 and one stem cell; six slow requests: one takes the stem cell, a replacement
    stem cell and a container for the second start while the rest wait. N drops to 1
    then: every surplus worker (stem cells count in N) stops once idle instead of being
    kept warm, and ten more requests do not grow the pool back."""
    models(tmp_path)
    (tmp_path / "models").chmod(0o755)  # stem cells read bundles through the directory itself
    settings = {
        "max_workers": "3",
        "stem_cells": "1",
        "admin_token": TOKEN,
        "state_file": str(tmp_path / "state.json"),
        "cache_enabled": "false",
        "idle_ttl_s": "600",  # no keep-alive reaping hides a surplus worker kept warm
        "queue_timeout_s": "240",  # the waiters are served one after another on one worker
        "request_timeout_s": "120",
    }
    with running_gateway(tmp_path, docker_client, **settings) as gw:
        wait_for(
            lambda: any(w["model"] == "(stem)" and w["state"] == "idle" for w in pool(gw)["workers"]),
            120,
            "a stem cell to be ready",
        )
        bright = white_png()
        answers: list[requests.Response] = []
        lock = threading.Lock()

        def send() -> None:
            answer = predict(gw, "slow", bright)  # computes for a few seconds
            with lock:
                answers.append(answer)

        six = [threading.Thread(target=send) for _ in range(6)]
        for thread in six:
            thread.start()
        states: list[str] = []

        def starting_and_busy() -> bool:
            states[:] = [w["state"] for w in pool(gw)["workers"]]
            return "busy" in states and "starting" in states

        wait_for(starting_and_busy, 120, "a worker busy and another starting", interval=0.02)
        sent = time.monotonic()
        answer = patch(gw, {"max_workers": 1})
        assert answer.status_code == 200, answer.text
        assert answer.json()["changed"] == {"max_workers": {"old": 3, "new": 1}}
        after = pool(gw)
        assert after["capacity"] == 1
        print(f"at the change: {states}; just after: {[(w['model'], w['state']) for w in after['workers']]}")

        for thread in six:
            thread.join(300)
        assert len(answers) == 6 and all(a.status_code == 200 for a in answers), [a.text for a in answers]
        wait_for(lambda: len(gw.containers(docker_client)) <= 1, 30, "the surplus containers to go")
        settled_s = time.monotonic() - sent

        dark = next(iter(demo_images().values()))
        for _ in range(10):
            answer = predict(gw, "slow", dark)  # a dark picture is fast
            assert answer.status_code == 200, answer.text
            assert len(gw.containers(docker_client)) <= 1
        time.sleep(2)  # a surplus kept warm, or a stem cell refilled over N, would show by now
        assert len(gw.containers(docker_client)) == 1  # (its label may say stem cell: labels are set at creation)
        final = pool(gw)
        assert final["capacity"] == 1
        assert [(w["model"], w["state"]) for w in final["workers"]] == [("slow", "idle")]  # no stem cell: no room
        assert final["reaps"]["evicted"] >= 2  # two of the three slow workers stopped as surplus
        print(f"settings change took effect: the pool was at N {settled_s:.3f} s after the PATCH was sent")
