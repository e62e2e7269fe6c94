"""The files of a model bundle, opened and read as the bundle is trusted.

A bundle is trusted no further than its own directory. Every file in it must be a
regular file (no symbolic links, FIFOs, sockets or devices; subdirectories are allowed,
held to the same rules at every level, since an ONNX model's external weights may sit
in one) no larger than its cap: ``MAX_METADATA_BYTES`` for model.json,
``MAX_LABELS_BYTES`` for a labels file, ``MAX_MODEL_BYTES`` for the model file and
anything else (an ONNX model's external weights). Files are opened relative to the
bundle directory without following links (``open_bundle_file``). Messages name a file
relative to the bundle (``labels.txt: ...``): the gateway shows them to HTTP clients,
which must not learn server paths.

Here too: reading labels files, and the digests that name a bundle's files
(``bundle_digest``) and its labels (``labels_digest``). Imports nothing beyond the
standard library (no torch); ``bundle`` re-exports every public name."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from .errors import BundleError

MAX_METADATA_BYTES = 2**20  # model.json (1 MiB)
MAX_LABELS_BYTES = 64 * 2**20  # a labels file larger than this is refused, not read
MAX_MODEL_BYTES = 8 * 2**30  # the model file, and any other file in a bundle (8 GiB)
# O_NOFOLLOW: a link is refused, not followed; O_NONBLOCK: opening a FIFO cannot block.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NOT_REGULAR = "bundle files must be regular files inside the bundle"


def _mb(size: int) -> str:
    return f"{size // 2**30} GB" if size >= 2**30 else f"{size // 2**20} MB"


_KINDS = {
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a device",
    stat.S_IFBLK: "a device",
    stat.S_IFDIR: "a directory",
}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


@contextlib.contextmanager
def _directory(root: Path, missing: str) -> Iterator[int]:
    """The bundle directory, open; BundleError ``missing`` if there is none. ``root``
    itself may be a link (the operator chose where a bundle's name under the models
    directory points, e.g. to the current version); the files in it may not."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise BundleError(missing) from None
    except OSError as exc:
        raise BundleError(f"{root.absolute().name}: directory cannot be read: {exc.strerror or exc}") from None
    try:
        yield fd
    finally:
        os.close(fd)


def open_bundle_file(dir_fd: int, name: str, cap: int, what: str) -> int:
    """Open file ``name`` of the bundle directory open at ``dir_fd`` for reading and
    return its descriptor: a regular file of at most ``cap`` bytes, never reached through
    a link (O_NOFOLLOW), never a FIFO (O_NONBLOCK: checked after an open that cannot
    block) or device (refused by ``lstat`` before it is opened). ``what`` names the kind
    of file in the over-size message. Raises FileNotFoundError if it is missing, else
    BundleError naming ``name``; a caller reading the file reads at most ``cap`` + 1
    bytes (a /proc file says its size is 0)."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise BundleError(f"{name!r}: not a file name inside the bundle")
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
        if not stat.S_ISREG(mode):
            raise BundleError(f"{name}: is {_kind(mode)}; {_NOT_REGULAR}")
        fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a link since the lstat
            raise BundleError(f"{name}: is a symbolic link; {_NOT_REGULAR}") from None
        raise BundleError(f"{name}: {what} cannot be read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{name}: is {_kind(info.st_mode)}; {_NOT_REGULAR}")
        if info.st_size > cap:
            raise BundleError(f"{name}: {what} is over {_mb(cap)}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(dir_fd: int, name: str, cap: int, what: str) -> bytes:
    """The contents of bundle file ``name`` (see ``open_bundle_file``)."""
    with os.fdopen(open_bundle_file(dir_fd, name, cap, what), "rb") as handle:
        try:
            data = handle.read(cap + 1)
        except OSError as exc:
            raise BundleError(f"{name}: {what} cannot be read: {exc.strerror or exc}") from None
    if len(data) > cap:
        raise BundleError(f"{name}: {what} is over {_mb(cap)}")
    return data


def read_bundle_file(directory: Path, name: str, cap: int, what: str = "file") -> bytes:
    """The contents of file ``name`` in bundle ``directory``, read as ``open_bundle_file``
    opens it. Raises FileNotFoundError if the file is missing, else BundleError naming
    ``name`` (``directory`` missing included)."""
    with _directory(directory, f"{name}: missing") as dir_fd:
        return _read(dir_fd, name, cap, what)


MAX_ENTRIES = 10_000  # files and directories a bundle may hold, all levels
MAX_DEPTH = 8  # directories within directories


def _tree(dir_fd: int, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, int, str, os.stat_result]]:
    """Every entry under the bundle directory open at ``dir_fd``, at every level, without
    following links: (its path relative to the bundle, its directory's descriptor, its
    name, its lstat), sorted by name within a directory. A subdirectory is opened with
    O_NOFOLLOW, so a link swapped in for one is refused, not followed."""
    with os.scandir(dir_fd) as listing:
        entries = sorted((e.name, e.stat(follow_symlinks=False)) for e in listing)
    for name, info in entries:
        yield prefix + name, dir_fd, name, info
        if stat.S_ISDIR(info.st_mode):
            if depth + 1 > MAX_DEPTH:
                raise BundleError(f"{prefix + name}: directories nest deeper than {MAX_DEPTH}")
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            except OSError as exc:
                raise BundleError(f"{prefix + name}: directory cannot be read: {exc.strerror or exc}") from None
            try:
                yield from _tree(sub, f"{prefix}{name}/", depth + 1)
            finally:
                os.close(sub)


def _files(dir_fd: int) -> Iterator[tuple[str, int, str]]:
    """Every file of the bundle, at every level (see ``_tree``), as (path relative to
    the bundle, its directory's descriptor, its name); BundleError for anything that is
    not a regular file or a directory, a file over ``MAX_MODEL_BYTES``, or more than
    ``MAX_ENTRIES`` entries."""
    for count, (path, parent, name, info) in enumerate(_tree(dir_fd), 1):
        if count > MAX_ENTRIES:
            raise BundleError(f"the bundle holds more than {MAX_ENTRIES} files and directories")
        if stat.S_ISDIR(info.st_mode):
            continue
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{path}: is {_kind(info.st_mode)}; {_NOT_REGULAR}")
        if info.st_size > MAX_MODEL_BYTES:
            raise BundleError(f"{path}: file is over {_mb(MAX_MODEL_BYTES)}")
        yield path, parent, name


def _check_files(dir_fd: int) -> None:
    """Every entry in the bundle, at every level, is a regular file within the general
    cap or a directory: files nothing here reads by name, such as an ONNX model's
    external weights (which may sit in a subdirectory), are still opened by the model's
    runtime."""
    for _ in _files(dir_fd):
        pass


def read_labels(path: Path) -> tuple[str, ...]:
    """Read a labels file: UTF-8, one non-empty label per line, no duplicates; a regular
    file (``path`` itself not a link) of at most MAX_LABELS_BYTES. Messages name the
    file by ``path.name``."""
    with _directory(path.parent, f"{path.name}: labels file is missing") as dir_fd:
        return _read_labels(dir_fd, path.name)


def _read_labels(dir_fd: int, name: str, required: bool = True) -> tuple[str, ...]:
    """The labels in file ``name`` of the bundle at ``dir_fd`` (``read_labels``); () if
    it is missing and not ``required``."""
    try:
        text = _read(dir_fd, name, MAX_LABELS_BYTES, "labels file").decode("utf-8")
    except FileNotFoundError:
        if not required:
            return ()
        raise BundleError(f"{name}: labels file is missing") from None
    except UnicodeDecodeError as exc:
        raise BundleError(f"{name}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not labels:
        raise BundleError(f"{name}: no labels")
    seen: set[str] = set()
    for number, label in enumerate(labels, 1):
        if label in seen:
            raise BundleError(f"{name}: label {label!r} on line {number} is a duplicate")
        seen.add(label)
    return labels


def _not_a_bundle(root: Path) -> str:
    return f"model.json: missing (is {root.absolute().name} a model bundle?)"


def bundle_digest(directory: Path) -> str:
    """SHA-256 over every file of the bundle, at every level, hidden ones included: each
    one's path and contents, both prefixed with their length (so no two bundles share a
    digest by moving bytes between files), each opened as ``open_bundle_file`` opens it.
    The bundle's identity: it changes when any file a worker could read changes. Raises
    BundleError as ``_files`` and the opener do."""
    digest = hashlib.sha256()
    with _directory(directory, _not_a_bundle(directory)) as dir_fd:
        for path, parent, name in _files(dir_fd):
            encoded = path.encode("utf-8", "surrogateescape")
            digest.update(struct.pack(">Q", len(encoded)) + encoded)
            with os.fdopen(open_bundle_file(parent, name, MAX_MODEL_BYTES, "file"), "rb") as handle:
                digest.update(struct.pack(">Q", os.fstat(handle.fileno()).st_size))
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()[:32]


def labels_digest(labels: tuple[str, ...] | list[str]) -> str:
    """A short digest of label names in order: a worker tags the raw scores it answers
    with it, so a gateway whose catalog knows another version of the bundle (replaced
    while workers still run the old one) notices rather than mislabel the scores."""
    return hashlib.sha256("\n".join(labels).encode("utf-8")).hexdigest()[:16]
