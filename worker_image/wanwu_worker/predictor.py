"""Load a bundle's TorchScript model once and classify images with it."""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .bundle import Bundle
from .errors import BundleError, InferenceError, InputError
from .preprocess import DEFAULT_MAX_PIXELS, decode, resize_and_crop, to_tensor

log = logging.getLogger(__name__)

MAX_TOP_K = 1000


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)


def choose_device(requested: str | None = None) -> torch.device:
    """``requested`` ("cpu", "cuda", "cuda:1") or, by default, the first GPU if CUDA
    works, else the CPU."""
    if requested:
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BundleError(f"device {requested!r} was asked for but CUDA is not available")
        return device
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def parse_top_k(raw: str | None, default: int = 5) -> int:
    """Parse the ``top_k`` query parameter: an integer from 1 to MAX_TOP_K."""
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"top_k is {raw!r}; expected an integer from 1 to {MAX_TOP_K}", code="bad_parameter") from None
    if not 1 <= value <= MAX_TOP_K:
        raise InputError(f"top_k is {value}; expected an integer from 1 to {MAX_TOP_K}", code="bad_parameter")
    return value


@dataclass(frozen=True)
class Prediction:
    predictions: list[dict[str, Any]]
    timing_ms: dict[str, float]


class Predictor:
    """One loaded model. ``predict`` is safe to call from several threads: inference
    runs one request at a time, decoding and preprocessing run outside the lock."""

    def __init__(
        self,
        bundle: Bundle,
        device: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        threads: int | None = None,
    ) -> None:
        if threads:
            # One request is one small image: intra-op threads mostly wait to be woken,
            # and workers running side by side would fight over the cores.
            torch.set_num_threads(threads)
        self.bundle = bundle
        self.max_pixels = max_pixels
        self.device = choose_device(device)
        # fp16 only pays (and is only well supported) on a GPU; on the CPU run fp32.
        self.precision = "fp16" if bundle.precision == "fp16" and self.device.type == "cuda" else "fp32"
        if bundle.precision != self.precision:
            log.warning(
                "model %s asks for %s; running %s on %s", bundle.name, bundle.precision, self.precision, self.device
            )
        self._dtype = torch.float16 if self.precision == "fp16" else torch.float32
        self._lock = threading.Lock()
        self.requests = 0
        started = time.perf_counter()
        self.model = self._load()
        self.load_ms = _ms(started)
        started = time.perf_counter()
        self._check_output()
        self._warm_up()
        self.warmup_ms = _ms(started)

    def _load(self) -> torch.jit.ScriptModule:
        try:
            model = torch.jit.load(str(self.bundle.model_file), map_location=self.device)
        except Exception as exc:
            raise BundleError(f"{self.bundle.model_file}: not a loadable TorchScript archive: {exc}") from exc
        model.eval()
        return model.to(dtype=self._dtype)

    def _check_output(self) -> None:
        """The warm-up pass: runs the model once so the first real request does not pay
        for lazy initialisation, and checks the output matches labels.txt."""
        dummy = torch.zeros((1, *self.bundle.input_size), dtype=self._dtype, device=self.device)
        try:
            with torch.inference_mode():
                out = self.model(dummy)
        except Exception as exc:
            raise BundleError(
                f"{self.bundle.model_file}: warm-up forward pass on input {list(dummy.shape)} failed: {exc}"
            ) from exc
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 1:
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise BundleError(f"{self.bundle.model_file}: output is {shape}; expected [batch, classes]")
        classes = out.shape[1]
        if classes != len(self.bundle.labels):
            raise BundleError(
                f"{self.bundle.path / 'labels.txt'}: has {len(self.bundle.labels)} labels "
                f"but {self.bundle.model_file.name} outputs {classes} classes"
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _warm_up(self, passes: int = 3) -> None:
        """Run whole requests (JPEG and PNG) before serving: TorchScript optimises its
        graph on the first runs and Pillow imports decoders on first use, which made the
        first real request after a cold start ten times slower than the next."""
        side = max(self.bundle.resize, *self.bundle.crop)
        picture = Image.new("RGB", (side + side // 3, side), (90, 140, 200))
        samples = []
        for fmt in ("JPEG", "PNG"):
            buffer = io.BytesIO()
            picture.save(buffer, fmt)
            samples.append(buffer.getvalue())
        for _ in range(passes):
            for data in samples:
                self.predict(data, 1)
        self.requests = 0

    def gpu_memory_mb(self) -> float | None:
        """GPU memory this process holds through PyTorch's allocator; None on the CPU."""
        if self.device.type != "cuda":
            return None
        return round(torch.cuda.memory_reserved(self.device) / 2**20, 1)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ready",
            "model": self.bundle.name,
            "device": str(self.device),
            "precision": self.precision,
            "gpu_memory_mb": self.gpu_memory_mb(),
            "labels": len(self.bundle.labels),
            "load_ms": self.load_ms,
            "warmup_ms": self.warmup_ms,
            "requests": self.requests,
            "threads": torch.get_num_threads(),
            "pid": os.getpid(),
        }

    def predict(self, data: bytes, top_k: int = 5) -> Prediction:
        """Classify one encoded image. Raises InputError for bad images and
        InferenceError if the model itself fails."""
        bundle = self.bundle
        total = time.perf_counter()
        image = decode(data, self.max_pixels, draft=(bundle.resize, bundle.resize))
        decode_ms = _ms(total)
        started = time.perf_counter()
        image_tensor = to_tensor(resize_and_crop(image, bundle.resize, bundle.crop), bundle.mean, bundle.std)
        preprocess_ms = _ms(started)
        k = min(top_k, len(self.bundle.labels))
        with self._lock:
            started = time.perf_counter()
            try:
                batch = image_tensor.unsqueeze(0).to(self.device, dtype=self._dtype, non_blocking=True)
                with torch.inference_mode():
                    scores = torch.softmax(self.model(batch).float(), dim=1)[0]
                    top = torch.topk(scores, k)
                values, indices = top.values.tolist(), top.indices.tolist()
            except Exception as exc:
                log.exception("inference failed for model %s", self.bundle.name)
                raise InferenceError(f"model {self.bundle.name} failed: {type(exc).__name__}: {exc}") from exc
            inference_ms = _ms(started)
            self.requests += 1
        labels = self.bundle.labels
        predictions = [{"label": labels[i], "score": round(v, 6)} for v, i in zip(values, indices, strict=True)]
        timing = {"decode": decode_ms, "preprocess": preprocess_ms, "inference": inference_ms, "total": _ms(total)}
        return Prediction(predictions, timing)
