"""The worker image's wheelhouse: the cuda flavour downloads without the host's
find-links (where a local torch+cpu may lie) and refuses a CPU torch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.backends.docker_image import check_wheelhouse, pip_environment
from scheduler.errors import ImageBuildError

CUDA_WHEELS = [
    "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl",
    "torchvision-0.28.0-cp311-cp311-manylinux_2_28_x86_64.whl",
    "nvidia_cuda_runtime-13.0.96-py3-none-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
    "pillow-13.0.0-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
]
CPU_TORCH = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"


def pip_find_links(environ: dict[str, str]) -> list[str]:
    """find-links as the host's pip (the one fill_wheelhouse runs) reads it in ``environ``."""
    script = (
        "from pip._internal.commands import create_command\n"
        "options, _ = create_command('download').parse_args([])\n"
        "print('\\n'.join(options.find_links))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=environ, capture_output=True, text=True, check=True)
    return result.stdout.split()


def test_cuda_download_sees_no_find_links_from_config_or_environment(tmp_path: Path) -> None:
    local = tmp_path / "wheels"
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nfind-links = {local}\n")
    host = {**os.environ, "PIP_CONFIG_FILE": str(config)}
    host.pop("PIP_FIND_LINKS", None)
    assert str(local) in pip_find_links(pip_environment("cpu", host))
    assert pip_find_links(pip_environment("cuda", host)) == []
    assert pip_find_links(pip_environment("cuda", {**host, "PIP_FIND_LINKS": str(local)})) == []


def test_cuda_download_keeps_the_rest_of_the_host_environment() -> None:
    host = {"HTTPS_PROXY": "http://proxy:3128", "PIP_EXTRA_INDEX_URL": "file:///mirror/simple"}
    assert pip_environment("cuda", host) == {**host, "PIP_FIND_LINKS": " "}
    assert pip_environment("cpu", host) == host


def test_cuda_wheelhouse_with_cuda_torch_passes() -> None:
    check_wheelhouse("cuda", CUDA_WHEELS)


@pytest.mark.parametrize(
    ("wheels", "message"),
    [
        ([*CUDA_WHEELS, CPU_TORCH], "holds a CPU build of torch (torch-2.13.0+cpu-"),
        ([CPU_TORCH, *CUDA_WHEELS[1:]], "holds a CPU build of torch"),
        ([name for name in CUDA_WHEELS if not name.startswith("nvidia_")], "lacks torch or the nvidia-*"),
    ],
)
def test_cuda_wheelhouse_refuses_a_cpu_torch_or_no_cuda_runtime(wheels: list[str], message: str) -> None:
    with pytest.raises(ImageBuildError) as caught:
        check_wheelhouse("cuda", wheels)
    assert message in str(caught.value)


def test_cpu_wheelhouse_is_not_checked_for_cuda() -> None:
    check_wheelhouse("cpu", [CPU_TORCH, "pillow-13.0.0-cp311-cp311-manylinux_2_28_x86_64.whl"])
