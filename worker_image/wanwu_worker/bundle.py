"""Model bundles: a directory with ``model.json``, the model file its ``format`` names
(TorchScript ``model.pt``, torch.export ``model.pt2`` or ``model.onnx``) and a UTF-8
``labels.txt`` (optional for ``task: embed``). ``load_bundle`` validates all of it without
importing torch, so every problem is reported with the file and field at fault before a
model is loaded.

This module is the manifest: the ``Bundle`` model and the validation of model.json's
fields. How a bundle's files are opened (trusted no further than its own directory),
its labels files read and its digests taken is ``bundle_files``; its names are
importable from here too."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bundle_files import (
    MAX_DEPTH,
    MAX_ENTRIES,
    MAX_LABELS_BYTES,
    MAX_METADATA_BYTES,
    MAX_MODEL_BYTES,
    _check_files,
    _directory,
    _not_a_bundle,
    _read,
    _read_labels,
    bundle_digest,
    labels_digest,
    open_bundle_file,
    read_bundle_file,
    read_labels,
)
from .errors import BundleError, InputError

__all__ = [
    "FORMATS",
    "MAX_DEPTH",
    "MAX_ENTRIES",
    "MAX_LABELS_BYTES",
    "MAX_METADATA_BYTES",
    "MAX_MODEL_BYTES",
    "MODEL_FILES",
    "PRECISIONS",
    "TASKS",
    "Batching",
    "Bundle",
    "Translation",
    "bundle_digest",
    "check_model_file",
    "check_name",
    "labels_digest",
    "load_bundle",
    "open_bundle_file",
    "read_bundle_file",
    "read_labels",
]

FORMATS = ("torchscript", "export", "onnx")
MODEL_FILES = {"torchscript": "model.pt", "export": "model.pt2", "onnx": "model.onnx"}
TASKS = ("classify", "embed")
PRECISIONS = ("fp32", "fp16")


@dataclass(frozen=True)
class Batching:
    max_batch_size: int
    max_wait_ms: float


@dataclass(frozen=True)
class Translation:
    """A bundle's labels (in class order) and group names in another language."""

    labels: tuple[str, ...]
    groups: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Bundle:
    """A validated model bundle. ``input_size`` is (channels, height, width). ``labels``
    is empty for an embed bundle without a labels file; ``subsets`` (classify only) names
    lists of labels a request may score over; ``embedding_dim`` (embed only, optional) is
    the width the model's output must have; ``cpu_fallback`` lets the scheduler serve the
    model on a CPU worker when no GPU has room. ``groups`` (classify) are disjoint sets
    of labels whose probabilities add up to a coarse class (狗 for every dog breed); each
    group is also a subset of that name unless ``subsets`` names one so.
    ``confidence_threshold``: an answer whose top score is below it is not confident.
    ``translations``: language code to the labels and group names in that language;
    ``language``: the code of labels.txt's own language."""

    path: Path
    name: str
    format: str
    task: str
    input_size: tuple[int, int, int]
    resize: int
    crop: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    precision: str
    labels: tuple[str, ...]
    gpu_memory_mb: int
    idle_ttl_s: float | None
    batching: Batching | None
    subsets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    cpu_fallback: bool = False
    embedding_dim: int | None = None
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    confidence_threshold: float | None = None
    translations: dict[str, Translation] = field(default_factory=dict)
    language: str | None = None  # the language of labels.txt and the group names, if said

    @property
    def model_file(self) -> Path:
        """The model file ``format`` names: model.pt, model.pt2 or model.onnx."""
        return self.path / MODEL_FILES[self.format]


def _err(path: Path, field: str, problem: str) -> BundleError:
    return BundleError(f"{path.name}: field '{field}' {problem}")


def _check_model_file(dir_fd: int, fmt: str) -> None:
    try:
        os.close(open_bundle_file(dir_fd, MODEL_FILES[fmt], MAX_MODEL_BYTES, "model file"))
    except FileNotFoundError:
        raise BundleError(f"{MODEL_FILES[fmt]}: missing (model.json 'format' is {fmt})") from None


def check_model_file(bundle: Bundle) -> None:
    """Check again, just before a worker loads ``bundle.model_file`` by its path, that
    it and every other file in the bundle are regular files within their caps (a link
    swapped in since ``load_bundle`` would be followed by the runtime). Raises BundleError."""
    with _directory(bundle.path, _not_a_bundle(bundle.path)) as dir_fd:
        _check_model_file(dir_fd, bundle.format)
        _check_files(dir_fd)


def _require(cfg: dict[str, Any], path: Path, field: str) -> Any:
    if field not in cfg:
        raise _err(path, field, "is missing")
    return cfg[field]


def _choice(cfg: dict[str, Any], path: Path, field: str, allowed: tuple[str, ...]) -> str:
    value = _require(cfg, path, field)
    if value not in allowed:
        raise _err(path, field, f"is {value!r}; expected one of {', '.join(allowed)}")
    return str(value)


def _pos_int(value: Any, path: Path, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _err(path, field, f"is {value!r}; expected a positive integer")
    return value


def _int_seq(value: Any, path: Path, field: str, length: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != length:
        raise _err(path, field, f"is {value!r}; expected a list of {length} positive integers")
    return tuple(_pos_int(v, path, field) for v in value)


def _float_triple(value: Any, path: Path, field: str, positive: bool) -> tuple[float, float, float]:
    ok = (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        and all(math.isfinite(v) and (v > 0 or not positive) for v in value)
    )
    if not ok:
        kind = "positive numbers" if positive else "numbers"
        raise _err(path, field, f"is {value!r}; expected a list of 3 {kind}")
    return (float(value[0]), float(value[1]), float(value[2]))


# A bundle's idle TTL has the bounds of the gateway's (WANWU_IDLE_TTL_S in the settings
# table, scheduler/settings.py, which this package cannot import; a unit test keeps the
# two equal): longer than a week is "never", and an idle GPU for that long a mistake.
MAX_IDLE_TTL_S = 7 * 86400.0


def _optional_ttl(cfg: dict[str, Any], path: Path, field: str) -> float | None:
    value = cfg.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_IDLE_TTL_S:
        raise _err(path, field, f"is {value!r}; expected seconds above 0, at most {MAX_IDLE_TTL_S:g} (a week)")
    return float(value)


def _batching(cfg: dict[str, Any], path: Path) -> Batching | None:
    value = cfg.get("batching")
    if value is None or value is False:
        return None
    if not isinstance(value, dict):
        raise _err(path, "batching", f"is {value!r}; expected an object")
    size = _pos_int(value.get("max_batch_size"), path, "batching.max_batch_size")
    wait = value.get("max_wait_ms", 5)
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or wait < 0:
        raise _err(path, "batching.max_wait_ms", f"is {wait!r}; expected a number >= 0")
    return Batching(size, float(wait))


def _labels(cfg: dict[str, Any], dir_fd: int, meta: Path, task: str) -> tuple[str, ...]:
    """The bundle's labels. Required for classify (default file labels.txt); an embed
    bundle reads them only if 'labels' names a file or labels.txt exists."""
    labels_name = cfg.get("labels", "labels.txt")
    if not isinstance(labels_name, str) or not labels_name or "/" in labels_name or labels_name.startswith("."):
        raise _err(meta, "labels", f"is {labels_name!r}; expected a file name inside the bundle")
    return _read_labels(dir_fd, labels_name, required=task != "embed" or "labels" in cfg)


def _subsets(cfg: dict[str, Any], meta: Path, task: str, labels: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """'subsets': named, non-empty lists of distinct labels from the labels file."""
    value = cfg.get("subsets")
    if value is None:
        return {}
    if task != "classify":
        raise _err(meta, "subsets", f"is only for task classify; this bundle's task is {task}")
    if not isinstance(value, dict):
        raise _err(meta, "subsets", f"is {value!r}; expected an object of subset name to a list of labels")
    known = set(labels)
    subsets: dict[str, tuple[str, ...]] = {}
    for name, members in value.items():
        where = f"subsets.{name}"
        if not name.strip():
            raise _err(meta, "subsets", f"has a subset named {name!r}; expected a non-empty name")
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise _err(meta, where, f"is {members!r}; expected a non-empty list of labels")
        for label in members:
            if label not in known:
                raise _err(meta, where, f"has label {label!r}, which is not in the labels file")
        duplicates = sorted({m for m in members if members.count(m) > 1})
        if duplicates:
            raise _err(meta, where, f"lists {duplicates[0]!r} more than once")
        subsets[name] = tuple(members)
    return subsets


def _flag(cfg: dict[str, Any], path: Path, field: str) -> bool:
    value = cfg.get(field, False)
    if not isinstance(value, bool):
        raise _err(path, field, f"is {value!r}; expected true or false")
    return value


def _embedding_dim(cfg: dict[str, Any], meta: Path, task: str) -> int | None:
    value = cfg.get("embedding_dim")
    if value is None:
        return None
    if task != "embed":
        raise _err(meta, "embedding_dim", f"is only for task embed; this bundle's task is {task}")
    return _pos_int(value, meta, "embedding_dim")


def _groups(cfg: dict[str, Any], meta: Path, task: str, labels: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """'groups': named, non-empty, disjoint lists of labels from the labels file."""
    value = cfg.get("groups")
    if value is None:
        return {}
    if task != "classify":
        raise _err(meta, "groups", f"is only for task classify; this bundle's task is {task}")
    if not isinstance(value, dict):
        raise _err(meta, "groups", "expected an object of group name to a list of labels")
    known = set(labels)
    owner: dict[str, str] = {}
    groups: dict[str, tuple[str, ...]] = {}
    for name, members in value.items():
        where = f"groups.{name}"
        if not name.strip() or any(c in name for c in ",;"):
            raise _err(meta, "groups", f"has a group named {name!r}; expected a non-empty name without , or ;")
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise _err(meta, where, "expected a non-empty list of labels")
        for label in members:
            if label not in known:
                raise _err(meta, where, f"has label {label!r}, which is not in the labels file")
            if label in owner:
                raise _err(meta, where, f"has label {label!r}, which is already in group {owner[label]!r}")
            owner[label] = name
        if name in known:
            raise _err(meta, "groups", f"has a group named {name!r}, which is also a label")
        groups[name] = tuple(members)
    return groups


def _threshold(cfg: dict[str, Any], meta: Path, task: str) -> float | None:
    value = cfg.get("confidence_threshold")
    if value is None:
        return None
    if task != "classify":
        raise _err(meta, "confidence_threshold", f"is only for task classify; this bundle's task is {task}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise _err(meta, "confidence_threshold", f"is {value!r}; expected a number from 0 to 1")
    return float(value)


def _language_code(value: Any) -> bool:
    return isinstance(value, str) and value.isascii() and value.replace("-", "").isalnum() and len(value) <= 16


def _language(cfg: dict[str, Any], meta: Path) -> str | None:
    value = cfg.get("language")
    if value is not None and not _language_code(value):
        raise _err(meta, "language", f"is {value!r}; expected a language code such as zh or en")
    return value


def _translations(
    cfg: dict[str, Any], dir_fd: int, meta: Path, labels: tuple[str, ...], groups: dict[str, tuple[str, ...]]
) -> dict[str, Translation]:
    """'translations': {"en": {"labels": FILE, "groups": {group: name}}}: one label per
    class in the same order, and a name for every group."""
    value = cfg.get("translations")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(meta, "translations", "expected an object of language code to its labels file and group names")
    translations: dict[str, Translation] = {}
    for lang, entry in value.items():
        where = f"translations.{lang}"
        if not _language_code(lang):
            raise _err(meta, "translations", f"has language {lang!r}; expected a code such as en or zh-Hant")
        if not isinstance(entry, dict):
            raise _err(meta, where, "expected an object with 'labels' and 'groups'")
        name = entry.get("labels")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise _err(meta, f"{where}.labels", f"is {name!r}; expected a file name inside the bundle")
        translated = _read_labels(dir_fd, name)
        if len(translated) != len(labels):
            raise BundleError(f"{name}: has {len(translated)} labels; the labels file has {len(labels)}")
        names = entry.get("groups", {})
        if not isinstance(names, dict) or not all(isinstance(v, str) and v.strip() for v in names.values()):
            raise _err(meta, f"{where}.groups", "expected an object of group name to its translation")
        missing = [group for group in groups if group not in names]
        if missing:
            raise _err(meta, f"{where}.groups", f"has no name for group {missing[0]!r}")
        clash = next((names[g] for g in groups if names[g] in set(translated)), None)
        if clash is not None:
            raise _err(meta, f"{where}.groups", f"names a group {clash!r}, which is also a label there")
        translations[lang] = Translation(translated, {group: names[group] for group in groups})
    return translations


def load_bundle(directory: str | Path) -> Bundle:
    """Read and validate the bundle in ``directory``; raise BundleError naming the
    file (relative to the bundle) and field at fault. The model file is checked (a
    regular file within its cap), not loaded."""
    root = Path(directory)
    with _directory(root, _not_a_bundle(root)) as dir_fd:
        return _load(root, dir_fd)


def _load(root: Path, dir_fd: int) -> Bundle:
    meta = root / "model.json"
    try:
        cfg = json.loads(_read(dir_fd, meta.name, MAX_METADATA_BYTES, "file").decode("utf-8"))
    except FileNotFoundError:
        raise BundleError(_not_a_bundle(root)) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{meta.name}: not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise BundleError(f"{meta.name}: expected a JSON object, got {type(cfg).__name__}")

    name = _require(cfg, meta, "name")
    if not isinstance(name, str) or not name or "/" in name:
        raise _err(meta, "name", f"is {name!r}; expected a non-empty name without '/'")
    fmt = _choice(cfg, meta, "format", FORMATS)
    task = _choice(cfg, meta, "task", TASKS)
    precision = _choice(cfg, meta, "precision", PRECISIONS) if "precision" in cfg else "fp32"
    channels, height, width = _int_seq(_require(cfg, meta, "input_size"), meta, "input_size", 3)
    if channels != 3:
        raise _err(meta, "input_size", f"has {channels} channels; only 3 (RGB) is supported")
    resize = _pos_int(_require(cfg, meta, "resize"), meta, "resize")
    crop_h, crop_w = _int_seq(cfg.get("crop", [height, width]), meta, "crop", 2)
    if (crop_h, crop_w) != (height, width):
        raise _err(meta, "crop", f"is {[crop_h, crop_w]}; must equal input_size's height and width")
    if resize < min(crop_h, crop_w):
        raise _err(meta, "resize", f"is {resize}; must be at least the crop's shorter side")
    mean = _float_triple(_require(cfg, meta, "mean"), meta, "mean", positive=False)
    std = _float_triple(_require(cfg, meta, "std"), meta, "std", positive=True)
    gpu_mb = cfg.get("gpu_memory_mb", 0)
    if isinstance(gpu_mb, bool) or not isinstance(gpu_mb, int) or gpu_mb < 0:
        raise _err(meta, "gpu_memory_mb", f"is {gpu_mb!r}; expected an integer >= 0")

    labels = _labels(cfg, dir_fd, meta, task)
    groups = _groups(cfg, meta, task, labels)
    subsets = {**groups, **_subsets(cfg, meta, task, labels)}
    bundle = Bundle(
        path=root,
        name=name,
        format=fmt,
        task=task,
        input_size=(channels, height, width),
        resize=resize,
        crop=(crop_h, crop_w),
        mean=mean,
        std=std,
        precision=precision,
        labels=labels,
        gpu_memory_mb=gpu_mb,
        idle_ttl_s=_optional_ttl(cfg, meta, "idle_ttl_s"),
        batching=_batching(cfg, meta),
        subsets=subsets,
        cpu_fallback=_flag(cfg, meta, "cpu_fallback"),
        embedding_dim=_embedding_dim(cfg, meta, task),
        groups=groups,
        confidence_threshold=_threshold(cfg, meta, task),
        translations=_translations(cfg, dir_fd, meta, labels, groups),
        language=_language(cfg, meta),
    )
    _check_model_file(dir_fd, fmt)
    _check_files(dir_fd)
    return bundle


def check_name(directory: str) -> None:
    """A bundle directory directly under a models root (a stem cell's ``/load``): any
    name the gateway's catalog accepts, nothing that leaves the root. Raises InputError."""
    if not directory or "/" in directory or "\0" in directory or directory in (".", ".."):
        raise InputError(f"model directory {directory!r} is not a plain directory name", code="bad_model")
