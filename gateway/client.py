"""The CLI's HTTP client of a running gateway (``predict``, ``pool status``, ``replay``)."""

from __future__ import annotations

from typing import Any

from scheduler.errors import WanwuError


class GatewayUnreachable(WanwuError):
    """The gateway did not answer, or not with JSON."""


def request_json(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    """``(status, body)`` of a JSON answer; GatewayUnreachable for anything else."""
    import requests

    try:
        response = requests.request(method, url, timeout=kwargs.pop("timeout", 120), **kwargs)
    except requests.RequestException as exc:
        raise GatewayUnreachable(f"cannot reach {url}: {exc}") from exc
    try:
        body = response.json()
    except ValueError:
        raise GatewayUnreachable(f"{url} answered {response.status_code} without JSON: {response.text[:200]}") from None
    return response.status_code, body
