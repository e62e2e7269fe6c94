"""The sending threads of a job: each takes batches off the queue, reads their files, posts
them within the gateway's upload limits, retries what can be retried, and writes each
file's final answer to the results."""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from queue import Empty, Queue
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import requests

from .errors import RESUME_HINT
from .protocol import Backoff, Limits, Reply, judge
from .report import Reporter, Summary
from .results import ResultsFile, encode_line
from .source import Source

if TYPE_CHECKING:
    from .job import Options

log = logging.getLogger(__name__)

PRIORITY_HEADER = "X-Wanwu-Priority"
PART_OVERHEAD = 512  # bytes of multipart headers and boundary per image, besides its name
ANSWER_EXTRAS = ("groups", "confident")  # what an answer may carry beside its predictions, kept per file


@dataclass
class Item:
    key: str
    data: bytes
    attempts: int = 0  # retryable errors so far

    @property
    def cost(self) -> int:
        return len(self.data) + len(self.key) + PART_OVERHEAD


class Sender:
    """The sending threads' half of a ``Backfill`` (job.py), which sets up these attributes
    and runs ``_work`` in each thread; what both halves share (the lock, the stop event,
    the summary) is the job's."""

    source: Source
    results: ResultsFile
    options: Options
    url: str
    reporter: Reporter
    _session_factory: Callable[[], requests.Session]
    _backoff: Backoff
    _wait_fn: Callable[[float], bool] | None
    _clock: Callable[[], float]
    _rand: Callable[[], float]
    _lock: threading.Lock
    _stop: threading.Event
    _summary: Summary
    _busy_noted: float
    _route: str

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


def _error_line(key: str, code: str, message: str) -> bytes:
    return encode_line({"file": key, "error": {"code": code, "message": message}})


def _part_name(key: str) -> str:
    # The part's filename is only echoed back; a name that is not UTF-8 cannot go in a header.
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
