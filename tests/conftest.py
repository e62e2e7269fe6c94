"""Fixtures shared by every test layer."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-shapes bundle trained on a tiny budget (seconds): real TorchScript, real
    labels, not an accurate model."""
    from wanwu_worker.demo.train import train

    out = tmp_path_factory.mktemp("bundle") / "demo-shapes"
    train(out, seed=3, count=600, epochs=2, eval_seed=4, eval_count=120)
    return out
