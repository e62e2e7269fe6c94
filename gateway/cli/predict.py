"""``wanwu predict``: classify files through a running gateway."""

from __future__ import annotations

import sys

import click

from ..client import request_json as _request
from .common import lang_option, print_table, reports_errors, url_option


def _query(**params: object) -> dict[str, object]:
    """Query parameters without the ones left unset."""
    return {key: value for key, value in params.items() if value is not None}


@click.command()
@url_option
@click.option(
    "--model", default=None, envvar="WANWU_DEFAULT_MODEL", help="Model name [default: the gateway's default]."
)
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(1, 1000))
@lang_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file instead of a table.")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@reports_errors
def predict(url: str, model: str | None, top_k: int, lang: str | None, as_json: bool, files: tuple[str, ...]) -> None:
    """Classify FILES through a running gateway."""
    import json
    from pathlib import Path

    endpoint = f"{url.rstrip('/')}/v1/models/{model}/predict" if model else f"{url.rstrip('/')}/predict"
    failed = 0
    rows: list[tuple[str, ...]] = []
    for name in files:
        with open(name, "rb") as handle:
            status, body = _request(
                "POST", endpoint, params=_query(top_k=top_k, lang=lang), files={"image": (Path(name).name, handle)}
            )
        if as_json:
            click.echo(json.dumps({"file": name, "status": status, **body}, ensure_ascii=False))
        if status != 200:
            failed += 1
            error = body.get("error", {})
            rows.append((name, f"{error.get('code', status)}: {error.get('message', '')}", "", "", ""))
            continue
        top = body["predictions"][0]
        cold = "cold" if body.get("cold_start") else ("cached" if body.get("cached") else "warm")
        rows.append((name, top["label"], f"{top['score']:.3f}", cold, f"{body['timing_ms']['total']:.1f}"))
    if not as_json:
        print_table(("file", "label", "score", "start", "ms"), rows)
    if failed:
        sys.exit(1)
