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
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

Fsync = Callable[[int], None]
PARTIAL_SUFFIX = ".partial"


def write_whole(
    path: str | Path,
    write: Callable[[Path], None],
    fsync: Fsync = os.fsync,
    sync_dir: Callable[[Path], None] | None = None,
) -> None:
    """Replace ``path`` with what ``write`` puts in the temporary path it is given.

    The temporary file is new and this call's alone (``mkstemp``: a random name, made
    exclusively, so two writers never share one and a link planted there is not
    followed). ``fsync`` is called on it before the rename, and then on the directory
    (tests inject one to see the order); ``sync_dir`` replaces the directory's sync
    (``sync_directory`` with ``fsync``), for a caller that only warns when it fails. An
    OSError from any step propagates with the old file in place."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    partial = Path(name)
    try:
        os.close(fd)
        os.chmod(partial, 0o666 & ~_umask())  # as an open() would make it, not mkstemp's 0600
        write(partial)
        fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # already gone after the rename
    if sync_dir is not None:
        sync_dir(path.parent)
    else:
        sync_directory(path.parent, fsync)


def is_partial(path: str | Path, of: str | Path) -> bool:
    """Whether ``path`` is a temporary file ``write_whole`` makes for ``of`` (one a crash
    may have left)."""
    name, target = Path(path).name, Path(of).name
    return Path(path).parent == Path(of).parent and name.startswith(f".{target}.") and name.endswith(PARTIAL_SUFFIX)


def write_text_whole(
    path: str | Path, text: str, fsync: Fsync = os.fsync, sync_dir: Callable[[Path], None] | None = None
) -> None:
    """``write_whole`` for UTF-8 text."""

    def write(partial: Path) -> None:
        partial.write_text(text, encoding="utf-8")

    write_whole(path, write, fsync, sync_dir)


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


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
