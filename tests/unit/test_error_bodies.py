"""Answers give away no internals and logs cannot be forged.

A sweep over every error path of the API, with faults injected into the pool's backend
whose messages carry what a real one would (container names, the image, paths, the
engine's version, a traceback): no answer (body or header) carries any of it, and each
server-side failure's real message is in the gateway's log under the answer's request id.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from wanwu_worker.logs import EscapingFormatter, escape

from gateway.app import create_app
from scheduler.errors import BackendUnavailable, WorkerStartError, WorkerStartTimeout
from scheduler.gpu import GpuMonitor
from scheduler.models import ModelCatalog
from scheduler.pool import INLINE, WarmPool
from scheduler.settings import Settings
from tests.images import demo_images
from tests.unit.fakes import FakeBackend, FakeClock, make_bundle

IMAGE = next(iter(demo_images(seed=9).values()))
CONTAINER = "wanwu-gwsecret-w0001"
WORKER_IMAGE = "wanwu-worker:cpu"
ENGINE = "20.10.24+dfsg1"
TRACEBACK = "Traceback (most recent call last)"


def internals(models_dir: Path) -> tuple[str, ...]:
    """What must never reach a client: each appears in some injected fault."""
    return (CONTAINER, WORKER_IMAGE, ENGINE, TRACEBACK, str(models_dir), "/var/lib/wanwu", "/run/wanwu")


def leaky(kind: type[Exception], models_dir: Path) -> Exception:
    """A fault whose message carries everything a real one might."""
    return kind(
        f"container {CONTAINER} ({WORKER_IMAGE}, engine {ENGINE}) exited with status 1 while starting; "
        f"model dir {models_dir}/m, socket /run/wanwu/w0001/worker.sock; last log lines:\n{TRACEBACK}:\n"
        '  File "/var/lib/wanwu/x.py", line 1'
    )


class LeakyBackend(FakeBackend):
    """A FakeBackend whose readiness says what a Docker backend's says."""

    def readiness(self) -> dict[str, tuple[bool, str]]:
        return {"docker": (True, f"engine {ENGINE}"), "image": (False, f"{WORKER_IMAGE} is missing")}


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[FlaskClient, LeakyBackend, WarmPool, Path]]:
    models = tmp_path / "models"
    make_bundle(models, "m")
    broken = make_bundle(models, "broken")
    (broken / "labels.txt").write_text("", encoding="utf-8")
    backend = LeakyBackend()
    clock = FakeClock()
    settings = Settings(
        models_dir=models, max_workers=1, queue_timeout_s=0.5, queue_max=1, stem_cells=0, default_model="m"
    )
    pool = WarmPool(
        backend, ModelCatalog(models, clock=clock), settings, clock=clock, gpu=GpuMonitor(()), executor=INLINE
    )
    pool.start(background=False)
    try:
        yield create_app(settings, pool, {"TESTING": True}).test_client(), backend, pool, models
    finally:
        pool.shutdown(grace_s=0)


def post(client: FlaskClient, url: str = "/v1/models/m/predict", images: int = 1) -> object:
    data = {"image": [(io.BytesIO(IMAGE), f"{i}.png") for i in range(images)]}
    return client.post(url, data=data, content_type="multipart/form-data")


def test_no_error_answer_carries_internals_and_each_is_logged_under_its_request_id(
    setup: tuple[FlaskClient, LeakyBackend, WarmPool, Path], caplog: pytest.LogCaptureFixture
) -> None:
    client, backend, pool, models = setup
    answers = []

    def fault(kind: type[Exception], url: str = "/v1/models/m/predict", images: int = 1) -> None:
        backend.fail_next_spawns("m", error=leaky(kind, models))  # type: ignore[arg-type]
        answers.append(post(client, url, images))
        pool.core.backoff.clear()  # the next fault starts a worker again

    fault(WorkerStartError)
    fault(WorkerStartTimeout)
    fault(BackendUnavailable)
    fault(WorkerStartError, "/v1/models/m/predict:batch", images=3)
    fault(RuntimeError)  # not a WanwuError, in a worker's start
    backend.fail_next_spawns("m", error=leaky(WorkerStartError, models))  # type: ignore[arg-type]
    answers.append(post(client))  # backs off after this one...
    answers.append(post(client))  # ...so this is model_unavailable
    pool.core.backoff.clear()
    answers.append(post(client, "/v1/models/nope/predict"))
    answers.append(post(client, "/v1/models/broken/predict"))
    answers.append(client.get("/readyz"))
    backend.outcomes["m"].extend(["crash", "crash"])
    answers.append(post(client))  # worker_failed after the retry
    backend.outcomes["m"].extend(["timeout", "timeout"])
    answers.append(post(client))  # worker_timeout
    pool.core.backoff.clear()
    busy = pool.acquire("m", pool.clock.now() + 5)
    answers.append(post(client))  # no_capacity: the only worker is busy
    pool.release(busy)
    real = pool.predict
    pool.predict = lambda *a, **k: (_ for _ in ()).throw(leaky(RuntimeError, models))  # type: ignore[method-assign]
    answers.append(post(client))  # internal: an unexpected failure in the app
    pool.predict = real  # type: ignore[method-assign]

    codes = [a.get_json()["error"]["code"] if "error" in a.get_json() else a.status_code for a in answers]  # type: ignore[attr-defined]
    assert {
        "worker_start_failed",
        "worker_start_timeout",
        "backend_unavailable",
        "internal",
        "model_unavailable",
        "unknown_model",
        "worker_failed",
        "worker_timeout",
        "no_capacity",
    } <= set(codes), codes
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for answer in answers:
        text = answer.get_data(as_text=True) + json.dumps(dict(answer.headers))  # type: ignore[attr-defined]
        for secret in internals(models):
            assert secret not in text, f"{secret!r} in {answer.status_code}: {text}"  # type: ignore[attr-defined]
        assert answer.status_code >= 400  # type: ignore[attr-defined]
        body = answer.get_json()  # type: ignore[attr-defined]
        if answer.status_code >= 500 and "error" in body:  # type: ignore[attr-defined]
            assert body["error"]["request_id"] in logged  # the operator can find what happened
    assert CONTAINER in logged and ENGINE in logged  # ...and it is all there
    batch = answers[3].get_json()  # type: ignore[attr-defined]
    assert batch["error"]["code"] == "worker_start_failed"


def test_a_client_error_keeps_its_specific_message(setup: tuple[FlaskClient, LeakyBackend, WarmPool, Path]) -> None:
    client, _, _, models = setup
    unknown = post(client, "/v1/models/nope/predict").get_json()  # type: ignore[attr-defined]
    assert unknown["error"]["message"] == "no model named 'nope'"
    broken = post(client, "/v1/models/broken/predict").get_json()  # type: ignore[attr-defined]
    assert "labels.txt" in broken["error"]["message"] and str(models) not in broken["error"]["message"]
    listed = client.get("/v1/models").get_json()
    assert "labels.txt" in listed["invalid"]["broken"] and str(models) not in json.dumps(listed)


# -- logs ------------------------------------------------------------------------------------


def test_a_newline_in_a_model_name_cannot_forge_a_log_line(
    setup: tuple[FlaskClient, LeakyBackend, WarmPool, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client, _, _, _ = setup
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(EscapingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("wanwu.access")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    forged = "x\n2026-12-07 12:00:00,000 INFO wanwu.access: 0 POST /admin 200"
    try:
        post(client, "/v1/models/" + forged.replace("\n", "%0A") + "/predict")
        client.get("/v1/models/a%E2%80%A8b%1B[31m/predict")
        post(client, "/v1/models/y cached=True model=z/predict")
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines  # one record, one line: the forged one is inside it
    assert "x%0A2026-12-07" in lines[0] and "%E2%80%A8" in lines[1] and "%1B" in lines[1]
    # Nor can a space add a field to its own line: the path and model are percent-encoded.
    assert "y%20cached%3DTrue%20model%3Dz" in lines[2] and " cached=True model=z" not in lines[2]
    assert "cached=True" not in lines[2].replace("cached=None", "")
    # The records of other loggers carry the name as the client sent it, escaped on output.
    warned = [r for r in caplog.records if r.name == "gateway.app" and "x\n2026" in r.getMessage()]
    assert all("\n" not in EscapingFormatter("%(message)s").format(r) for r in warned)


def test_escape_writes_every_control_character_as_an_escape() -> None:
    assert escape("a\nb\rc\td\x00e\x7f\x85\u2028\u2029") == "a\\nb\\rc\\td\\x00e\\x7f\\x85\\u2028\\u2029"
    assert escape("万物识别 plain") == "万物识别 plain"


def test_a_traceback_keeps_its_lines_but_none_starts_like_a_record() -> None:
    formatter = EscapingFormatter("%(asctime)s %(message)s")
    try:
        raise ValueError("bad\n2026-12-07 forged")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("y\n",), exc_info=True)
        import sys

        record.exc_info = sys.exc_info()
    first, *rest = formatter.format(record).split("\n")
    assert first.endswith("failed y\\n") and rest and all(line.startswith("    ") for line in rest)


def test_the_json_access_log_keeps_one_line_per_request_and_a_failing_write_is_no_500(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models"
    make_bundle(models, "m")
    for path, ok in ((tmp_path / "access.jsonl", True), (Path("/dev/full"), False)):
        clock = FakeClock()
        settings = Settings(models_dir=models, stem_cells=0, default_model="m", access_log=str(path))
        pool = WarmPool(
            FakeBackend(), ModelCatalog(models, clock=clock), settings, clock=clock, gpu=GpuMonitor(()), executor=INLINE
        )
        pool.start(background=False)
        try:
            client = create_app(settings, pool, {"TESTING": True}).test_client()
            assert post(client).status_code == 200  # type: ignore[attr-defined]
            assert post(client, "/v1/models/a%0Ab%E2%80%A8c/predict").status_code == 404  # type: ignore[attr-defined]
        finally:
            pool.shutdown(grace_s=0)
        if ok:
            lines = path.read_bytes().split(b"\n")
            assert len(lines) == 3 and lines[2] == b"", lines
            assert json.loads(lines[1])["path"] == "/v1/models/a\nb\u2028c/predict"
        else:
            assert any("access log /dev/full: a write failed" in r.getMessage() for r in caplog.records)
