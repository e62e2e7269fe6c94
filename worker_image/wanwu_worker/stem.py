"""A stem cell: a worker with the runtime imported (torch, and onnxruntime with a first
CPU session made where it is installed; on a GPU, the CUDA context made; Pillow's
decoders and the preprocessing kernels run once) but no model yet. ``load`` turns it
into a worker of any bundle under the models root, with the same loading, checks and
warm-up as a worker started for that model."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import torch

from .bundle import check_name, load_bundle
from .predictor import Predictor, choose_device
from .preprocess import DEFAULT_MAX_PIXELS, decode, normalise, resize_and_crop, to_pixels
from .runtimes import prime_onnxruntime

MODELS_ROOT = "/models"


class Stem:
    def __init__(
        self,
        models_root: str | Path = MODELS_ROOT,
        device: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        threads: int | None = None,
        preprocess_threads: int | None = None,
    ) -> None:
        started = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        self.models_root = Path(models_root)
        self.device = choose_device(device)
        if self.device.type == "cuda":  # pay for the CUDA context now, not on the first load
            torch.zeros(1, device=self.device)
            torch.cuda.synchronize(self.device)
        self.max_pixels = max_pixels
        self.threads = threads
        self.preprocess_threads = preprocess_threads
        self.onnxruntime = prime_onnxruntime(self.device)
        _prime_images(self.device)
        self.ready_ms = round((time.perf_counter() - started) * 1000, 3)

    def load(self, directory: str) -> Predictor:
        """Load the bundle in ``models_root/directory``. Raises InputError for a name
        that is not a plain directory name, BundleError for a bundle that fails to
        load, check or warm up."""
        check_name(directory)
        bundle = load_bundle(self.models_root / directory)
        return Predictor(
            bundle,
            device=str(self.device),
            max_pixels=self.max_pixels,
            threads=self.threads,
            preprocess_threads=self.preprocess_threads,
        )

    def health(self) -> dict[str, Any]:
        gpu_mb = None
        if self.device.type == "cuda":
            gpu_mb = round(torch.cuda.memory_reserved(self.device) / 2**20, 1)
        return {
            "status": "stem",
            "model": None,
            "device": str(self.device),
            "gpu_memory_mb": gpu_mb,
            "ready_ms": self.ready_ms,
            "onnxruntime": self.onnxruntime,  # primed while waiting (False: missing, or it failed)
            "threads": torch.get_num_threads(),
            "pid": os.getpid(),
        }


def _prime_images(device: torch.device) -> None:
    """Decode a JPEG and a PNG and run them through the preprocessing path once: Pillow
    imports its decoders and torch sets up those kernels on first use, which the first
    model's warm-up would otherwise pay for after the request arrived."""
    from PIL import Image

    picture = Image.new("RGB", (96, 64), (90, 140, 200))
    scale = torch.full((3,), 0.5, device=device)
    for fmt in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        picture.save(buffer, fmt)
        pixels = to_pixels(resize_and_crop(decode(buffer.getvalue(), draft=(64, 64)), 64, (56, 56)))
        normalise(pixels.unsqueeze(0).to(device), scale, scale)
