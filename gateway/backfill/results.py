"""The results file: one job at a time holds it (``flock``); on start its complete lines name
the files done and a partial last line is cut away; answers are appended in whole lines
and fsynced. Beside it, the options record (``<results>.options.json``) keeps the
options that shaped its lines."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scheduler.files import is_partial, sync_directory, write_text_whole

from .errors import RESUME_HINT, BackfillError

log = logging.getLogger(__name__)

OPTIONS_SUFFIX = ".options.json"  # beside the results: what they were made with
OPTIONS_VERSION = 1
CONTENT_OPTIONS = {"model": "--model", "top_k": "--top-k", "lang": "--lang"}  # what shapes a line, and its flag


def encode_line(record: dict[str, Any]) -> bytes:
    """One JSON line, UTF-8; a name that is not UTF-8 is written as ``\\udcXX`` escapes,
    which read back as the same key."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record) + "\n").encode("ascii")


@dataclass(frozen=True)
class Recovered:
    """What a results file held on start."""

    done: frozenset[str]
    ignored_lines: int  # complete lines that are not a JSON object with a "file"
    truncated_bytes: int  # the partial last line cut away

    @property
    def has_lines(self) -> bool:
        return bool(self.done) or self.ignored_lines > 0


def fsync_directory(directory: str) -> None:
    """fsync ``directory``, so that a file created in it survives a power cut; a failure
    is logged (the lines themselves are synced)."""
    try:
        sync_directory(directory)
    except OSError as exc:
        log.warning("cannot fsync the directory %s: %s", directory, exc)


def changed_options(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Each option that shapes a line and differs, as ``--top-k 5 then, 3 now``."""
    return [
        f"{flag} {_shown(recorded.get(key))} then, {_shown(now.get(key))} now"
        for key, flag in CONTENT_OPTIONS.items()
        if recorded.get(key) != now.get(key)
    ]


def _shown(value: Any) -> str:
    return "unset" if value is None else str(value)


class ResultsFile:
    """The JSON-lines results of a job: read on start (and repaired), appended to in
    whole lines, fsynced every ``fsync_interval_s`` and on close. Beside it,
    ``<path>.options.json`` keeps the options its lines were made with."""

    def __init__(
        self,
        path: str,
        fsync_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sync_dir: Callable[[str], None] = fsync_directory,
    ) -> None:
        self.path = path
        self.options_path = path + OPTIONS_SUFFIX
        self.fsync_interval_s = fsync_interval_s
        self._clock = clock
        self._sync_dir = sync_dir
        self._directory = os.path.dirname(os.path.abspath(path))
        self._fd = -1
        self._lock = threading.Lock()  # one write at a time, and none after close
        self._dirty = False
        self._synced_at = 0.0

    def owns(self, path: str) -> bool:
        """Whether ``path`` is a file this writes (the results, their options record, or
        a temporary one a crash left while writing it), which a source that holds it
        must not take for an image."""
        path, options = os.path.realpath(path), os.path.realpath(self.options_path)
        return path in (os.path.realpath(self.path), options) or is_partial(path, options)

    def open(self) -> Recovered:
        """Take the file for this job, read which files it has, and cut a partial last line."""
        created = not os.path.lexists(self.path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise BackfillError(f"cannot open {self.path}: {exc.strerror or exc}") from exc
        if created:
            self._sync_dir(self._directory)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BackfillError(f"another job is writing {self.path} (it holds the file's lock)") from None
        except OSError as exc:  # a file system without locks: go on, one job is the user's word
            log.warning("cannot lock %s: %s", self.path, exc)
        try:
            recovered = _recover(fd)
        except OSError as exc:
            os.close(fd)
            raise BackfillError(f"cannot read {self.path}: {exc.strerror or exc}") from exc
        self._fd = fd
        self._synced_at = self._clock()
        return recovered

    def recorded_options(self) -> dict[str, Any] | None:
        """The options the lines were made with; None where none were kept."""
        try:
            with open(self.options_path, encoding="utf-8") as handle:
                raw = json.load(handle)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise BackfillError(f"cannot read {self.options_path}: {exc.strerror or exc}") from exc
        except ValueError:  # not JSON, or not UTF-8
            raw = None
        if not isinstance(raw, dict):
            raise BackfillError(
                f"{self.options_path} is not a record of backfill options; remove it to resume {self.path} "
                "with the options given now"
            )
        return raw

    def record_options(self, options: Mapping[str, Any]) -> None:
        """Keep ``options`` beside the results, written whole (scheduler.files): a
        crash leaves the old record or the new one."""
        record = {"version": OPTIONS_VERSION, **options}
        try:
            write_text_whole(
                self.options_path,
                json.dumps(record, ensure_ascii=False, indent=2) + "\n",
                sync_dir=lambda directory: self._sync_dir(str(directory)),
            )
        except OSError as exc:
            raise BackfillError(f"cannot write {self.options_path}: {exc.strerror or exc}") from exc

    def append(self, lines: Sequence[bytes]) -> bool:
        """Write ``lines`` (each ending in a newline) with one write; False once closed."""
        data = b"".join(lines)
        with self._lock:
            if self._fd < 0:
                return False
            view = memoryview(data)
            try:
                while view:  # a regular file takes it all at once unless the disk is full
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                # Write no more: a partial line stays the last one, and the next run cuts it.
                os.close(self._fd)
                self._fd = -1
                raise BackfillError(f"cannot write {self.path}: {exc.strerror or exc}; {RESUME_HINT}") from exc
            self._dirty = True
        self.sync_if_due()
        return True

    def sync_if_due(self) -> None:
        if self._dirty and self._clock() - self._synced_at >= self.fsync_interval_s:
            self.sync()

    def sync(self) -> None:
        with self._lock:  # not while the job closes the file
            if self._fd >= 0:
                os.fsync(self._fd)
                self._dirty = False
                self._synced_at = self._clock()

    def hold(self, timeout_s: float) -> bool:
        """Wait for a write in progress, then let no other start (before leaving at once)."""
        return self._lock.acquire(timeout=timeout_s)

    def close(self) -> None:
        """fsync and close; later appends are refused (their files are redone on resume)."""
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)  # also lets go of the lock
                self._fd = -1


def _recover(fd: int) -> Recovered:
    done: set[str] = set()
    ignored = good = 0
    torn = b""
    with open(fd, "rb", closefd=False) as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                torn = raw
                break
            good += len(raw)
            key = _key_of(raw)
            if key is None:
                ignored += raw.strip() != b""
            else:
                done.add(key)
    if torn:
        os.ftruncate(fd, good)
        os.fsync(fd)
    return Recovered(frozenset(done), ignored, len(torn))


def _key_of(raw: bytes) -> str | None:
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    key = record.get("file") if isinstance(record, dict) else None
    return key if isinstance(key, str) else None
