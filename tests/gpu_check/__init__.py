"""wanwu's GPU check: the real gateway with the process backend on a machine with an
NVIDIA GPU and no Docker engine, measured; a JSON report and a summary on stdout.

    python -m tests.gpu_check [--out gpu-check.json] [--device cuda:0] [--requests 200]
                              [--skip STEP ...] [--keep-temp] [--models-dir DIR] [--cpu]

Steps (``--skip`` takes nvml, throughput, serve, reap, stem; a failing step records its
error and the check goes on; exit status 0 only if no step failed):

  env         GPU name, driver, CUDA driver and torch versions, NVML device count, memory.
  bundles     ``demo-shapes`` trained by its own recipe (``python -m
              wanwu_worker.demo.train --seed 0 --eval-seed 1``) and a ResNet-50 with
              random weights (timing only) saved as ``resnet50-fp32`` and
              ``resnet50-fp16``, into a temporary models directory (or ``--models-dir``,
              where matching bundles are reused).
  nvml        In this process: the CUDA context's cost, then 1, 4 and 16 GiB allocated
              with torch, NVML's used-memory delta against torch's allocated/reserved.
  throughput  In this process, no gateway: ResNet-50 images/s at batch 1, 16 and 64, fp32
              against fp16 (and how far fp16's answers are from fp32's).
  gateway     ``python -m gateway.cli serve`` with WANWU_BACKEND=process, N=3, no stem
              cells, fixed TTL of an hour, result cache off; on a GPU the watermarks are
              set 8 GiB above the memory in use at that moment (low: 4 GiB below high).
  serve       Per bundle over HTTP (POST /v1/models/NAME/predict): the cold start and its
              spawn breakdown, ``--requests`` warm requests one at a time (p50/p99), the
              device and GPU memory the worker reports (its /healthz over its socket),
              and NVML's figure for the worker's process.
  reap        Three idle workers used in a known order (fp16, demo, fp32: least recent
              first); a ballast tensor in this process pushes used GPU memory 512 MiB
              over the high watermark; /v1/pool is polled until they are reaped; the
              pool's log must show them reaped least recently used first. The ballast
              is then freed.
  shutdown    The gateway stops on SIGTERM and leaves no worker process behind.
  stem        A second gateway with one stem cell: each model's cold start by stem cell.

``--cpu`` runs the same flow on the CPU (smaller ResNet input, fewer requests, a quicker
demo training) with the nvml and reap steps recorded as skipped; the CI-side test uses it.
``--cpu --fake-gpu`` also runs the reap step, against a fake NVML (fake_nvml/pynvml.py,
put first on the gateway's PYTHONPATH) whose used memory the ballast raises: the pool's
GPU-pressure reaping, the check's ordering and its LRU verdict run for real without a GPU.
The gateway runs in its own session and is always stopped (SIGTERM, then SIGKILL for it
and any worker process left), on Ctrl-C too; temporary directories are removed unless
``--keep-temp`` (the gateway logs are in the work directory named in the report).

On the GPU machine (torch, torchvision, timm, nvidia-ml-py and pillow installed, no
network), only the gateway's own pure-Python dependencies are missing. Here, with a
package index:

    make gpu-wheels        # wheels of flask, waitress, docker, click, ... into gpu-wheels/ (about 3 MB)

(for CPython 3.11 and 3.12, the manylinux_2_28 x86-64 ones where a wheel is binary;
GPU_PYTHONS and GPU_PLATFORM change that).

Carry the repository with ``gpu-wheels/`` over; there, from the repository root, with the
Python that has torch (a venv made with ``--system-site-packages`` on top of it works too):

    python3 -m pip install --no-index --find-links gpu-wheels -r gpu-wheels/requirements.txt
    python3 -m tests.gpu_check --out gpu-check.json

Installing the project itself is not needed (the check puts the repository and
``worker_image`` on PYTHONPATH for the gateway and its workers); if wanted,
``python3 -m pip install --no-index --find-links gpu-wheels -e .`` also works offline
(gpu-wheels holds setuptools for the build; torch is not a dependency of the project
itself, and pillow and nvidia-ml-py are already installed).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _worker_importable() -> None:
    """``wanwu_worker`` lives in worker_image/; without ``pip install -e .`` put it on
    the path, as the gateway and its workers get it on PYTHONPATH."""
    if importlib.util.find_spec("wanwu_worker") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "worker_image"))


_worker_importable()
