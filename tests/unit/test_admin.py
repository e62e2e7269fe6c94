"""Runtime settings over HTTP (GET/PATCH /v1/pool/settings) on a FakeBackend pool:
auth, validation, effects on the pool, persistence, logs and metrics; and the CLI."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient

from gateway.app import create_app
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.policy import State
from scheduler.pool import INLINE, WarmPool
from scheduler.settings import Settings
from tests.promtext import metric
from tests.unit.fakes import FakeBackend, FakeClock, make_bundle

TOKEN = "s3cret-t0ken-for-unit-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def build(tmp_path: Path, backend: FakeBackend, **overrides: Any) -> tuple[Flask, WarmPool]:
    for name in ("a", "b", "c"):
        if not (tmp_path / "models" / name).exists():
            make_bundle(tmp_path / "models", name)
    clock = FakeClock()
    values: dict[str, Any] = {
        "max_workers": 3,
        "stem_cells": 0,
        "admin_token": TOKEN,
        "state_file": str(tmp_path / "state" / "pool.json"),
    }
    values.update(overrides)
    settings = Settings(models_dir=tmp_path / "models", **values)
    pool = WarmPool(
        backend,
        ModelCatalog(tmp_path / "models", clock=clock),
        settings,
        clock=clock,
        gpu=GpuMonitor(()),
        executor=INLINE,
    )
    pool.start(background=False)
    return create_app(settings, pool, {"TESTING": True}), pool


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def served(tmp_path: Path, backend: FakeBackend) -> Iterator[tuple[FlaskClient, WarmPool]]:
    app, pool = build(tmp_path, backend)
    yield app.test_client(), pool
    pool.shutdown(grace_s=0)


def patch(client: FlaskClient, body: Any, headers: dict[str, str] | None = None) -> Any:
    return client.patch("/v1/pool/settings", json=body, headers=AUTH if headers is None else headers)


def test_anyone_may_read_the_settings(served: tuple[FlaskClient, WarmPool]) -> None:
    client, _ = served
    body = client.get("/v1/pool/settings").get_json()
    assert body["settings"] == {
        "max_workers": 3,
        "idle_ttl_s": 30.0,
        "keepalive": "adaptive",
        "stem_cells": 0,
        "model_ttl_s": {},
    }
    assert body["admin"] == "enabled" and body["changes"] == [] and body["state_file"] is None
    assert TOKEN not in json.dumps(body) and TOKEN not in json.dumps(client.get("/v1/pool").get_json())


def test_without_a_configured_token_changes_are_refused_with_how_to_enable(
    tmp_path: Path, backend: FakeBackend
) -> None:
    app, pool = build(tmp_path, backend, admin_token="")
    response = patch(app.test_client(), {"max_workers": 1})
    assert response.status_code == 403
    error = response.get_json()["error"]
    assert error["code"] == "admin_disabled" and "WANWU_ADMIN_TOKEN" in error["message"]
    assert pool.settings.max_workers == 3
    pool.shutdown(grace_s=0)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}],
)
def test_a_missing_or_wrong_token_is_401(served: tuple[FlaskClient, WarmPool], headers: dict[str, str]) -> None:
    client, pool = served
    response = patch(client, {"max_workers": 1}, headers)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.get_json()["error"]["code"] == "unauthorized"
    assert pool.settings.max_workers == 3


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"max_workers": 0}, "max_workers=0: must be > 0"),
        ({"max_workers": 2.5}, "expected an integer"),
        ({"max_workers": True}, "expected an integer"),
        ({"max_workers": 5000}, "at most 1024"),
        ({"idle_ttl_s": -5}, "idle_ttl_s=-5: must be > 0"),
        ({"idle_ttl_s": 700_000}, "idle_ttl_s=700000: must be at most 604800"),
        ({"idle_ttl_s": "soon"}, "expected a number"),
        ({"max_workers": "3"}, "max_workers='3': expected an integer"),
        ({"keepalive": "forever"}, "must be one of fixed, adaptive, hybrid"),
        ({"stem_cells": -1}, "must be >= 0"),
        ({"model_ttl_s": {"nope": 10}}, "no model named 'nope'"),
        ({"model_ttl_s": {"a": 0}}, "model_ttl_s.a=0: must be > 0"),
        ({"model_ttl_s": {"a": 700_000}}, "model_ttl_s.a=700000: must be at most 604800"),
        ({"model_ttl_s": [1]}, "expected an object"),
        ({"queue_max": 3}, "unknown settings queue_max"),
        ({"persist": False}, "nothing to change"),
        ({"idle_ttl_s": 10**400}, "expected a finite number"),
        ({"model_ttl_s": {"a": 10**400}}, "expected a finite number"),
        ({"stem_cells": 4096.0}, "at most 1024"),
        ({}, "nothing to change"),
        ([1, 2], "send a JSON object"),
        ({"max_workers": 2, "persist": "yes"}, "expected true or false"),
    ],
)
def test_bad_settings_are_400_and_change_nothing(served: tuple[FlaskClient, WarmPool], body: Any, says: str) -> None:
    client, pool = served
    before = pool.runtime_settings()
    response = patch(client, body)
    assert response.status_code == 400, response.get_json()
    error = response.get_json()["error"]
    assert error["code"] == "invalid_settings" and says in error["message"]
    assert pool.runtime_settings() == before


def test_not_json_is_415_and_broken_json_400(served: tuple[FlaskClient, WarmPool]) -> None:
    client, _ = served
    assert client.patch("/v1/pool/settings", data="max_workers=1", headers=AUTH).status_code == 415
    broken = client.patch("/v1/pool/settings", data="{", content_type="application/json", headers=AUTH)
    assert broken.status_code == 400 and broken.get_json()["error"]["code"] == "invalid_settings"


def test_lowering_n_stops_idle_workers_least_recently_used_first_never_a_busy_one(
    served: tuple[FlaskClient, WarmPool], backend: FakeBackend
) -> None:
    client, pool = served
    busy = pool.acquire("a", pool.clock.now() + 5)
    for model in ("b", "c"):  # b is used before c: b goes first
        pool.release(pool.acquire(model, pool.clock.now() + 5))
        pool.clock.advance(1)
    response = patch(client, {"max_workers": 1})
    assert response.status_code == 200
    assert response.get_json()["changed"] == {"max_workers": {"old": 3, "new": 1}}
    states = {w.model: w.state for w in pool.core.workers.values()}
    assert states == {"a": State.BUSY}  # both idle ones stopped, the busy one kept
    assert len(backend.live) == 1
    pool.release(busy)
    assert [w.model for w in pool.snapshot().workers] == ["a"] and pool.snapshot().capacity == 1


def test_raising_n_serves_a_waiting_request_at_once(tmp_path: Path, backend: FakeBackend) -> None:
    from tests.unit.test_pool import queued_acquire, real_time_pool

    make_bundle(tmp_path, "a")
    make_bundle(tmp_path, "b")
    pool = real_time_pool(backend, tmp_path, admin_token=TOKEN, state_file=str(tmp_path / "state.json"))
    client = create_app(pool.settings, pool, {"TESTING": True}).test_client()
    held = pool.acquire("a", pool.clock.now() + 30)
    waiter, got = queued_acquire(pool, "b")
    assert patch(client, {"max_workers": 2}).status_code == 200
    waiter.join(5)
    assert got and got[0].model == "b"  # served while "a" is still held
    pool.release(held)
    pool.release(got[0])
    pool.shutdown(grace_s=0)


def test_ttls_keepalive_and_stem_cells_change_and_each_change_is_logged_and_counted(
    served: tuple[FlaskClient, WarmPool], caplog: pytest.LogCaptureFixture
) -> None:
    client, pool = served
    caplog.set_level(logging.WARNING, logger="gateway.admin")
    body = {"idle_ttl_s": 120, "keepalive": "fixed", "stem_cells": 1, "model_ttl_s": {"a": 600}}
    response = patch(client, body, {**AUTH, "X-Wanwu-Operator": "ops@host"})
    assert response.status_code == 200
    settings = response.get_json()["settings"]
    assert settings == {
        "max_workers": 3,
        "idle_ttl_s": 120.0,
        "keepalive": "fixed",
        "stem_cells": 1,
        "model_ttl_s": {"a": 600.0},
    }
    assert pool.core.config.default_ttl_s == 120.0 and pool.core.config.model_ttl_s["a"] == 600.0
    assert pool.snapshot().settings["keepalive"] == "fixed"  # /v1/pool shows the live settings
    assert "ops@host from 127.0.0.1 changed idle_ttl_s from 30.0 to 120.0" in caplog.text
    (change,) = client.get("/v1/pool/settings").get_json()["changes"]
    assert change["who"] == "ops@host from 127.0.0.1" and change["changed"]["keepalive"] == {
        "old": "adaptive",
        "new": "fixed",
    }
    scraped = client.get("/metrics").get_data(as_text=True)
    assert metric(scraped, 'wanwu_settings_changes_total{setting="idle_ttl_s"}') == 1
    assert metric(scraped, "wanwu_idle_ttl_seconds") == 120
    assert patch(client, {"model_ttl_s": {"a": None}}).get_json()["settings"]["model_ttl_s"] == {}
    assert "a" not in pool.core.config.model_ttl_s


def test_a_persisted_change_survives_a_restart_and_an_unpersisted_one_does_not(
    tmp_path: Path, backend: FakeBackend
) -> None:
    app, pool = build(tmp_path, backend)
    client = app.test_client()
    assert patch(client, {"max_workers": 2, "model_ttl_s": {"b": 90}, "persist": True}).status_code == 200
    assert patch(client, {"idle_ttl_s": 5}).status_code == 200  # live only
    state = json.loads((tmp_path / "state" / "pool.json").read_text())
    assert state["settings"] == {
        "max_workers": 2,
        "idle_ttl_s": 30.0,
        "keepalive": "adaptive",
        "stem_cells": 0,
        "model_ttl_s": {"b": 90.0},
    }
    pool.shutdown(grace_s=0)

    restarted, pool = build(tmp_path, FakeBackend())  # the same configuration: N=3 and TTL 30
    view = restarted.test_client().get("/v1/pool/settings").get_json()
    assert view["settings"]["max_workers"] == 2 and view["settings"]["model_ttl_s"] == {"b": 90.0}
    assert view["settings"]["idle_ttl_s"] == 30.0
    assert view["state_file"] == "pool.json"  # its name only: no server path in a public answer
    assert view["changes"][0]["who"].startswith("the state file")
    pool.shutdown(grace_s=0)


def test_an_unreadable_state_file_is_reported_and_left_alone(
    tmp_path: Path, backend: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "pool.json").write_text("{not json")
    _, pool = build(tmp_path, backend)
    assert pool.settings.max_workers == 3
    assert "ignoring the persisted settings" in caplog.text
    pool.shutdown(grace_s=0)


def test_the_cli_changes_settings_with_the_token_and_reports_refusals(
    served: tuple[FlaskClient, WarmPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway import cli
    from gateway.cli import pool as pool_cli

    client, pool = served

    def request_json(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:  # the Flask test client as the gateway
        response = client.open(
            url.replace("http://gw", ""), method=method, json=kwargs.get("json"), headers=kwargs.get("headers")
        )
        return response.status_code, response.get_json()

    monkeypatch.setattr(pool_cli, "_request", request_json)
    runner = CliRunner()
    done = runner.invoke(
        cli.cli,
        ["pool", "set", "--url", "http://gw", "--max-workers", "2", "--model-ttl", "a=60"],
        env={"WANWU_ADMIN_TOKEN": TOKEN},
    )
    assert done.exit_code == 0, done.output
    assert "max_workers 2" in done.output and "a=60 s" in done.output and pool.settings.max_workers == 2
    refused = runner.invoke(
        cli.cli, ["pool", "set", "--url", "http://gw", "--max-workers", "1"], env={"WANWU_ADMIN_TOKEN": "nope"}
    )
    assert refused.exit_code == 1 and "401 unauthorized" in refused.output
    shown = runner.invoke(cli.cli, ["pool", "settings", "--url", "http://gw"])
    assert shown.exit_code == 0 and "max_workers 2 -> " not in shown.output and "max_workers 3 -> 2" in shown.output


def test_lowering_n_twice_stops_only_what_is_over_the_new_n(served: tuple[FlaskClient, WarmPool]) -> None:
    client, pool = served
    for model in ("a", "b", "c"):
        pool.release(pool.acquire(model, pool.clock.now() + 5))
    assert patch(client, {"max_workers": 2}).status_code == 200
    assert patch(client, {"idle_ttl_s": 40}).status_code == 200  # a second change must not stop another
    assert patch(client, {"idle_ttl_s": 50}).status_code == 200
    assert len(pool.snapshot().workers) == 2


def test_persist_alone_saves_the_current_settings(tmp_path: Path, backend: FakeBackend) -> None:
    app, pool = build(tmp_path, backend)
    answer = patch(app.test_client(), {"persist": True})
    assert answer.status_code == 200 and answer.get_json()["changed"] == {} and answer.get_json()["persisted"]
    assert json.loads((tmp_path / "state" / "pool.json").read_text())["settings"]["max_workers"] == 3
    pool.shutdown(grace_s=0)


def test_stem_cells_cannot_be_turned_on_where_they_cannot_work(served: tuple[FlaskClient, WarmPool]) -> None:
    client, pool = served
    pool.stem_problem = "stem cells need the models directory searchable by uid 10001"
    response = patch(client, {"stem_cells": 1})
    assert response.status_code == 400 and "searchable by uid 10001" in response.get_json()["error"]["message"]
    assert patch(client, {"stem_cells": 0}).status_code == 200


def test_a_state_file_naming_a_model_no_longer_served_keeps_the_rest(tmp_path: Path, backend: FakeBackend) -> None:
    (tmp_path / "state").mkdir()
    saved = {"max_workers": 2, "idle_ttl_s": 45, "keepalive": "fixed", "stem_cells": 0, "model_ttl_s": {"gone": 9}}
    (tmp_path / "state" / "pool.json").write_text(json.dumps({"settings": saved}))
    _, pool = build(tmp_path, backend)
    assert pool.runtime_settings() == {**saved, "idle_ttl_s": 45.0, "model_ttl_s": {}}
    pool.shutdown(grace_s=0)


def test_the_token_is_not_in_the_settings_repr() -> None:
    assert TOKEN not in repr(Settings(admin_token=TOKEN))
