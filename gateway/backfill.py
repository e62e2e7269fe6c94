"""``wanwu backfill``: push a directory (or a list) of images through a running gateway.

Files go in batches to ``POST /v1/models/<name>/predict:batch`` (``embed:batch`` for an
embedding model: one line per file with its vector) at ``batch`` priority,
a few requests in flight at once, and each answer becomes one JSON line per file in the
results file. The job can stop at any moment (Ctrl-C, a crash, a power cut) and the same
command resumes it. Every file ends up in the results exactly once:

- One job at a time writes a results file (an exclusive ``flock`` held for the run).
- On start the file's complete lines name the files already done; they are skipped. A
  last line without its newline is the remains of a write cut short: it is truncated
  away, so its file is redone and appears once.
- In a run each file is in one batch, and a line is written only once a file has its
  final answer (a result, or an error that retrying cannot fix). What is being retried,
  what failed transiently more than ``--max-retries`` times (counted in the summary as
  left for the next run), and what is still in flight when the job stops, is not
  written, so a rerun redoes it.
- The options that shape a line (model, top_k, lang) are kept beside the results, in
  ``<results>.options.json``; resuming with others is refused (``OptionsMismatch``).
- The directory is fsynced once the results file (or the options file) is created, so
  the file's name survives a power cut as its lines do.
- The lines of one answer are written whole with one ``write`` to a file opened with
  ``O_APPEND``; a second Ctrl-C waits for a write in progress before leaving. Only a
  process killed in the middle of a write can leave a partial line, and only at the end,
  where the next run repairs it.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import logging
import os
import random
import re
import signal
import stat
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Full, Queue
from types import FrameType
from typing import Any, TextIO
from urllib.parse import quote

import requests

from scheduler.errors import WanwuError
from scheduler.files import partial_path, sync_directory, write_text_whole

from .client import GatewayUnreachable

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
PRIORITY_HEADER = "X-Wanwu-Priority"
PART_OVERHEAD = 512  # bytes of multipart headers and boundary per image, besides its name
ANSWER_EXTRAS = ("groups", "confident")  # what an answer may carry beside its predictions, kept per file
RESUME_HINT = "rerun the same command to resume"
OPTIONS_SUFFIX = ".options.json"  # beside the results: what they were made with
OPTIONS_VERSION = 1
CONTENT_OPTIONS = {"model": "--model", "top_k": "--top-k", "lang": "--lang"}  # what shapes a line, and its flag


class BackfillError(WanwuError):
    """The backfill cannot go on: a bad source or results file, an unknown model, or a
    request the gateway refuses as a whole."""


class OptionsMismatch(BackfillError):
    """The results file was made with other options than the ones given now."""


class _Stopped(Exception):
    """The job was stopped before the gateway answered its first question."""


# Sources


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


# The results file


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

    @property
    def own_paths(self) -> tuple[str, ...]:
        """The files this writes, which a source that holds them must not take for images."""
        return self.path, self.options_path, str(partial_path(self.options_path))

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
            write_text_whole(self.options_path, json.dumps(record, ensure_ascii=False, indent=2) + "\n")
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


# Talking to the gateway


@dataclass(frozen=True)
class Limits:
    """What the gateway accepts, from ``GET /v1/models``."""

    max_upload_bytes: int
    max_batch_images: int
    max_batch_upload_bytes: int

    @classmethod
    def from_json(cls, raw: Any, url: str) -> Limits:
        try:
            return cls(
                int(float(raw["max_upload_mb"]) * 2**20),
                int(raw["max_batch_images"]),
                int(float(raw["max_batch_upload_mb"]) * 2**20),
            )
        except (KeyError, TypeError, ValueError):
            raise BackfillError(
                f"{url}/v1/models has no batch limits: the gateway predates the batch endpoint"
            ) from None


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter; a server's Retry-After is the floor."""

    base_s: float = 0.5
    cap_s: float = 60.0

    def delay(self, attempt: int, floor_s: float = 0.0, rand: float = 0.5) -> float:
        """Seconds before retry number ``attempt`` (0 first); ``rand`` in [0, 1)."""
        grown = min(self.cap_s, self.base_s * 2.0 ** min(attempt, 32))
        return max(floor_s, grown * (0.5 + rand / 2))


@dataclass(frozen=True)
class Reply:
    """A batch request's outcome, judged by its status.

    ``kind``: ``ok`` (per-image results), ``busy`` (503/429: retry after ``retry_after_s``,
    for ever), ``retry`` (502/504/500, a timeout, a garbled answer: a few times),
    ``split`` (413: send halves), ``fatal`` (stop the job)."""

    kind: str
    code: str = ""
    message: str = ""
    results: tuple[Any, ...] = ()
    retry_after_s: float = 0.0


def judge(status: int, body: Any, retry_after: str | None, model: str) -> Reply:
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    code, message = str(error.get("code", f"http_{status}")), str(error.get("message", ""))[:500]
    if status == 200:
        results = body.get("results") if isinstance(body, dict) else None
        if isinstance(results, list):
            return Reply("ok", results=tuple(results))
        return Reply("retry", "bad_answer", "the gateway answered 200 without results")
    if status in (429, 503):
        return Reply("busy", code, message, retry_after_s=_seconds(retry_after))
    if status == 413:
        return Reply("split", "too_large" if code == "http_413" else code, message or "the request is too large")
    if status in (500, 502, 504):
        return Reply("retry", code, message or f"the gateway answered {status}")
    if status == 404 and code == "unknown_model":
        return Reply("fatal", code, f"the gateway serves no model named {model}: {message}")
    if status == 404:
        return Reply("fatal", code, f"the gateway has no batch endpoint (404 {code}): it predates wanwu backfill")
    return Reply("fatal", code, f"the gateway refused a batch with {status} {code}: {message}")


def _seconds(raw: str | None) -> float:
    try:
        value = float(raw) if raw is not None else 1.0
    except ValueError:
        return 1.0  # an HTTP date: not worth parsing, the backoff grows anyway
    return value if 0 <= value < float("inf") else 1.0


# The job


@dataclass(frozen=True)
class Options:
    url: str = "http://127.0.0.1:8080"
    model: str | None = None  # None: the gateway's default
    top_k: int = 5
    batch_size: int = 32
    concurrency: int = 4
    timeout_s: float = 300.0
    max_retries: int = 8
    grace_s: float = 5.0  # how long a stopping job waits for the requests in flight
    lang: str | None = None  # answer in this language (the model's translation); None: its own labels


@dataclass
class Item:
    key: str
    data: bytes
    attempts: int = 0  # retryable errors so far

    @property
    def cost(self) -> int:
        return len(self.data) + len(self.key) + PART_OVERHEAD


@dataclass
class Summary:
    """A run's counts; ``to_json`` is what ``--summary-json`` writes."""

    output: str
    model: str = ""
    total: int = 0
    skipped: int = 0  # already in the results file
    done: int = 0  # lines written now (results and errors)
    failed: int = 0  # error lines written now
    retry_later: Counter[str] = field(default_factory=Counter)  # files left for the next run, by error code
    labels: Counter[str] = field(default_factory=Counter)  # top-1 labels written now
    elapsed_s: float = 0.0
    ignored_lines: int = 0
    truncated_bytes: int = 0
    interrupted: bool = False
    unreachable: str | None = None
    fatal: str | None = None

    @property
    def left(self) -> int:
        return self.total - self.skipped - self.done

    @property
    def images_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def left_for_next_run(self) -> int:
        """Files whose transient errors outlasted ``--max-retries``: not written, so a rerun retries them."""
        return self.retry_later.total()

    @property
    def exit_status(self) -> int:
        """0 all good, 1 error lines or a fatal error, 3 unreachable, 4 files left for the
        next run (only when no file got an error line: those need a person, a rerun does
        not), 130 interrupted (2, usage errors, is click's)."""
        if self.fatal:
            return 1
        if self.unreachable:
            return 3
        if self.interrupted:
            return 130
        if self.failed:
            return 1
        return 4 if self.left_for_next_run else 0

    def ranked_labels(self) -> list[tuple[str, int]]:
        return sorted(self.labels.items(), key=lambda kv: (-kv[1], kv[0]))

    def to_json(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "model": self.model,
            "total": self.total,
            "skipped": self.skipped,
            "done": self.done,
            "failed": self.failed,
            "left": self.left,
            "left_for_next_run": self.left_for_next_run,
            "left_for_next_run_by_code": dict(sorted(self.retry_later.items(), key=lambda kv: (-kv[1], kv[0]))),
            "images_per_s": round(self.images_per_s, 2),
            "elapsed_s": round(self.elapsed_s, 3),
            "labels": dict(self.ranked_labels()),
            "ignored_lines": self.ignored_lines,
            "interrupted": self.interrupted,
            "unreachable": self.unreachable,
            "fatal": self.fatal,
            "exit_status": self.exit_status,
        }

    def describe(self) -> list[str]:
        lines = [
            f"wanwu backfill: {self.total} files, {self.skipped} skipped (already in {self.output}), "
            f"{self.done} done now, {self.failed} failed now, {self.left} left",
            f"  {self.images_per_s:.1f} images/s over {_duration(self.elapsed_s)} with {self.model or '-'}",
        ]
        if self.left_for_next_run:
            codes = ", ".join(f"{code} {count}" for code, count in self.retry_later.most_common())
            lines.append(
                f"  {self.left_for_next_run} left for the next run: their transient errors ({codes}) outlasted "
                "--max-retries; rerun the same command to retry them"
            )
        if self.ignored_lines:
            lines.append(f"  {self.ignored_lines} unreadable lines in {self.output} were ignored")
        if self.labels:
            lines.append("  top-1 labels this run:")
            lines += [f"  {count:>9}  {label}" for label, count in self.ranked_labels()]
        return lines


def format_progress(summary: Summary, rate: float) -> str:
    finished = summary.skipped + summary.done
    percent = 100.0 * finished / summary.total if summary.total else 100.0
    eta = _duration(summary.left / rate) if rate > 0 else "-"
    return (
        f"backfill: {finished}/{summary.total} ({percent:.1f} %), {rate:.1f} images/s, ETA {eta}, "
        f"{summary.skipped} skipped, {summary.failed} failed"
    )


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def _say(say: Callable[[str], None] | None, text: str) -> None:
    if say is not None:
        say(text)


class Reporter:
    """Notes and the progress line on one stream (stderr): on a terminal one line updated
    in place (notes clear it first), elsewhere a plain line every ``interval_s``."""

    def __init__(
        self,
        stream: TextIO | None,
        show_progress: bool = True,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.show_progress = show_progress and stream is not None
        self.tty = bool(stream is not None and stream.isatty())
        self.interval_s = 0.5 if self.tty else interval_s
        self._clock = clock
        self._lock = threading.RLock()  # a Ctrl-C handler may say something while progress is drawn
        self._shown = False  # a progress line is on the terminal
        self._last = clock()
        self._samples: deque[tuple[float, int]] = deque([(self._last, 0)])  # (when, done)

    def say(self, text: str) -> None:
        if self.stream is None:
            return
        with self._lock:
            self.stream.write(("\r\x1b[K" if self._shown else "") + text + "\n")
            self.stream.flush()
            self._shown = False

    def rate(self, now: float, done: int, window_s: float = 30.0) -> float:
        """Images a second over the last ``window_s``."""
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] >= window_s:
            self._samples.popleft()
        then, before = self._samples[0]
        return (done - before) / (now - then) if now > then else 0.0

    def progress(self, summary: Summary, force: bool = False) -> None:
        now = self._clock()
        if not self.show_progress or self.stream is None or (not force and now - self._last < self.interval_s):
            return
        self._last = now
        rate = self.rate(now, summary.done)
        with self._lock:
            if self.tty:
                self.stream.write("\r\x1b[K" + format_progress(summary, rate))
                self._shown = True
            else:
                self.stream.write(format_progress(summary, rate) + "\n")
            self.stream.flush()

    def finish(self) -> None:
        with self._lock:
            if self._shown and self.stream is not None:
                self.stream.write("\n")
                self.stream.flush()
            self._shown = False


class Backfill:
    """One run: pending files in batches on a queue, ``concurrency`` threads (a Session
    each) sending them and writing the answers, the calling thread feeding the queue and
    showing progress. The HTTP session, the wait between retries, the clock and the
    jitter are arguments, for tests."""

    def __init__(
        self,
        source: Source,
        results: ResultsFile,
        options: Options,
        *,
        reporter: Reporter | None = None,
        session_factory: Callable[[], requests.Session] = requests.Session,
        backoff: Backoff = Backoff(),
        wait: Callable[[float], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.source = source
        self.results = results
        self.options = options
        self.url = options.url.rstrip("/")
        self.reporter = reporter or Reporter(None)
        self._session_factory = session_factory
        self._backoff = backoff
        self._wait_fn = wait
        self._clock = clock
        self._rand = rand
        self._lock = threading.Lock()  # the summary's counts, and what was written
        self._stop = threading.Event()
        self._summary = Summary(results.path)
        self._busy_noted = float("-inf")
        self._route = "predict:batch"  # embed:batch for an embedding model (``discover``)

    # The calling thread

    def run(self, stop: threading.Event | None = None) -> Summary:
        """Classify every file not in the results yet. Setting ``stop`` (Ctrl-C) stops
        sending, waits up to ``grace_s`` for what is in flight, and returns."""
        self._stop = stop or threading.Event()
        summary = self._summary
        try:
            model, top_k, limits = self.discover()
        except _Stopped:
            summary.total, summary.interrupted = len(self.source.keys), True
            return summary
        own = {self.source.key_of(path) for path in self.results.own_paths}  # --glob '*' must not take them
        keys = [key for key in self.source.keys if key not in own]
        summary.model, summary.total = model, len(keys)
        recovered = self.results.open()
        started = self._clock()
        try:
            self._settle_options(recovered, self._content_options(model, top_k))
            if recovered.truncated_bytes:
                self.say(
                    f"wanwu backfill: {self.results.path} ended in a partial line ({recovered.truncated_bytes} bytes, "
                    "from a run cut short); removed it, its file will be redone"
                )
            if recovered.ignored_lines:
                self.say(
                    f"wanwu backfill: ignoring {recovered.ignored_lines} lines of {self.results.path} that are not "
                    'JSON objects with a "file"'
                )
            pending = [key for key in keys if key not in recovered.done]
            summary.skipped, summary.ignored_lines = summary.total - len(pending), recovered.ignored_lines
            summary.truncated_bytes = recovered.truncated_bytes
            size = min(self.options.batch_size, limits.max_batch_images)
            if size < self.options.batch_size:
                self.say(f"wanwu backfill: batches of {size}, the gateway's most images a request")
            self.say(
                f"wanwu backfill: {summary.total} files, {summary.skipped} already in {self.results.path}, "
                f"{len(pending)} to classify with {model} in batches of {size}"
            )
            self._feed(pending, size, model, top_k, limits)
        finally:
            with self._lock:
                self.results.close()
        summary.elapsed_s = self._clock() - started
        summary.interrupted = self._stop.is_set() and summary.left > 0
        if self.reporter.tty:
            self.reporter.progress(summary, force=True)
        self.reporter.finish()
        return summary

    def _content_options(self, model: str, top_k: int) -> dict[str, Any]:
        """The options that shape a line, as sent: an embedding has no top_k or lang."""
        params = self._params(top_k)
        return {"model": model, "top_k": params.get("top_k"), "lang": params.get("lang")}

    def _settle_options(self, recovered: Recovered, now: dict[str, Any]) -> None:
        """Refuse to add lines made with other options; keep these where nothing is written yet."""
        if not recovered.has_lines:
            self.results.record_options(now)
            return
        recorded = self.results.recorded_options()
        if recorded is None:  # made by a wanwu that kept no options, or a copy of the lines alone
            self.say(
                f"wanwu backfill: {self.results.path} has no record of the options it was made with "
                f"({self.results.options_path}); resuming it as made with these, and keeping them"
            )
            self.results.record_options(now)
            return
        changed = changed_options(recorded, now)
        if changed:
            raise OptionsMismatch(
                f"{self.results.path} was made with other options ({'; '.join(changed)}; "
                f"recorded in {self.results.options_path}): resume with the same ones, or write to another --out"
            )

    def discover(self) -> tuple[str, int, Limits]:
        """The model (given or the gateway's default), top_k within its labels, and the limits."""
        session = self._session_factory()
        try:
            body = self._get_models(session)
        finally:
            session.close()
        models = body.get("models") if isinstance(body, dict) else None
        if not isinstance(models, list):
            raise BackfillError(f"{self.url}/v1/models answered without a model list")
        limits = Limits.from_json(body.get("limits"), self.url)
        by_name = {m.get("name"): m for m in models if isinstance(m, dict)}
        model = self.options.model or next((str(n) for n, m in by_name.items() if m.get("default")), None)
        if model is None:
            raise BackfillError(f"{self.url} has no default model; name one with --model")
        if model not in by_name:
            names = ", ".join(sorted(str(n) for n in by_name)) or "none"
            raise BackfillError(f"{self.url} serves no model named {model} (it has: {names})")
        labels = by_name[model].get("labels")
        top_k = min(self.options.top_k, len(labels)) if isinstance(labels, list) and labels else self.options.top_k
        self._route = "embed:batch" if by_name[model].get("task") == "embed" else "predict:batch"
        return model, top_k, limits

    def _get_models(self, session: requests.Session) -> Any:
        failures = 0
        while True:
            try:
                response = session.get(f"{self.url}/v1/models", timeout=30)
                break
            except requests.RequestException as exc:
                failures += 1
                if failures > self.options.max_retries:
                    raise GatewayUnreachable(self._unreachable(exc, failures)) from exc
                if self._wait(self._backoff.delay(failures - 1, rand=self._rand())):
                    raise _Stopped from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 200 or not isinstance(body, dict):
            raise BackfillError(f"{self.url}/v1/models answered {response.status_code}: {response.text[:200]}")
        return body

    def _feed(self, pending: list[str], size: int, model: str, top_k: int, limits: Limits) -> None:
        batches: Queue[list[str] | None] = Queue(maxsize=self.options.concurrency)
        threads = [
            threading.Thread(
                target=self._work, args=(batches, model, top_k, limits), name=f"wanwu-backfill-{i}", daemon=True
            )
            for i in range(self.options.concurrency)
        ]
        for thread in threads:
            thread.start()
        for first in range(0, len(pending), size):
            if not self._put(batches, pending[first : first + size]):
                break
        for _ in threads:
            if not self._put(batches, None):
                break
        deadline = float("inf")
        while alive := [t for t in threads if t.is_alive()]:
            if self._stop.is_set() and deadline == float("inf"):
                deadline = self._clock() + self.options.grace_s
            if self._clock() >= deadline:
                break  # what is still in flight is redone next run
            alive[0].join(0.1)
            self._tick()

    def _put(self, batches: Queue[list[str] | None], batch: list[str] | None) -> bool:
        while not self._stop.is_set():
            try:
                batches.put(batch, timeout=0.1)
                return True
            except Full:
                pass
            finally:
                self._tick()
        return False

    def _tick(self) -> None:
        self.results.sync_if_due()
        with self._lock:
            self.reporter.progress(self._summary)

    def say(self, text: str) -> None:
        self.reporter.say(text)

    # The sending threads

    def _work(self, batches: Queue[list[str] | None], model: str, top_k: int, limits: Limits) -> None:
        session = self._session_factory()
        session.headers[PRIORITY_HEADER] = "batch"
        try:
            while not self._stop.is_set():
                try:
                    batch = batches.get(timeout=0.1)
                except Empty:
                    continue
                if batch is None:
                    break
                self._batch(session, batch, model, top_k, limits)
        except Exception as exc:  # a bug: stop the job, say why, keep what is written
            log.exception("backfill thread failed")
            self._halt("fatal", f"{type(exc).__name__}: {exc}")
        finally:
            session.close()

    def _batch(self, session: requests.Session, keys: list[str], model: str, top_k: int, limits: Limits) -> None:
        """Read the batch's files and send them in requests within the upload limits."""
        chunk: list[Item] = []
        lines: list[bytes] = []
        size = 0
        for key in keys:
            if self._stop.is_set():
                return
            item = self._read(key, limits, lines)
            if item is None:
                continue
            if chunk and size + item.cost > limits.max_batch_upload_bytes:
                self._write(lines)
                lines = []
                self._settle(session, chunk, model, top_k)
                chunk, size = [], 0
            chunk.append(item)
            size += item.cost
        self._write(lines)
        if chunk:
            self._settle(session, chunk, model, top_k)

    def _read(self, key: str, limits: Limits, lines: list[bytes]) -> Item | None:
        """The file's bytes, or None with an error line added to ``lines``."""
        path = self.source.path_of(key)
        try:
            # O_NONBLOCK: a FIFO named in a list must not hang the thread.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, "rb") as handle:
                info = os.fstat(fd)
                mode, size = info.st_mode, info.st_size
                if stat.S_ISDIR(mode):
                    raise IsADirectoryError(21, "Is a directory")
                if not stat.S_ISREG(mode):
                    raise OSError(0, "not a regular file")
                data = handle.read(limits.max_upload_bytes + 1) if size <= limits.max_upload_bytes else b""
        except OSError as exc:
            lines.append(_error_line(key, "unreadable", exc.strerror or str(exc)))
            return None
        if size > limits.max_upload_bytes or len(data) > limits.max_upload_bytes:
            limit_mb = limits.max_upload_bytes / 2**20
            message = f"the file is {max(size, len(data))} bytes; the gateway's limit is {limit_mb:g} MB"
            lines.append(_error_line(key, "too_large", message))
            return None
        return Item(key, data)

    def _settle(self, session: requests.Session, items: list[Item], model: str, top_k: int) -> None:
        """Send ``items`` until each has its line, or the job stops (then they are redone
        next run). 503s are retried for ever; other transient failures ``--max-retries``
        times, then the files are left for the next run (no line)."""
        work = [items]
        busy = failures = unreachable = 0
        while work and not self._stop.is_set():
            chunk = work.pop()
            try:
                reply = self._post(session, chunk, model, top_k)
            except requests.ConnectionError as exc:
                unreachable += 1
                if unreachable > self.options.max_retries:
                    self._halt("unreachable", self._unreachable(exc, unreachable))
                    return
                work.append(chunk)
                self._pause(unreachable - 1)
                continue
            except requests.RequestException as exc:  # a read timeout, a broken answer
                reply = Reply("retry", "timeout" if isinstance(exc, requests.Timeout) else "request_failed", str(exc))
            unreachable = 0
            if reply.kind == "ok":
                busy = failures = 0
                retry = self._answered(chunk, reply.results)
                if retry:
                    work.append(retry)
                    self._pause(max(item.attempts for item in retry) - 1)
            elif reply.kind == "busy":
                busy += 1
                work.append(chunk)
                self._note_busy(busy, reply)
                self._pause(busy - 1, reply.retry_after_s)
            elif reply.kind == "retry":
                failures += 1
                if failures > self.options.max_retries:
                    log.debug("%d files: %s %s; left for the next run", len(chunk), reply.code, reply.message)
                    self._leave(Counter({reply.code: len(chunk)}))
                else:
                    work.append(chunk)
                    self._pause(failures - 1)
            elif reply.kind == "split" and len(chunk) > 1:
                half = len(chunk) // 2
                work += [chunk[half:], chunk[:half]]  # the first half goes first
            elif reply.kind == "split":
                self._write([_error_line(chunk[0].key, reply.code, reply.message)])
            else:
                self._halt("fatal", reply.message)
                return

    def _params(self, top_k: int) -> dict[str, str | int]:
        """The query of a classification batch: top_k, and lang if asked for."""
        if self._route != "predict:batch":
            return {}
        return {"top_k": top_k, **({"lang": self.options.lang} if self.options.lang else {})}

    def _post(self, session: requests.Session, chunk: list[Item], model: str, top_k: int) -> Reply:
        parts = [("image", (_part_name(item.key), item.data, "application/octet-stream")) for item in chunk]
        response = session.post(
            f"{self.url}/v1/models/{quote(model, safe='')}/{self._route}",
            params=self._params(top_k),
            files=parts,
            timeout=self.options.timeout_s,
        )
        try:
            body = response.json()
        except ValueError:  # a proxy's error page: the status still says what to do
            body = None
        return judge(response.status_code, body, response.headers.get("Retry-After"), model)

    def _answered(self, chunk: list[Item], results: Sequence[Any]) -> list[Item]:
        """Write the final answers of a 200; return the images to send again (those whose
        retryable errors outlasted ``--max-retries`` are left for the next run)."""
        by_index: dict[Any, dict[str, Any]] = {r.get("index"): r for r in results if isinstance(r, dict)}
        lines: list[bytes] = []
        labels: list[str] = []
        retry: list[Item] = []
        given_up: Counter[str] = Counter()  # files left for the next run, by error code
        for index, item in enumerate(chunk):
            result = by_index.get(index, {})
            predictions, error = result.get("predictions"), result.get("error")
            if isinstance(result.get("embedding"), list):
                lines.append(
                    encode_line({"file": item.key, "embedding": result["embedding"], "dim": result.get("dim")})
                )
                labels.append("")  # answered (not failed), with no label to count
                continue
            if isinstance(predictions, list):
                extra = {key: result[key] for key in ANSWER_EXTRAS if key in result}
                lines.append(encode_line({"file": item.key, "predictions": predictions, **extra}))
                top = predictions[0] if predictions and isinstance(predictions[0], dict) else {}
                labels.append(str(top.get("label") or result.get("result") or ""))
                continue
            if isinstance(error, dict) and not result.get("retryable"):
                lines.append(_error_line(item.key, str(error.get("code", "error")), str(error.get("message", ""))))
                continue
            code, message = "no_result", "the gateway's answer had no result for it"
            if isinstance(error, dict):
                code, message = str(error.get("code", "error")), str(error.get("message", ""))
            item.attempts += 1
            if item.attempts > self.options.max_retries:
                given_up[code] += 1
                log.debug("%s: %s %s (after %d tries); left for the next run", item.key, code, message, item.attempts)
            else:
                retry.append(item)
        self._write(lines, labels)
        self._leave(given_up)
        return retry

    def _write(self, lines: list[bytes], labels: Sequence[str] = ()) -> None:
        if not lines:
            return
        with self._lock:
            if not self.results.append(lines):
                return  # the job has closed the file: these are redone next run
            summary = self._summary
            summary.done += len(lines)
            summary.failed += len(lines) - len(labels)
            summary.labels.update(label for label in labels if label)

    def _leave(self, counts: Counter[str]) -> None:
        """Count files given no line (by error code): their failure is transient, so the
        next run retries them."""
        if counts:
            with self._lock:
                self._summary.retry_later.update(counts)

    def _pause(self, attempt: int, floor_s: float = 0.0) -> None:
        self._wait(self._backoff.delay(attempt, floor_s, self._rand()))

    def _wait(self, seconds: float) -> bool:
        """Sleep unless the job stops first; True if it did."""
        if self._wait_fn is not None:
            return self._wait_fn(seconds) or self._stop.is_set()
        return self._stop.wait(seconds)

    def _note_busy(self, busy: int, reply: Reply) -> None:
        now = self._clock()
        with self._lock:
            if busy < 3 or now - self._busy_noted < 60:
                return
            self._busy_noted = now
        self.say(
            f"wanwu backfill: the gateway keeps answering 503 {reply.code} ({busy} times in a row for one batch); "
            "still retrying, its capacity is shared with live traffic"
        )

    def _halt(self, why: str, message: str) -> None:
        with self._lock:
            summary = self._summary
            if summary.fatal is None and summary.unreachable is None:
                if why == "unreachable":
                    summary.unreachable = message
                else:
                    summary.fatal = message
        self._stop.set()

    def _unreachable(self, exc: Exception, attempts: int) -> str:
        return f"gateway unreachable at {self.url} after {attempts} tries ({type(exc).__name__}); {RESUME_HINT}"

    def hold_writes(self, timeout_s: float = 2.0) -> bool:
        """Wait for a write in progress and allow no more (the process is about to leave)."""
        return self.results.hold(timeout_s)


def _error_line(key: str, code: str, message: str) -> bytes:
    return encode_line({"file": key, "error": {"code": code, "message": message}})


def _part_name(key: str) -> str:
    # The part's filename is only echoed back; a name that is not UTF-8 cannot go in a header.
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@contextmanager
def interrupts(job: Backfill, stop: threading.Event) -> Iterator[None]:
    """The first Ctrl-C (or SIGTERM, as from a job scheduler) stops the job gently
    (``stop``); the second leaves at once, but never in the middle of a write."""
    presses = 0

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            job.say("wanwu backfill: stopping after the requests in flight (Ctrl-C again to leave now)")
            stop.set()
            return
        job.hold_writes()
        job.reporter.finish()
        job.say(f"interrupted: {RESUME_HINT}")
        os._exit(130)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
