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


@pytest.fixture(scope="session")
def general_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The general model's classify and embed bundles, built from the installed weights
    package as the image builds them, as TorchScript (the exports every format shares
    are checked against the network either way; tracing takes a second where the ONNX
    export takes twenty)."""
    from wanwu_worker.general.build import build

    root = tmp_path_factory.mktemp("general")
    build(root / "general", root / "general-embed", fmt="torchscript")
    return root / "general", root / "general-embed"
