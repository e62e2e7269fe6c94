"""Read one series' value out of Prometheus text exposition."""

from __future__ import annotations


def metric(text: str, series: str) -> float:
    """The value of ``series`` (name plus labels, exactly as exposed); 0 if absent."""
    for line in text.splitlines():
        if line.split(" ")[0] == series:
            return float(line.rsplit(" ", 1)[1])
    return 0.0
