"""What several ``wanwu`` commands share: the ``Name: message`` error report, settings,
the ``--url``/``--lang`` options, the trace arguments, and a table printer."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Sequence
from functools import wraps
from typing import Any, TypeVar

import click

from scheduler.errors import ConfigError, WanwuError
from scheduler.settings import SPECS, TYPES, Settings, env_name, parse

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(func: F) -> F:
    """Turn wanwu's own errors into ``Name: message`` and exit status 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except WanwuError as exc:
            click.echo(f"{type(exc).__name__}: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def load_settings(config: str | None, **flags: Any) -> Settings:
    """The settings from defaults, ``config`` (a TOML file), the environment and ``flags``
    (`wanwu serve`'s; `wanwu bundle` gives none)."""
    return Settings.load(config_file=config, flags=flags)


def setting_option(name: str, *decls: str, **extra: Any) -> Callable[[F], F]:
    """A click option for setting ``name``, typed, bounded and described by the settings
    table (scheduler/settings.py), so a flag and the setting cannot disagree. Unset
    (None) unless ``extra`` gives a default."""
    spec, kind = SPECS[name], TYPES[name]
    kind_type: Any = None
    if spec.choices:
        kind_type = click.Choice(spec.choices)
    elif kind == "int":
        low, high = (None if bound is None else int(bound) for bound in (spec.low, spec.high))
        kind_type = click.IntRange(min=low, max=high, min_open=spec.low_open)
    elif kind == "float":
        kind_type = click.FloatRange(min=spec.low, max=spec.high, min_open=spec.low_open)
    options: dict[str, Any] = {"type": kind_type, "default": None, "help": f"{plain(spec.help)} [{env_name(name)}]."}
    return click.option(*(decls or ("--" + name.replace("_", "-"),)), **{**options, **extra})


def setting_list(name: str) -> Callable[[click.Context, click.Parameter, str], list[Any]]:
    """A click callback for a comma-separated list of values of setting ``name`` (``wanwu
    tune --ttl 10,30,60``), each checked against the settings table."""

    def parse_list(ctx: click.Context, param: click.Parameter, raw: str) -> list[Any]:
        flag = param.opts[0] if param.opts else f"--{name.replace('_', '-')}"
        items = [item.strip() for item in raw.split(",") if item.strip()]
        if not items:
            raise click.BadParameter(f"{raw!r}: expected values separated by commas")
        try:
            return [parse(name, item, flag) for item in items]
        except ConfigError as exc:
            raise click.BadParameter(str(exc)) from None

    return parse_list


def plain(text: str) -> str:
    """The settings table's Markdown help as plain text for ``--help``: its first clause
    (up to a "; " or ". " outside parentheses), without code marks or links."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text).replace("`", "")
    depth = 0
    for i, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and text[i : i + 2] in ("; ", ". ") and not text[:i].endswith(("e.g", "i.e")):
            text = text[:i]
            break
    return text[:1].upper() + text[1:]


def url_option(func: F) -> F:
    return click.option(
        "--url", default="http://127.0.0.1:8080", show_default=True, envvar="WANWU_URL", help="The gateway's address."
    )(func)


lang_option = click.option(
    "--lang", default=None, help="Answer in this language, e.g. en [default: the model's own labels]."
)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    import unicodedata

    def width(text: str) -> int:  # CJK labels take two columns
        return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)

    widths = [max([width(h)] + [width(r[i]) for r in rows]) for i, h in enumerate(header)]
    for row in (header, *rows):
        click.echo("  ".join(cell + " " * (w - width(cell)) for cell, w in zip(row, widths, strict=True)).rstrip())


def _minutes(ctx: click.Context, param: click.Parameter, raw: str | None) -> tuple[int, int] | None:
    if raw is None:
        return None
    try:
        first, last = (int(part) for part in raw.split(":"))
    except ValueError:
        raise click.BadParameter(f"{raw!r}: expected A:B, minutes from the trace's start, e.g. 600:660") from None
    if not 0 <= first < last:
        raise click.BadParameter(f"{raw!r}: expected 0 <= A < B")
    return first, last


def trace_options(func: F) -> F:
    """TRACE and the options choosing which of its requests to play (`wanwu tune`, `wanwu replay`)."""
    func = click.option("--seed", default=0, show_default=True, help="Seed for spreading a minute's requests.")(func)
    func = click.option(
        "--minutes", callback=_minutes, default=None, help="Only minutes A to B of the trace, e.g. 600:660."
    )(func)
    func = click.option(
        "--max-per-day",
        type=click.FloatRange(min=0),
        default=None,
        help="Keep only models with at most this many requests a day (the low-QPS traffic wanwu is for).",
    )(func)
    return click.argument("trace", type=click.Path(exists=True))(func)
