"""The model catalog: every bundle directory under WANWU_MODELS_DIR.

Bundles are validated with the worker's own loader (``wanwu_worker.bundle``, which
does not import torch), so the gateway refuses a bad bundle with the same message the
worker would print. The directory is rescanned when an unknown name is asked for, at
most every few seconds, so a new bundle needs no restart.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wanwu_worker.bundle import Batching, Bundle, Translation, load_bundle
from wanwu_worker.errors import BundleError

from .clock import Clock, MonotonicClock
from .errors import UnknownModel
from .policy import STEM

log = logging.getLogger(__name__)

CLASSIFY, EMBED = "classify", "embed"  # a bundle's task


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    gpu_memory_mb: int
    idle_ttl_s: float | None
    labels: tuple[str, ...]
    input_size: tuple[int, int, int]
    precision: str
    batching: Batching | None = None  # dynamic batching: max_batch_size, max_wait_ms
    task: str = CLASSIFY  # classify (labels and scores) or embed (a feature vector)
    format: str = "torchscript"
    subsets: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # named label subsets
    cpu_fallback: bool = False  # served by a CPU worker when no GPU has room for it
    embedding_dim: int | None = None
    groups: tuple[str, ...] = ()  # coarse groups the worker scores beside the classes
    confidence_threshold: float | None = None  # a top score below it is not confident
    language: str | None = None  # the language of the labels, if the bundle says
    translations: Mapping[str, Translation] = field(default_factory=dict)

    @property
    def languages(self) -> tuple[str, ...]:
        """Languages the model answers in: its own (if said), then its translations."""
        own = (self.language,) if self.language else ()
        return (*own, *(lang for lang in self.translations if lang != self.language))

    def translator(self, lang: str) -> tuple[Mapping[str, str], Mapping[str, str]]:
        """For ``lang`` (a translation's code): each label's name, each group's name."""
        return self._translators[lang]

    @functools.cached_property
    def _translators(self) -> Mapping[str, tuple[Mapping[str, str], Mapping[str, str]]]:
        return {
            lang: (dict(zip(self.labels, t.labels, strict=True)), t.groups) for lang, t in self.translations.items()
        }

    @functools.cached_property
    def columns(self) -> Mapping[str, int]:
        """Each label's column in the model's output (built once: a model may have 50k)."""
        return {label: index for index, label in enumerate(self.labels)}

    @property
    def max_batch_size(self) -> int:
        """Images one worker call may carry (1 without batching)."""
        return self.batching.max_batch_size if self.batching is not None else 1

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> ModelInfo:
        return cls(
            bundle.name,
            bundle.path.resolve(),
            bundle.gpu_memory_mb,
            bundle.idle_ttl_s,
            bundle.labels,
            bundle.input_size,
            bundle.precision,
            bundle.batching,
            bundle.task,
            bundle.format,
            dict(bundle.subsets),
            bundle.cpu_fallback,
            bundle.embedding_dim,
            tuple(bundle.groups),
            bundle.confidence_threshold,
            bundle.language,
            dict(bundle.translations),
        )


class ModelCatalog:
    def __init__(self, models_dir: Path, rescan_after_s: float = 5.0, clock: Clock | None = None) -> None:
        self.models_dir = models_dir
        self._rescan_after = rescan_after_s
        self._now = (clock or MonotonicClock()).now
        self._models: dict[str, ModelInfo] = {}
        self.problems: dict[str, str] = {}
        self._scanned_at = float("-inf")
        self._lock = threading.Lock()
        self.version = 0  # bumped whenever the set of served models changes
        self.refresh()

    def refresh(self) -> None:
        """Rescan the directory. A bundle that fails validation is left out and its
        problem is kept in ``problems`` (and logged once)."""
        models: dict[str, ModelInfo] = {}
        problems: dict[str, str] = {}
        if self.models_dir.is_dir():
            for entry in sorted(self.models_dir.iterdir()):
                if entry.name.startswith(".") or not (entry / "model.json").is_file():
                    continue  # hidden: a bundle still being written
                try:
                    info = ModelInfo.from_bundle(load_bundle(entry))
                except BundleError as exc:
                    problems[entry.name] = str(exc)
                    continue
                if info.name == STEM:
                    problems[entry.name] = f"{entry}: the name {STEM!r} is reserved for stem cells"
                    continue
                if info.name != entry.name:
                    problems[entry.name] = (
                        f"{entry / 'model.json'}: field 'name' is {info.name!r}; must match the directory name"
                    )
                    continue
                models[info.name] = info
        with self._lock:
            for name, problem in problems.items():
                if self.problems.get(name) != problem:
                    log.error("model bundle %s is invalid and not served: %s", name, problem)
            if models != self._models:
                self.version += 1
            self._models, self.problems = models, problems
            self._scanned_at = self._now()

    def get(self, name: str) -> ModelInfo:
        with self._lock:
            info = self._models.get(name)
            stale = self._now() - self._scanned_at >= self._rescan_after
        if info is None and stale:
            self.refresh()
            with self._lock:
                info = self._models.get(name)
        if info is None:
            problem = self.problems.get(name)
            if problem:
                raise UnknownModel(f"model {name!r} is not served: {problem}")
            raise UnknownModel(f"no model named {name!r} in {self.models_dir}")
        return info

    def all(self) -> list[ModelInfo]:
        with self._lock:
            return sorted(self._models.values(), key=lambda m: m.name)
