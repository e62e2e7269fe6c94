"""The job: its ``Options``, and ``Backfill``, which runs one. The calling thread asks the
gateway for the model and its limits, checks the results' options record, feeds batches
to the sending threads (``Sender``, sending.py) and shows progress; ``interrupts`` turns
Ctrl-C into a gentle stop."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from queue import Full, Queue
from types import FrameType
from typing import Any

import requests

from ..client import GatewayUnreachable
from .errors import RESUME_HINT, BackfillError, OptionsMismatch
from .protocol import Backoff, Limits
from .report import Reporter, Summary
from .results import Recovered, ResultsFile, changed_options
from .sending import Sender
from .source import Source


class _Stopped(Exception):
    """The job was stopped before the gateway answered its first question."""


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


class Backfill(Sender):
    """One run: pending files in batches on a queue, ``concurrency`` threads (a Session
    each) sending them and writing the answers, the calling thread feeding the queue and
    showing progress. The HTTP session, the wait between retries, the clock and the
    jitter are arguments, for tests. The calling thread's part is here; the sending
    threads' is ``Sender`` (sending.py)."""

    def __init__(
        self,
        source: Source,
        results: ResultsFile,
        options: Options,
        *,
        reporter: Reporter | None = None,
        session_factory: Callable[[], requests.Session] = requests.Session,
        backoff: Backoff = Backoff(),  # noqa: B008  (frozen, so one default is safe to share)
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
        # --glob '*' must not take the job's own files for images
        directory = self.source.base if self.source.kind == "directory" else None
        keys = [k for k in self.source.keys if directory is None or not self.results.owns(os.path.join(directory, k))]
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

    def hold_writes(self, timeout_s: float = 2.0) -> bool:
        """Wait for a write in progress and allow no more (the process is about to leave)."""
        return self.results.hold(timeout_s)


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
