"""Log lines that say what happened and nothing a client put there on purpose.

A model name, a file name or a header value can carry a newline; logged as is, it
writes a line of its own that looks like any other record (a forged access-log line).
``EscapingFormatter`` escapes control characters (C0, DEL, C1, the Unicode line and
paragraph separators and the bidirectional controls) in every formatted record, so each record is one line; an
exception's traceback keeps its lines, each indented, so no line of it can start like a
record. The gateway and the worker both log through it.
"""

from __future__ import annotations

import logging
import re
from types import TracebackType
from typing import TextIO

# C0, DEL, C1, the line and paragraph separators, and the bidirectional controls (which
# make a line read otherwise than it is written).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u2028-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def escape(text: str) -> str:
    """``text`` with every control character written as an escape (\\n, \\x1b, \\u2028)."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), m.group().encode("unicode_escape").decode("ascii")), text)


class EscapingFormatter(logging.Formatter):
    """A ``logging.Formatter`` whose records are one line each (see the module doc)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return escape(super().formatMessage(record))

    def formatException(self, ei: ExcInfo) -> str:  # noqa: N802
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + escape(line) for line in text.split("\n"))


def configure(level: int | str, fmt: str, stream: TextIO | None = None) -> None:
    """``logging.basicConfig`` with an ``EscapingFormatter`` (entry points only)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EscapingFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
