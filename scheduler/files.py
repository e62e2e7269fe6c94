"""Writing a file whole: the one way wanwu replaces a file another reader may open
(persisted runtime settings, a backfill's options record, a tuning plot).

``write_whole`` fills a temporary file beside the target (same filesystem, so the
rename is atomic), fsyncs it, renames it over the target and fsyncs the directory: a
crash or a power cut at any point leaves the old file or the new one, whole, and no
temporary file once it returns or raises.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

Fsync = Callable[[int], None]


def write_whole(path: str | Path, write: Callable[[Path], None], fsync: Fsync = os.fsync) -> None:
    """Replace ``path`` with what ``write`` puts in the temporary path it is given.

    ``fsync`` is called on the written file before the rename and on the directory
    after it (tests inject one to see the order). An OSError from any step propagates
    with the old file in place."""
    path = Path(path)
    partial = partial_path(path)
    try:
        write(partial)
        fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # already gone after the rename
    sync_directory(path.parent, fsync)


def partial_path(path: str | Path) -> Path:
    """The temporary file ``write_whole`` fills for ``path`` (hidden, beside it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def write_text_whole(path: str | Path, text: str, fsync: Fsync = os.fsync) -> None:
    """``write_whole`` for UTF-8 text."""

    def write(partial: Path) -> None:
        partial.write_text(text, encoding="utf-8")

    write_whole(path, write, fsync)


def sync_directory(directory: str | Path, fsync: Fsync = os.fsync) -> None:
    """fsync ``directory``, so that a file created or renamed in it survives a power cut.
    A filesystem that cannot sync a directory (EINVAL, ENOTSUP) is let be."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
        log.debug("cannot fsync the directory %s: %s", directory, exc)
    finally:
        os.close(fd)
