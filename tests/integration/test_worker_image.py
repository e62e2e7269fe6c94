"""The worker image in real containers started with the production hardening."""

from __future__ import annotations

import json
from pathlib import Path

import docker
import pytest

from scheduler.errors import WorkerRejected
from scheduler.worker_client import WorkerClient
from tests.dockerutil import IMAGE, Containers
from tests.images import demo_images, png_header_only, truncated_png
from tests.photos import photo

pytestmark = pytest.mark.docker


def test_image_runs_as_non_root_without_wheels_or_compilers(docker_client: docker.DockerClient) -> None:
    config = docker_client.images.get(IMAGE).attrs["Config"]
    assert config["User"] and not config["User"].startswith(("0", "root"))
    found = docker_client.containers.run(
        IMAGE,
        entrypoint=["sh", "-c"],
        remove=True,
        network_mode="none",
        command=[
            "find / -xdev -name '*.whl' -type f; find / -xdev -name cc1 -type f;"
            " for t in pip pip3 gcc cc c++ g++ clang; do command -v $t; done; id -u"
        ],
        labels={"wanwu.managed": "true", "wanwu.pool": "inspect"},
    ).decode()
    lines = found.split()
    assert lines == ["10001"], f"unexpected files or tools in the image: {lines[:-1]}"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_predict_classifies_each_demo_class(containers: Containers, tmp_path: Path, fmt: str) -> None:
    images = demo_images(seed=777, fmt=fmt)
    inbox = containers.root / f"in-{fmt.lower()}"
    inbox.mkdir()
    names = {}
    for index, (label, data) in enumerate(images.items()):
        name = f"{index}.{fmt.lower()}"
        (inbox / name).write_bytes(data)
        names[f"/in/{name}"] = label
    (inbox / "broken.png").write_bytes(truncated_png())
    spec = containers.spec()
    container = containers.start(
        spec,
        ["predict", *names, "/in/broken.png", "/in/missing.png"],
        volumes={str(inbox): {"bind": "/in", "mode": "ro"}},
    )
    status = container.wait(timeout=120)
    out = container.logs(stdout=True, stderr=False).decode("utf-8")
    lines = [json.loads(line) for line in out.splitlines()]
    assert status["StatusCode"] == 1  # some files failed
    assert [line["file"] for line in lines] == [*names, "/in/broken.png", "/in/missing.png"]
    for line in lines[: len(names)]:
        assert line["predictions"][0]["label"] == names[line["file"]], line
        assert line["predictions"][0]["score"] > 0.5
    assert lines[-2]["error"]["code"] == "corrupt_image"
    assert lines[-1]["error"]["code"] == "unreadable"


def test_predict_without_mounted_model_uses_the_general_model(containers: Containers) -> None:
    """The image's one-shot predict answers a real photo with the built-in general model,
    in Chinese, with its groups: the cat is a cat, the coffee espresso or a cup."""
    inbox = containers.root / "in-builtin"
    inbox.mkdir()
    for name in ("chelsea.png", "coffee.png"):
        (inbox / name).write_bytes(photo(name))
    volumes = {str(inbox): {"bind": "/in", "mode": "ro"}}
    out = containers.run_once(IMAGE, ["predict", "/in/chelsea.png", "/in/coffee.png"], volumes=volumes)
    cat, coffee = (json.loads(line) for line in out.splitlines())
    assert cat["predictions"][0]["label"] in {"虎斑猫", "虎纹猫", "波斯猫", "暹罗猫", "埃及猫"}, cat
    assert cat["groups"][0]["label"] == "猫" and cat["confident"] is True
    assert coffee["predictions"][0]["label"] in {"意大利浓咖啡", "杯子", "咖啡杯"}, coffee


def test_the_demo_model_stays_in_the_image_by_name(containers: Containers) -> None:
    inbox = containers.root / "in-demo"
    inbox.mkdir()
    label, data = next(iter(demo_images(seed=5).items()))
    (inbox / "a.png").write_bytes(data)
    command = ["--model", "/opt/wanwu/models/demo-shapes", "predict", "/in/a.png"]
    out = containers.run_once(IMAGE, command, volumes={str(inbox): {"bind": "/in", "mode": "ro"}})
    assert json.loads(out)["predictions"][0]["label"] == label


def start_server(containers: Containers) -> tuple[WorkerClient, object]:
    return containers.serve(containers.spec())


def test_serve_answers_over_the_socket_and_survives_bad_uploads(containers: Containers) -> None:
    client, container = start_server(containers)
    try:
        health = client.health()
        assert health["status"] == "ready" and health["model"] == "demo-shapes"
        assert health["device"] == "cpu" and health["gpu_memory_mb"] is None
        images = demo_images(seed=99)
        for label, data in images.items():
            answer = client.predict(data, top_k=2)
            assert answer.predictions[0]["label"] == label
            assert answer.timing_ms["inference"] > 0
        bad = [b"", b"plain text", truncated_png(), png_header_only(100_000, 100_000)]
        for body in bad:
            with pytest.raises(WorkerRejected) as caught:
                client.predict(body)
            assert caught.value.status == 400
            label, data = next(iter(images.items()))
            assert client.predict(data).predictions[0]["label"] == label
        assert client.health()["requests"] == len(images) + len(bad)
    finally:
        client.close()
    container.reload()  # type: ignore[attr-defined]
    assert container.status == "running"  # type: ignore[attr-defined]


def test_container_is_hardened(docker_client: docker.DockerClient, containers: Containers) -> None:
    client, container = start_server(containers)
    client.close()
    host = container.attrs["HostConfig"]  # type: ignore[attr-defined]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert host["Memory"] > 0 and host["PidsLimit"] > 0
    probe = container.exec_run(  # type: ignore[attr-defined]
        ["sh", "-c", "id -u; touch /opt/x 2>&1 || true; touch /model/x 2>&1 || true; cat /proc/net/dev | grep -c ':'"]
    ).output.decode()
    lines = probe.splitlines()
    assert lines[0] == "10001"
    assert "Read-only file system" in lines[1] and "Read-only file system" in lines[2]
    assert lines[3] == "1"  # only the loopback interface
