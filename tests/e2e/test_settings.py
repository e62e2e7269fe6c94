"""Runtime settings on a real gateway over real worker containers: lowering N stops idle
containers at once and the busy one once it finishes; raising it serves again."""

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
TOKEN = "e2e-admin-token"


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
