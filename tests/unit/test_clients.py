"""One client's requests in the app are bounded (ClientGate): per address, per IPv6 /64,
and behind a trusted proxy per forwarded address; probes are never refused."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from scheduler.errors import ConfigError
from scheduler.settings import Settings
from tests.images import demo_images
from tests.promtext import metric
from tests.unit.fakes import FakeBackend, fake_gateway, make_bundle

IMAGE = next(iter(demo_images(seed=7).values()))


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    make_bundle(tmp_path, "demo-shapes")
    settings = Settings(
        models_dir=tmp_path,
        max_workers=1,
        stem_cells=0,
        default_model="demo-shapes",
        client_max_requests=2,
        trusted_proxies="10.0.0.0/8",
    )
    with fake_gateway(FakeBackend(), settings) as app:
        yield app


def held_predictions(app: Flask, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Every prediction waits for the returned event before the pool sees it."""
    release = threading.Event()
    pool = app.extensions["wanwu"].pool
    real = pool.predict

    def held(*args: Any, **kwargs: Any) -> Any:
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(pool, "predict", held)
    return release


def predict(app: Flask, remote: str, forwarded: str | None = None) -> Any:
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    return app.test_client().post(
        "/v1/models/demo-shapes/predict",
        data={"image": (io.BytesIO(IMAGE), "a.png")},
        content_type="multipart/form-data",
        headers=headers,
        environ_base={"REMOTE_ADDR": remote},
    )


def in_flight(app: Flask, count: int, remote: str, forwarded: str | None = None) -> list[threading.Thread]:
    gate = app.extensions["wanwu"].gate
    before = gate.held()
    threads = [threading.Thread(target=predict, args=(app, remote, forwarded)) for _ in range(count)]
    for thread in threads:
        thread.start()
    deadline = threading.Event()
    for _ in range(200):
        if gate.held() == before + count:
            break
        deadline.wait(0.02)
    assert gate.held() == before + count
    return threads


def test_a_clients_requests_past_the_bound_get_a_429_and_others_go_on(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = held_predictions(app, monkeypatch)
    threads = in_flight(app, 2, "192.0.2.1")
    refused = predict(app, "192.0.2.1")
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.get_json()["error"]["code"] == "too_many_requests"
    client = app.test_client()
    probe = client.get("/healthz", environ_base={"REMOTE_ADDR": "192.0.2.1"})
    assert probe.status_code == 200  # probes are never counted
    other = client.get("/v1/pool", environ_base={"REMOTE_ADDR": "192.0.2.2"})
    assert other.status_code == 200
    release.set()
    for thread in threads:
        thread.join(10)
    assert app.extensions["wanwu"].gate.held() == 0
    assert predict(app, "192.0.2.1").status_code == 200
    assert metric(client.get("/metrics").get_data(as_text=True), "wanwu_client_requests_refused_total") == 1


def test_an_ipv6_client_is_its_64(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    release = held_predictions(app, monkeypatch)
    threads = in_flight(app, 2, "2001:db8:0:1::10")
    assert predict(app, "2001:db8:0:1::99").status_code == 429  # same /64
    release.set()
    for thread in threads:
        thread.join(10)


def test_behind_a_trusted_proxy_each_forwarded_client_is_bounded_alone(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = held_predictions(app, monkeypatch)
    threads = in_flight(app, 2, "10.0.0.5", "198.51.100.7")
    assert predict(app, "10.0.0.5", "198.51.100.7").status_code == 429
    # a client claiming another address left of the proxy's entry is still itself
    assert predict(app, "10.0.0.5", "203.0.113.1, 198.51.100.7").status_code == 429
    threads += in_flight(app, 1, "10.0.0.5", "198.51.100.8")  # another client behind the same proxy
    # an untrusted peer's X-Forwarded-For is ignored: it is counted as itself
    threads += in_flight(app, 2, "192.0.2.50", "198.51.100.9")
    assert predict(app, "192.0.2.50", "198.51.100.10").status_code == 429
    release.set()
    for thread in threads:
        thread.join(10)


def test_trusted_proxies_are_checked_at_start() -> None:
    with pytest.raises(ConfigError, match=r"WANWU_TRUSTED_PROXIES=.*not-a-network.* not an address"):
        Settings.load(environ={"WANWU_TRUSTED_PROXIES": "10.0.0.0/8, not-a-network"})
    assert Settings.load(environ={"WANWU_TRUSTED_PROXIES": "10.0.0.0/8, ::1"}).trusted_proxies
