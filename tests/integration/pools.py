"""Helpers for pool integration tests: pools over real Docker, and test bundles."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import docker

from scheduler.backends.docker import POOL_LABEL, ContainerLimits, DockerBackend
from scheduler.models import ModelCatalog
from scheduler.pool import WarmPool
from scheduler.settings import Settings
from tests.dockerutil import IMAGE


def make_slow_bundle(dest: Path, name: str = "slow") -> Path:
    """A two-class TorchScript bundle that computes for a few seconds when the picture
    is bright (normalised mean > 1.5) and answers at once otherwise; the warm-up input is
    zeros, so it starts fast."""
    import torch
    from torch import nn

    class Slow(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.zeros(x.shape[0], 2)
            if bool(x.mean() > 1.5):
                m = torch.ones(384, 384) / 384
                acc = m
                for _ in range(6000):
                    acc = acc @ m
                y = y + acc.sum()
            return y

    path = dest / name
    path.mkdir(parents=True)
    torch.jit.script(Slow()).save(str(path / "model.pt"))
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


class PoolFactory:
    def __init__(self, client: docker.DockerClient, models: Path, sockets: Path) -> None:
        self.client, self.models, self.sockets = client, models, sockets
        self.pools: list[WarmPool] = []
        self.pool_ids: list[str] = []

    def __call__(self, pool_id: str | None = None, **overrides: object) -> WarmPool:
        pool_id = pool_id or "it" + uuid.uuid4().hex[:6]
        values: dict[str, object] = {
            "max_workers": 2,
            "idle_ttl_s": 60.0,
            "queue_timeout_s": 60.0,
            "request_timeout_s": 30.0,
            "reap_interval_s": 0.2,
            "spawn_timeout_s": 60.0,
            "stem_cells": 0,  # the container path; stem cells: test_stem_docker.py
        }
        values.update(overrides)
        settings = Settings(
            models_dir=self.models, pool_id=pool_id, socket_dir=self.sockets, worker_image=IMAGE, **values
        )  # type: ignore[arg-type]
        backend = DockerBackend(IMAGE, pool_id, self.sockets, ContainerLimits(memory="1g"), settings.spawn_timeout_s)
        pool = WarmPool(backend, ModelCatalog(self.models), settings)
        pool.start()
        self.pools.append(pool)
        self.pool_ids.append(pool_id)
        return pool

    def containers(self, pool: WarmPool, all: bool = False) -> list[dict[str, Any]]:  # noqa: A002 - docker's word
        """Rows of `docker ps` for the pool (one API call, safe while containers go)."""
        rows: list[dict[str, Any]] = self.client.api.containers(
            all=all, filters={"label": f"{POOL_LABEL}={pool.settings.pool_id}"}
        )
        return rows
