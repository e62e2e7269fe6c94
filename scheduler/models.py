"""The model catalog: every bundle directory under WANWU_MODELS_DIR.

Bundles are validated with the worker's own loader (``wanwu_worker.bundle``, which
does not import torch), so the gateway refuses a bad bundle with the same message the
worker would print. The directory is rescanned when an unknown name is asked for and on
every ``poll`` (the pool's reaper calls it), at most every few seconds, so a new,
removed or replaced bundle needs no restart.

Each served bundle carries a ``digest`` of its files' contents: its identity. A rescan
re-reads a bundle only when one of its files' ``lstat`` changed (name, inode, size,
mtime, ctime), and a bundle whose digest changed is a new version of the model (the
version counter moves; the pool retires the workers of the old one and the result
cache's keys hold the digest, so no answer of the old bundle is served after it).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from wanwu_worker.bundle import MAX_ENTRIES, Batching, Bundle, Translation, bundle_digest, load_bundle
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
    digest: str = ""  # the bundle's identity: a hash of its files' contents (``bundle_digest``)

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
    def from_bundle(cls, bundle: Bundle, digest: str = "") -> ModelInfo:
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
            digest,
        )


Signature = tuple[tuple[str, int, int, int, int, int], ...]


def signature(directory: Path) -> Signature:
    """What a bundle directory looks like to ``lstat``, at every level (links not
    followed): each entry's path, mode, inode, size, mtime and ctime, the directory's own
    first. Equal signatures: nothing to re-read. Raises OSError if it is no directory."""

    def row(name: str, st: os.stat_result) -> tuple[str, int, int, int, int, int]:
        return (name, st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    rows = [row(".", os.lstat(directory))]
    with os.scandir(directory) as top:  # raises for a file or a missing directory
        names = [e.name for e in top]
    for name in sorted(names):
        rows.append(row(name, os.lstat(directory / name)))
    for root, dirs, files in os.walk(directory):  # subdirectories; links are not followed
        if root == str(directory):
            continue
        relative = os.path.relpath(root, directory)
        for name in sorted(dirs + files):
            rows.append(row(f"{relative}/{name}", os.lstat(os.path.join(root, name))))
        if len(rows) > MAX_ENTRIES + 1:
            break  # load_bundle refuses such a bundle; its signature need not grow further
    return tuple(rows)


class ModelCatalog:
    def __init__(self, models_dir: Path, rescan_after_s: float = 5.0, clock: Clock | None = None) -> None:
        self.models_dir = models_dir
        self._rescan_after = rescan_after_s
        self._now = (clock or MonotonicClock()).now
        self._models: dict[str, ModelInfo] = {}
        self.problems: dict[str, str] = {}
        self._scanned_at = float("-inf")
        self._scanning = threading.Lock()  # held by the one scan under way
        self._asked_at = float("-inf")  # the last rescan an unknown name asked for
        self._seen: dict[str, tuple[Signature, ModelInfo | str]] = {}  # directory name -> what its last scan found
        self._lock = threading.Lock()
        self.version = 0  # bumped whenever the served models change (came, went or were replaced)
        self.refresh()

    def refresh(self, wait: bool = True) -> bool:
        """Rescan the directory. A bundle that fails validation is left out and its
        problem is kept in ``problems`` (and logged once); a bundle whose files did not
        change since the last scan is not read again. One scan runs at a time: with
        ``wait`` False, a call while another scans returns at once (False), so requests
        naming unknown models cannot pile up re-reads of a large changed bundle."""
        if not self._scanning.acquire(blocking=wait):
            return False
        try:
            with self._lock:
                self._scanned_at = self._now()  # from the start: callers meanwhile see it fresh
            self._scan_all()
        finally:
            self._scanning.release()
        return True

    def _scan_all(self) -> None:
        models: dict[str, ModelInfo] = {}
        problems: dict[str, str] = {}
        seen: dict[str, tuple[Signature, ModelInfo | str]] = {}
        if self.models_dir.is_dir():
            for entry in sorted(self.models_dir.iterdir()):
                if entry.name.startswith("."):
                    continue  # hidden: a bundle still being written
                try:
                    sig = signature(entry)
                except OSError:
                    continue  # not a directory, or gone since the listing
                if not any(row[0] == "model.json" for row in sig):
                    continue  # not a bundle
                known = self._seen.get(entry.name)
                outcome = known[1] if known is not None and known[0] == sig else self._scan(entry)
                seen[entry.name] = (sig, outcome)
                if isinstance(outcome, str):
                    problems[entry.name] = outcome
                else:
                    models[outcome.name] = outcome
        with self._lock:
            for name, problem in problems.items():
                if self.problems.get(name) != problem:
                    log.error("model bundle %s is invalid and not served: %s", name, problem)
            for name, info in models.items():
                old = self._models.get(name)
                if old is not None and old.digest != info.digest:
                    log.info("model bundle %s was replaced (digest %s -> %s)", name, old.digest, info.digest)
            if models != self._models:
                self.version += 1
            self._models, self.problems, self._seen = models, problems, seen

    def _scan(self, entry: Path) -> ModelInfo | str:
        """One bundle directory read and validated: its ModelInfo, or its problem."""
        try:
            info = ModelInfo.from_bundle(load_bundle(entry), bundle_digest(entry))
        except BundleError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot be read: {exc.strerror or exc}"
        if info.name == STEM:
            return f"model.json: field 'name' is {STEM!r}, which is reserved for stem cells"
        if info.name != entry.name:
            return f"model.json: field 'name' is {info.name!r}; must match the directory name"
        return info

    def poll(self) -> bool:
        """Rescan if the last scan is older than the rescan interval (the pool's reaper
        calls this, so changed bundles are noticed without a request naming them).
        Returns whether it rescanned."""
        with self._lock:
            stale = self._now() - self._scanned_at >= self._rescan_after
        return stale and self.refresh(wait=False)

    def get(self, name: str) -> ModelInfo:
        with self._lock:
            info = self._models.get(name)
            # Unknown names rescan on their own clock: the reaper's polls must not keep a
            # bundle copied in a moment ago unknown for a rescan interval.
            now = self._now()
            ask = info is None and now - self._asked_at >= self._rescan_after
            if ask:
                self._asked_at = now
        if ask:
            self.refresh()
            with self._lock:
                info = self._models.get(name)
        if info is None:
            problem = self.problems.get(name)
            if problem:
                raise UnknownModel(f"model {name!r} is not served: {problem}")
            raise UnknownModel(f"no model named {name!r}")
        return info

    def all(self) -> list[ModelInfo]:
        with self._lock:
            return sorted(self._models.values(), key=lambda m: m.name)
