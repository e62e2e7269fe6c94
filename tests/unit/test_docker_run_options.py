"""The Docker backend's container options for GPUs: what `docker run --gpus` sends."""

from __future__ import annotations

from pathlib import Path

from docker.types import DeviceRequest

from scheduler.backends.docker_container import WorkerSpec, run_options


def spec(gpus: tuple[str, ...] = ()) -> WorkerSpec:
    return WorkerSpec(
        image="wanwu-worker:cuda",
        pool_id="unit",
        model="demo-shapes",
        worker_id="w1",
        model_dir=Path("/models/demo-shapes"),
        socket_dir=Path("/run/wanwu-sockets/w1"),
        gpus=gpus,
    )


def test_gpus_become_one_device_request_with_the_gpu_capability() -> None:
    options = run_options(spec(gpus=("0",)))
    assert options["device_requests"] == [DeviceRequest(device_ids=["0"], capabilities=[["gpu"]])]


def test_several_gpus_share_one_request() -> None:
    options = run_options(spec(gpus=("0", "GPU-5c0e3b1a")))
    assert options["device_requests"] == [DeviceRequest(device_ids=["0", "GPU-5c0e3b1a"], capabilities=[["gpu"]])]


def test_no_gpus_no_device_request() -> None:
    assert "device_requests" not in run_options(spec())
