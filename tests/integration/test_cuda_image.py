"""The cuda worker image (`make image-cuda`): the registry's CUDA build of torch, which
on a machine without a GPU still serves the demo model from the CPU in a container
started with the production hardening. Skipped where the image has not been built:
`make test` builds only the cpu image."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from scheduler.backends.docker_image import export_builtin_model
from tests.dockerutil import Containers
from tests.images import demo_images

pytestmark = pytest.mark.docker

CUDA_IMAGE = "wanwu-worker:cuda"

# Runs in the image: what torch was built with and what it finds here. No GPU is
# requested, so CUDA must be unavailable (on a GPU host too).
TORCH_PROBE = """
import json, torch, torchvision, torchvision.ops, onnxruntime
boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 1.9], [5.0, 5.0, 6.0, 6.0]])
kept = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                  "available": torch.cuda.is_available(), "torchvision": torchvision.__version__, "nms": kept,
                  "onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}))
"""


@pytest.fixture(scope="module")
def cuda_engine() -> docker.DockerClient:
    """The engine (missing: a failure, as in every Docker test), or a skip if the cuda
    image is not built."""
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except docker.errors.DockerException as exc:
        raise RuntimeError(f"no Docker engine ({exc}): run `make engine` or deploy/ensure-docker.sh") from exc
    try:
        client.images.get(CUDA_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"{CUDA_IMAGE} is not built; `make image-cuda` builds it (several GB of wheels)")
    return client


@pytest.fixture(scope="module")
def cuda_containers(cuda_engine: docker.DockerClient) -> Iterator[Containers]:
    # Socket paths must stay short (108 bytes): a short root, not pytest's tmp path.
    with tempfile.TemporaryDirectory(prefix="wanwu-cuda-", dir="/tmp") as root:
        # The cuda image's own demo bundle: trained at its build, with its torch.
        model_dir = export_builtin_model(CUDA_IMAGE, "demo-shapes", Path(root) / "models")
        made = Containers(cuda_engine, Path(root), model_dir)
        yield made
        made.close()


def test_image_is_labelled_cuda_and_ships_a_cuda_build_of_torch(
    cuda_engine: docker.DockerClient, cuda_containers: Containers
) -> None:
    image = cuda_engine.images.get(CUDA_IMAGE)
    assert image.labels["wanwu.flavor"] == "cuda"
    out = cuda_containers.run_once(CUDA_IMAGE, ["-c", TORCH_PROBE], entrypoint=["python"])
    probe = json.loads(out.decode().strip().splitlines()[-1])
    assert probe["cuda"] is not None, probe  # not a CPU build
    assert probe["torch"].split("+")[0] == "2.13.0" and "+cpu" not in probe["torch"], probe  # e.g. 2.13.0+cu130
    assert probe["cudnn"] is not None, probe
    assert probe["available"] is False, probe
    assert probe["torchvision"].startswith("0.28.0"), probe  # the release built for torch 2.13.0
    assert probe["nms"] == [0, 2], probe  # torchvision's compiled operators load
    assert probe["onnxruntime"] == "1.31.1" and "CUDAExecutionProvider" in probe["providers"], probe  # the GPU build


def test_worker_falls_back_to_the_cpu_and_classifies_the_demo_classes(cuda_containers: Containers) -> None:
    client, container = cuda_containers.serve(cuda_containers.spec(image=CUDA_IMAGE), timeout=120)
    try:
        health = client.health()
        assert health["status"] == "ready" and health["model"] == "demo-shapes"
        assert health["device"] == "cpu" and health["gpu_memory_mb"] is None
        for label, data in demo_images(seed=4242).items():
            answer = client.predict(data, top_k=2)
            assert answer.predictions[0]["label"] == label, answer.predictions
            assert answer.predictions[0]["score"] > 0.5
    finally:
        client.close()
    logs = container.logs().decode("utf-8", "replace")
    assert "serving model demo-shapes" in logs and "(device cpu" in logs, logs[-2000:]
    assert "Traceback" not in logs, logs[-2000:]
