"""Helpers for pool integration tests: pools over a real backend (Docker containers or
local processes), what each really runs, and test bundles."""

from __future__ import annotations

import json
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path

import docker

from scheduler.assembly import build_backend
from scheduler.backends.docker_common import MODEL_LABEL, POOL_LABEL, WORKER_LABEL
from scheduler.models import ModelCatalog
from scheduler.pool import WarmPool
from scheduler.settings import Settings
from tests.dockerutil import IMAGE
from tests.workerprocs import kill_all, signal_worker, worker_processes

BACKENDS = ("docker", "process")


def make_slow_bundle(dest: Path, name: str = "slow", iterations: int = 2000) -> Path:
    """A two-class TorchScript bundle that computes for a few seconds when the picture
    is bright (normalised mean > 1.5: ``iterations`` 384x384 products, about 2 s on one
    core of the test machine at 2,000) and answers at once otherwise; the warm-up input
    is zeros, so it starts fast."""
    import torch
    from torch import nn

    class Slow(nn.Module):
        def __init__(self, iterations: int) -> None:
            super().__init__()
            self.iterations = iterations

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.zeros(x.shape[0], 2)
            if bool(x.mean() > 1.5):
                m = torch.ones(384, 384) / 384
                acc = m
                for _ in range(self.iterations):
                    acc = acc @ m
                y = y + acc.sum()
            return y

    path = dest / name
    path.mkdir(parents=True)
    torch.jit.script(Slow(iterations)).save(str(path / "model.pt"))
    (path / "labels.txt").write_text("亮\n暗\n", encoding="utf-8")
    config = {
        "name": name,
        "format": "torchscript",
        "task": "classify",
        "input_size": [3, 32, 32],
        "resize": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "precision": "fp32",
        "gpu_memory_mb": 0,
    }
    (path / "model.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return path


def make_garbage_bundle(dest: Path, name: str, kind: str) -> Path:
    """A TorchScript bundle that loads and warms up like any other but whose answers the
    gateway must refuse: ``nan`` classifies every picture with NaN scores (its worker
    answers the NaN JSON does not have); ``wide`` embeds every picture in 300,000
    numbers, an answer of about 6 MB, over the client's bound for one image."""
    import torch
    from torch import nn

    class Nan(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            zeros = torch.zeros(x.shape[0], 2)
            return zeros / zeros

    class Wide(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ones(x.shape[0], 300_000) + x.mean()

    path = dest / name
    path.mkdir(parents=True)
    torch.jit.script({"nan": Nan, "wide": Wide}[kind]()).save(str(path / "model.pt"))
    if kind == "nan":
        (path / "labels.txt").write_text("甲\n乙\n", encoding="utf-8")
    config = {
        "name": name,
        "format": "torchscript",
        "task": "classify" if kind == "nan" else "embed",
        "input_size": [3, 32, 32],
        "resize": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "precision": "fp32",
        "gpu_memory_mb": 0,
    }
    (path / "model.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return path


def make_broken_bundle(models_dir: Path, name: str) -> Path:
    """A copy of demo-shapes under ``name`` whose model file is not TorchScript: the
    catalog accepts it (it checks files, not weights); loading it fails."""
    import shutil

    broken = models_dir / name
    shutil.copytree(models_dir / "demo-shapes", broken)
    config = json.loads((broken / "model.json").read_text(encoding="utf-8"))
    config["name"] = name
    (broken / "model.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (broken / "model.pt").write_bytes(b"not torchscript")
    return broken


def white_png() -> bytes:
    from PIL import Image

    from tests.images import encode

    return encode(Image.new("RGB", (48, 48), (255, 255, 255)))


@dataclass(frozen=True)
class Running:
    """A worker as the backend's ground truth shows it (`docker ps`, or /proc)."""

    worker_id: str
    model: str


class PoolFactory:
    """Builds pools over ``backend`` and answers, from outside the pool, what really
    runs: containers of the pool (Docker) or worker processes (process backend)."""

    def __init__(self, backend: str, client: docker.DockerClient, models: Path, sockets: Path) -> None:
        self.backend, self.client, self.models, self.sockets = backend, client, models, sockets
        self.pools: list[WarmPool] = []
        self.pool_ids: list[str] = []

    def settings(self, pool_id: str | None = None, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "max_workers": 2,
            "idle_ttl_s": 60.0,
            "queue_timeout_s": 60.0,
            "request_timeout_s": 30.0,
            "reap_interval_s": 0.2,
            "spawn_timeout_s": 60.0,
            "stem_cells": 0,  # the whole-worker path; stem cells: test_stem.py
            "worker_memory": "1g",
        }
        if self.backend == "process":
            # The machinery under test, as the gateway's user: a root gateway's workers run as
            # uid 10001, which this machine's interpreter (under /root) may not be open to;
            # tests/e2e/test_process_backend.py covers that user.
            values["worker_user"] = "gateway"
        values.update(overrides)
        return Settings(
            backend=self.backend,
            models_dir=self.models,
            pool_id=pool_id or "it" + uuid.uuid4().hex[:6],
            socket_dir=self.sockets,
            worker_image=IMAGE,
            **values,  # type: ignore[arg-type]
        )

    def __call__(self, pool_id: str | None = None, **overrides: object) -> WarmPool:
        settings = self.settings(pool_id, **overrides)
        pool = WarmPool(build_backend(settings), ModelCatalog(self.models), settings)
        self.pools.append(pool)
        self.pool_ids.append(settings.pool_id)
        pool.start()
        return pool

    def running(self, pool: WarmPool | str, all: bool = False) -> list[Running]:  # noqa: A002 - docker's word
        """The pool's workers: running ones, or with ``all`` also exited containers and
        workers whose directory, record or log a process left behind."""
        pool_id = pool if isinstance(pool, str) else pool.settings.pool_id
        if self.backend == "docker":
            rows = self.client.api.containers(all=all, filters={"label": f"{POOL_LABEL}={pool_id}"})
            return [Running(r["Labels"][WORKER_LABEL], r["Labels"][MODEL_LABEL]) for r in rows]
        found = [Running(w.worker_id, w.model) for w in worker_processes(pool_id)]
        if all and (self.sockets / pool_id).is_dir():
            alive = {w.worker_id for w in found}
            # Each worker leaves its directory, and beside it <id>.json and <id>.log.
            left = sorted({entry.name.split(".", 1)[0] for entry in (self.sockets / pool_id).iterdir()} - alive)
            found += [Running(worker_id, "?") for worker_id in left]
        return found

    def kill(self, pool: WarmPool, worker_id: str) -> None:
        """Kill a worker from outside the pool (`docker kill`, or SIGKILL)."""
        if self.backend == "docker":
            self.client.containers.get(f"wanwu-{pool.settings.pool_id}-{worker_id}").kill()
        else:
            signal_worker(pool.settings.pool_id, worker_id, signal.SIGKILL)

    def freeze(self, pool: WarmPool, worker_id: str) -> None:
        """Make a worker hang (`docker pause`, or SIGSTOP)."""
        if self.backend == "docker":
            self.client.containers.get(f"wanwu-{pool.settings.pool_id}-{worker_id}").pause()
        else:
            signal_worker(pool.settings.pool_id, worker_id, signal.SIGSTOP)

    def remove_leftovers(self, pool_id: str) -> list[str]:
        """Force-remove whatever the pool left (after a failed test); returns what was."""
        if self.backend == "docker":
            rows = self.client.api.containers(all=True, filters={"label": f"{POOL_LABEL}={pool_id}"})
            for row in rows:
                self.client.api.remove_container(row["Id"], force=True)
            return [row["Names"][0] for row in rows]
        left = [w.worker_id for w in kill_all(pool_id)]
        for pool in self.pools:  # the pool's cgroups go with its last worker
            bases = getattr(pool.backend, "cgroups", None)
            if pool.settings.pool_id == pool_id and bases is not None:
                left += [str(base) for base in set(bases.bases.values()) if base.exists()]
        return left
