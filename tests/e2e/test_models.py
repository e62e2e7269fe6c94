"""Label subsets, embeddings and CPU fallback through the real gateway and real worker
containers."""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest
import requests

from scheduler.backends.docker_image import export_builtin_model
from tests.dockerutil import IMAGE
from tests.gatewayproc import ROOT, Gateway, running_gateway
from tests.images import demo_images

pytestmark = pytest.mark.docker

EMBED = "demo-shapes-embed"


def post(gateway: Gateway, route: str, data: bytes, **params: str) -> requests.Response:
    return requests.post(
        f"{gateway.url}{route}",
        files={"image": ("x.png", data)},
        params=params,
        headers={"Cache-Control": "no-cache"},
        timeout=60,
    )


def test_subset_scores_match_the_model_run_in_process(gateway: Gateway) -> None:
    from wanwu_worker.bundle import load_bundle
    from wanwu_worker.predictor import Predictor

    predictor = Predictor(load_bundle(gateway.models_dir / "demo-shapes"), device="cpu")
    subset = ("蓝色方形", "红色圆形", "绿色方形", "红色方形")
    for label, data in demo_images(seed=31).items():
        answer = post(gateway, "/v1/models/demo-shapes/predict", data, labels=",".join(subset), top_k="4")
        assert answer.status_code == 200, answer.text
        got = answer.json()["predictions"]
        logits = predictor.predict(data, 1, labels=subset).result["logits"]
        weights = [math.exp(v - max(logits)) for v in logits]
        expected = sorted(zip(subset, (w / sum(weights) for w in weights), strict=True), key=lambda item: -item[1])
        assert [p["label"] for p in got] == [name for name, _ in expected], label
        for p, (_, score) in zip(got, expected, strict=True):
            assert p["score"] == pytest.approx(score, abs=1e-5)
        if label in subset:
            assert got[0]["label"] == label


def test_an_unknown_label_is_a_400_naming_it_and_the_worker_is_untouched(gateway: Gateway) -> None:
    data = demo_images(seed=32)["红色圆形"]
    bad = post(gateway, "/v1/models/demo-shapes/predict", data, labels="红色圆形,紫色星形")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "unknown_label"
    assert "紫色星形" in bad.json()["error"]["message"]
    assert post(gateway, "/v1/models/demo-shapes/predict", data).json()["result"] == "红色圆形"


def test_the_demo_embedding_model_works_out_of_the_box(gateway: Gateway) -> None:
    models = {m["name"]: m for m in requests.get(f"{gateway.url}/v1/models", timeout=10).json()["models"]}
    assert models[EMBED]["task"] == "embed" and models[EMBED]["embedding_dim"] == 64
    first, second = demo_images(seed=41), demo_images(seed=42)
    a = {label: post(gateway, f"/v1/models/{EMBED}/embed", data).json() for label, data in first.items()}
    b = {label: post(gateway, f"/v1/models/{EMBED}/embed", data).json() for label, data in second.items()}
    for answer in (*a.values(), *b.values()):
        assert answer["dim"] == 64 and math.fsum(v * v for v in answer["embedding"]) == pytest.approx(1.0, abs=1e-4)

    def distance(x: dict[str, object], y: dict[str, object]) -> float:
        return math.dist(x["embedding"], y["embedding"])  # type: ignore[arg-type]

    for label in first:  # two pictures of a class are closer than pictures of different classes
        others = [distance(a[label], b[other]) for other in second if other != label]
        assert distance(a[label], b[label]) < min(others), label
    packed = post(gateway, f"/v1/models/{EMBED}/embed", first["蓝色圆形"], encoding="base64").json()
    values = struct.unpack("<64f", base64.b64decode(packed["embedding"]))
    assert values == pytest.approx(a["蓝色圆形"]["embedding"], abs=1e-6)
    wrong = post(gateway, f"/v1/models/{EMBED}/predict", first["蓝色圆形"])
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_task"


def test_a_model_with_cpu_fallback_is_served_on_the_cpu_when_no_gpu_has_room(
    docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    """One fake GPU (tests/gpu_check/fake_nvml) reads as 97 % full: the fallback model
    gets a CPU worker; a model without the flag waits and is refused."""
    state = tmp_path / "nvml.json"
    state.write_text(json.dumps({"total_mib": 16384, "used_mib": 15900}), encoding="utf-8")
    models = tmp_path / "gw" / "models"
    fallback = models / "demo-fallback"
    export_builtin_model(IMAGE, "demo-shapes", tmp_path / "files")
    shutil.copytree(tmp_path / "files" / "demo-shapes", fallback)
    config = json.loads((fallback / "model.json").read_text(encoding="utf-8"))
    config.update(name="demo-fallback", cpu_fallback=True, gpu_memory_mb=2048)
    (fallback / "model.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    fake = {"PYTHONPATH": str(ROOT / "tests" / "gpu_check" / "fake_nvml"), "WANWU_GPU_CHECK_FAKE_NVML": str(state)}
    with running_gateway(
        tmp_path / "gw",
        docker_client,
        fake,
        gpus="0",
        stem_cells="0",
        max_workers="2",
        queue_timeout_s="3",
        default_model="demo-shapes",
    ) as gw:
        data = demo_images(seed=51)["绿色方形"]
        answer = post(gw, "/v1/models/demo-fallback/predict", data)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["result"] == "绿色方形" and body["cpu_fallback"] is True and body["cold_start"] is True
        pool = requests.get(f"{gw.url}/v1/pool", timeout=10).json()
        (worker,) = pool["workers"]
        assert worker["model"] == "demo-fallback" and worker["device"] == "cpu"
        assert pool["counters"]["cpu_fallbacks"] == 1
        again = post(gw, "/v1/models/demo-fallback/predict", data).json()
        assert again["cold_start"] is False and again["cpu_fallback"] is True  # the CPU worker is reused
        refused = post(gw, "/v1/models/demo-shapes/predict", data)  # no fallback: no GPU room, no answer
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] in ("no_capacity", "model_unavailable")
        assert "Retry-After" in refused.headers
        (container,) = gw.containers(docker_client)
        inspected = docker_client.api.inspect_container(container["Id"])
        assert not inspected["HostConfig"].get("DeviceRequests")  # no GPU asked of the engine
        assert "CUDA_VISIBLE_DEVICES=" in inspected["Config"]["Env"]


def test_backfill_with_an_embedding_model_writes_one_vector_per_file(gateway: Gateway, tmp_path: Path) -> None:
    from tests.e2e.test_backfill import backfill, lines_of
    from tests.images import demo_tree, truncated_png

    source = tmp_path / "images"
    expected = demo_tree(source, 40, seed=61)
    (source / "bad.png").write_bytes(truncated_png())
    out = tmp_path / "vectors.jsonl"
    job = backfill(gateway, source, out, "--model", EMBED, "--batch-size", "8")
    _, err = job.communicate(timeout=300)
    assert job.returncode == 1, err.decode()  # one file failed: bad.png
    lines = {str(line["file"]): line for line in lines_of(out)}
    assert set(lines) == {*expected, "bad.png"}
    assert lines.pop("bad.png")["error"]["code"] == "corrupt_image"  # type: ignore[index]
    for line in lines.values():
        vector = line["embedding"]
        assert line["dim"] == 64 and len(vector) == 64  # type: ignore[arg-type]
        assert math.fsum(v * v for v in vector) == pytest.approx(1.0, abs=1e-4)  # type: ignore[union-attr]


def test_a_bundle_replaced_with_bundle_create_force_is_served_as_replaced(
    docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    """The reproduction from the issue: the same picture, after ``wanwu bundle create
    --force`` with the labels reversed, comes back with the new label within the
    catalog's rescan interval, without a restart, though the cache and a warm worker
    held the old answer."""
    files = tmp_path / "files"
    demo = export_builtin_model(IMAGE, "demo-shapes", files)
    labels = (demo / "labels.txt").read_text(encoding="utf-8").split()
    reversed_labels = files / "reversed.txt"
    reversed_labels.write_text("\n".join(reversed(labels)) + "\n", encoding="utf-8")
    models = tmp_path / "gateway" / "models"
    models.mkdir(parents=True)
    models.chmod(0o755)
    config = json.loads((demo / "model.json").read_text(encoding="utf-8"))

    def create(labels_file: Path, *extra: str) -> None:
        command = [sys.executable, "-m", "gateway.cli", "bundle", "create", "shapes"]
        command += ["--model", str(demo / "model.pt"), "--labels", str(labels_file), "--out", str(models / "shapes")]
        command += ["--format", "torchscript", "--input-size", str(config["input_size"][1])]
        command += ["--resize", str(config["resize"]), "--mean", ",".join(map(str, config["mean"]))]
        command += ["--std", ",".join(map(str, config["std"])), *extra]
        env = {**os.environ, "WANWU_WORKER_IMAGE": IMAGE, "WANWU_MODELS_DIR": str(models)}
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]

    create(demo / "labels.txt")
    picture = demo_images(seed=71)["红色圆形"]
    settings = {"max_workers": "1", "stem_cells": "0", "default_model": "shapes", "idle_ttl_s": "300"}
    with running_gateway(tmp_path / "gateway", docker_client, **settings) as gw:

        def ask() -> dict[str, object]:
            answer = requests.post(
                f"{gw.url}/v1/models/shapes/predict", files={"image": ("x.png", picture)}, timeout=60
            )
            assert answer.status_code == 200, answer.text
            body: dict[str, object] = answer.json()
            return body

        assert ask()["result"] == "红色圆形"
        assert ask()["cached"] is True
        (old,) = gw.containers(docker_client)
        create(reversed_labels, "--force")
        swapped = labels[len(labels) - 1 - labels.index("红色圆形")]
        deadline = time.monotonic() + 30  # the rescan interval (5 s), a reaper pass and a cold start
        while (body := ask())["result"] != swapped and time.monotonic() < deadline:
            time.sleep(0.5)
        assert body["result"] == swapped and body["cached"] is False, body
        assert old["Id"] not in {c["Id"] for c in gw.containers(docker_client)}  # the old worker was retired
        served = requests.get(f"{gw.url}/v1/pool", timeout=10).json()
        assert served["reaps"]["replaced"] == 1, served["reaps"]
