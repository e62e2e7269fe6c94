"""The settings table's parts: how one setting is declared (``Spec``, through
``setting``), parsed from text, TOML or JSON (``parse_value``), and shown (``markdown``:
the README's settings table is this module's output, checked by a unit test).
``scheduler/settings.py`` declares every setting with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Spec:
    """How one setting is checked and described. Bounds apply wherever the setting is
    given: the TOML file, the environment, ``wanwu serve`` flags, and (for the ones that
    change at run time) ``PATCH /v1/pool/settings`` and ``wanwu pool set``."""

    help: str  # the README's "meaning" (Markdown); the CLI shows it without backticks
    low: float | None = None  # the least value (see low_open)
    low_open: bool = False  # True: the value must be above ``low``, not equal to it
    high: float | None = None  # the greatest value, inclusive
    choices: tuple[str, ...] = ()
    runtime: bool = False  # changes without a restart (PATCH /v1/pool/settings, wanwu pool set)
    flag: bool = False  # a `wanwu serve` flag as well
    shown_default: str = ""  # the README's default where the value is computed at load

    def problem(self, value: Any) -> str | None:
        """What is wrong with a parsed ``value`` against these bounds, or None."""
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None and value > self.high:
            return f"must be at most {self.high:g}"
        return None


def setting(
    default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None, in_repr: bool = True, **spec: Any
) -> Any:
    metadata = {"spec": Spec(**spec)}
    if factory is not None:
        return field(default_factory=factory, repr=in_repr, metadata=metadata)
    return field(default=default, repr=in_repr, metadata=metadata)


POSITIVE: dict[str, Any] = {"low": 0, "low_open": True}
AT_LEAST_ZERO: dict[str, Any] = {"low": 0}
MAX_WORKERS = 1024  # a pool's bound; a larger N is a typo, not a plan
WEEK_S = 7 * 86400.0  # the longest idle TTL: longer is "never", and an idle GPU for that long is a mistake
DAY_S = 86400.0  # the longest timeout or grace: a deadline past it is a typo


def parse_value(kind: str, raw: Any, strict: bool = False) -> Any:
    """``raw`` as a value of ``kind`` (the field's annotation): from text (the
    environment, flags), TOML values, or, when ``strict``, JSON as a PATCH sends it, in
    which a number is not a string and an integer is a JSON integer (3.0 counts)."""
    if strict:
        _check_json_type(kind, raw)
        if kind == "str":
            return raw  # JSON says exactly what it means: " fixed " is not fixed
    return _PARSERS[kind](raw)


def _check_json_type(kind: str, raw: Any) -> None:
    if kind == "int" and (isinstance(raw, bool) or not isinstance(raw, (int, float))):
        raise ValueError("expected an integer")
    if kind == "float" and (isinstance(raw, bool) or not isinstance(raw, (int, float))):
        raise ValueError("expected a number")
    if kind == "bool" and not isinstance(raw, bool):
        raise ValueError("expected true or false")
    if kind in ("str", "Path") and not isinstance(raw, str):
        raise ValueError("expected a string")


def markdown(rows: Iterable[tuple[str, str, Any, Spec]]) -> str:
    """The README's settings table for ``(name, kind, default, spec)`` rows."""
    lines = ["| variable | default | bounds | at run time | meaning |", "| --- | --- | --- | --- | --- |"]
    for name, kind, default, spec in rows:
        shown = spec.shown_default or _shown(default)
        runtime = "yes" if spec.runtime else ""
        lines.append(f"| `WANWU_{name.upper()}` | {shown} | {bounds(kind, spec)} | {runtime} | {spec.help} |")
    return "\n".join(lines) + "\n"


def bounds(kind: str, spec: Spec) -> str:
    """A setting's bounds in words, e.g. ``> 0, at most 1024``; empty when it has none."""
    if spec.choices:
        return " \\| ".join(f"`{choice}`" for choice in spec.choices)
    parts = []
    if spec.low is not None:
        parts.append(f"{'>' if spec.low_open else '≥'} {spec.low:g}")
    if spec.high is not None:
        parts.append(f"≤ {spec.high:g}")
    text = ", ".join(parts)
    return f"{text}{' (integer)' if kind == 'int' and text else ''}"


def _shown(default: Any) -> str:
    if default in ("", ()):
        return "(empty)"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, str):
        return f"`{default}`"
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def _to_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _to_gpus(raw: Any) -> tuple[str, ...]:
    items = raw if isinstance(raw, (list, tuple)) else str(raw).split(",")
    gpus = tuple(str(item).strip() for item in items if str(item).strip())
    if gpus == ("auto",):
        return gpus
    for gpu in gpus:
        node, _, device = gpu.rpartition("/")
        if "/" in gpu and not (node and device):
            raise ValueError("expected NODE/GPU, e.g. gpu-1/GPU-0")
        if not (device.isdigit() or device.startswith(("GPU-", "MIG-")) or node):
            raise ValueError("expected device indexes or UUIDs separated by commas, e.g. 0,1 (swarm: NODE/GPU or auto)")
    return gpus


def _to_int(raw: Any) -> int:
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ValueError("expected an integer")
    try:
        return int(raw)
    except ValueError:
        raise ValueError("expected an integer") from None


def _to_float(raw: Any) -> float:
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    except OverflowError:  # an integer too large for a float
        raise ValueError("expected a finite number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError("expected a finite number")
    return value


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "int": _to_int,
    "float": _to_float,
    "bool": _to_bool,
    "str": lambda raw: str(raw).strip(),
    "Path": lambda raw: Path(str(raw)).expanduser(),
    "tuple[str, ...]": _to_gpus,
}
