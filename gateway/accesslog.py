"""A machine-readable access log: one JSON object per request, appended to a file.

``wanwu tune`` and ``wanwu replay`` read it back as a trace (``scheduler.traces``):

    {"ts": 1732262400.123, "request_id": "…", "method": "POST",
     "path": "/v1/models/demo-shapes/predict", "status": 200, "model": "demo-shapes",
     "cold_start": false, "cached": false,
     "timing_ms": {"queue": 0.1, "spawn": 0.0, "worker": 2.1, "total": 4.0}}

``ts`` is when the request arrived (Unix seconds). Set ``WANWU_ACCESS_LOG`` to a path.

Every line is one JSON object: JSON escapes control characters, and the Unicode line
separators and NEL (which some readers split on) are escaped too, so no value a client sent (a
model name with a newline in it) can start a line of its own. A write that fails (a
full disk) is logged, at most once a minute, and counted; the request is answered as
if the log had been written.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

from scheduler.errors import ConfigError

log = logging.getLogger(__name__)
_SEPARATORS = re.compile("[\x85\u2028\u2029]")  # lines to some readers (str.splitlines); JSON lets them be raw
REPORT_EVERY_S = 60.0  # a failing log is reported at most this often


class JsonAccessLog:
    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8", buffering=1)  # a line at a time
        except OSError as exc:
            raise ConfigError(f"WANWU_ACCESS_LOG={str(path)!r}: cannot open it for appending: {exc}") from exc
        self.path = path
        self._lock = threading.Lock()
        self.failures = 0  # writes that failed
        self._reported = -REPORT_EVERY_S

    def write(self, entry: dict[str, Any]) -> bool:
        """Append ``entry``; False (and a logged error) if the file would not take it."""
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":"))
        line = _SEPARATORS.sub(lambda m: f"\\u{ord(m.group()):04x}", line) + "\n"
        with self._lock:
            try:
                self._file.write(line)
                return True
            except (OSError, ValueError) as exc:  # ValueError: closed during shutdown
                self.failures += 1
                now = time.monotonic()
                report, error = now - self._reported >= REPORT_EVERY_S, exc
                if report:
                    self._reported = now
        if report:
            log.error("access log %s: a write failed (%d so far): %s", self.path, self.failures, error)
        return False

    def close(self) -> None:
        with self._lock:
            self._file.close()
