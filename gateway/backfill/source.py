"""The files to classify: a directory walked (all images, or those a ``--glob`` matches) or a
list file, each file under its key; resuming goes by key."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import BackfillError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


class Source:
    """The files to classify, each under its key: the path relative to a directory
    (posix separators), or the path as a list file writes it. Resuming goes by key."""

    def __init__(self, keys: Sequence[str], base: str, kind: str) -> None:
        self.keys = list(keys)
        self.base = base  # the directory, or the list file's directory
        self.kind = kind  # "directory" or "list"

    @classmethod
    def open(cls, path: str, glob: str | None = None, say: Callable[[str], None] | None = None) -> Source:
        """A directory (walked) or a text file listing paths."""
        if os.path.isdir(path):
            return cls(walk(path, glob, say), path, "directory")
        if glob is not None:
            raise BackfillError(f"--glob applies to a directory; {path} is a list file")
        return cls(read_list(path), os.path.dirname(os.path.abspath(path)), "list")

    def path_of(self, key: str) -> str:
        return os.path.join(self.base, key)  # an absolute key stays itself

    def key_of(self, path: str) -> str | None:
        """The key ``path`` would have in a directory source; None outside it, or for a list."""
        if self.kind != "directory":
            return None
        relative = os.path.relpath(os.path.realpath(path), os.path.realpath(self.base))
        return None if relative.startswith("..") else Path(relative).as_posix()


def walk(root: str, glob: str | None = None, say: Callable[[str], None] | None = None) -> list[str]:
    """The image files under ``root``, sorted, as paths relative to it with ``/``.

    Symlinked files count, symlinked directories are not entered (no loops, no leaving
    the tree). Without ``glob`` a file counts by its extension (any case); with it, by
    its relative path matching the pattern (see ``glob_matcher``)."""
    wanted = glob_matcher(glob)
    keys: list[str] = []
    pending = [""]
    while pending:
        prefix = pending.pop()
        try:
            with os.scandir(os.path.join(root, prefix) if prefix else root) as entries:
                for entry in entries:
                    key = prefix + entry.name
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(key + "/")
                        elif entry.is_file() and wanted(key):
                            keys.append(key)
                    except OSError as exc:
                        _say(say, f"wanwu backfill: skipping {os.path.join(root, key)}: {exc.strerror or exc}")
        except OSError as exc:
            _say(say, f"wanwu backfill: cannot list {os.path.join(root, prefix)}: {exc.strerror or exc}")
    keys.sort()
    return keys


def glob_matcher(glob: str | None) -> Callable[[str], bool]:
    """Whether a relative path is wanted: by an image extension (any case) without a
    pattern; else fnmatch's rules, case-sensitive, on the whole path, where ``*`` also
    crosses ``/`` (``*.png``: a PNG at any depth) and ``**/`` also matches no directory
    at all (``**/*.png`` includes the top level, ``cams/**/*.jpg`` the files right in cams)."""
    if glob is None:
        return lambda key: os.path.splitext(key)[1].lower() in IMAGE_EXTENSIONS
    pattern = re.compile(fnmatch.translate(glob.replace("**/", "\0")).replace("\0", "(?:.*/)?"))
    return lambda key: pattern.match(key) is not None


def read_list(path: str) -> list[str]:
    """The paths a list file names, one a line, in its order, each once; blank lines and
    lines starting with ``#`` are left out, and so is the whitespace around a path."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as handle:
            lines = [line.strip() for line in handle]
    except OSError as exc:
        raise BackfillError(f"cannot read the list {path}: {exc.strerror or exc}") from exc
    return list(dict.fromkeys(line for line in lines if line and not line.startswith("#")))


def _say(say: Callable[[str], None] | None, text: str) -> None:
    if say is not None:
        say(text)
