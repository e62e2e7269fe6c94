"""What a run tells: its ``Summary`` (counts, exit status, ``--summary-json``), the progress
line, and the ``Reporter`` that prints notes and progress on stderr."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO


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
