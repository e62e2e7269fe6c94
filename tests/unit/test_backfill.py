"""``wanwu backfill`` against a stub gateway on 127.0.0.1 that speaks the batch contract.

The stub answers from the files' contents: ``bad`` is not an image, ``flaky:N:label``
fails retryably the first N times it is sent, ``stuck`` always fails retryably, and
anything else is its own top-1 label.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from gateway.backfill import (
    Backfill,
    BackfillError,
    Backoff,
    Options,
    OptionsMismatch,
    Reporter,
    ResultsFile,
    Source,
    Summary,
    changed_options,
    format_progress,
    fsync_directory,
    walk,
)
from gateway.cli import cli
from gateway.client import GatewayUnreachable

ROOT = Path(__file__).resolve().parents[2]
LABELS = ["红色圆形", "红色方形", "绿色圆形", "绿色方形", "蓝色圆形", "蓝色方形"]


@dataclass
class Stub:
    """The gateway's batch contract, with knobs."""

    url: str = ""
    limits: dict[str, Any] = field(
        default_factory=lambda: {"max_upload_mb": 20.0, "max_batch_images": 64, "max_batch_upload_mb": 100.0}
    )
    script: deque[tuple[int, dict[str, Any], dict[str, str]]] = field(default_factory=deque)  # answers to give first
    max_images: int | None = None  # 413 above
    max_bytes: int | None = None  # 413 above
    delay_s: float = 0.0
    on_batch: Callable[[int], None] | None = None  # called with the number of batches so far
    batches: list[dict[str, Any]] = field(default_factory=list)
    seen: Counter[str] = field(default_factory=Counter)  # files sent, by name
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.answer(Request(environ))(environ, start_response)

    def answer(self, request: Request) -> Response:
        if request.method == "GET" and request.path == "/v1/models":
            models = [
                {"name": "demo-shapes", "default": True, "labels": LABELS, "batching": None},
                {"name": "other", "default": False, "labels": LABELS[:2], "batching": None},
            ]
            return self.json(200, {"models": models, "limits": self.limits})
        prefix, suffix = "/v1/models/", "/predict:batch"
        if request.method != "POST" or not request.path.startswith(prefix) or not request.path.endswith(suffix):
            return self.json(404, {"error": {"code": "not_found", "message": request.path}})
        uploads = request.files.getlist("image")
        names, bodies = [u.filename or "" for u in uploads], [u.read() for u in uploads]
        with self.lock:
            self.batches.append(
                {
                    "model": request.path[len(prefix) : -len(suffix)],
                    "files": names,
                    "bytes": request.content_length,
                    "top_k": request.args.get("top_k"),
                    "priority": request.headers.get("X-Wanwu-Priority"),
                }
            )
            count = len(self.batches)
            scripted = self.script.popleft() if self.script else None
            if scripted is None:
                self.seen.update(names)
                seen = dict(self.seen)
        if self.on_batch:
            self.on_batch(count)
        time.sleep(self.delay_s)
        if scripted is not None:
            return self.json(*scripted)
        too_many = self.max_images is not None and len(uploads) > self.max_images
        if too_many or (self.max_bytes is not None and (request.content_length or 0) > self.max_bytes):
            return self.json(413, {"error": {"code": "too_large", "message": "the request is too large"}})
        results = [self.result(i, n, b, seen[n]) for i, (n, b) in enumerate(zip(names, bodies, strict=True))]
        return self.json(200, {"model": "demo-shapes", "results": results, "count": len(results), "request_id": "r"})

    @staticmethod
    def result(index: int, name: str, body: bytes, times: int) -> dict[str, Any]:
        entry: dict[str, Any] = {"index": index, "file": name}
        text = body.decode()
        if text == "bad":
            return entry | {"error": {"code": "not_an_image", "message": "no"}, "retryable": False}
        if text == "stuck" or (text.startswith("flaky:") and times <= int(text.split(":")[1])):
            return entry | {"error": {"code": "worker_failed", "message": "died"}, "retryable": True}
        label = text.split(":")[-1]
        return entry | {"result": label, "predictions": [{"label": label, "score": 0.9}, {"label": "x", "score": 0.1}]}

    @staticmethod
    def json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Response:
        return Response(json.dumps(body, ensure_ascii=False), status, headers, mimetype="application/json")


@pytest.fixture
def stub() -> Iterator[Stub]:
    gateway = Stub()
    server = make_server("127.0.0.1", 0, gateway, threaded=True)
    gateway.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield gateway
    server.shutdown()
    server.server_close()
    thread.join(5)


def images(root: Path, files: Mapping[str, str | bytes]) -> Path:
    for name, body in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body.encode() if isinstance(body, str) else body)
    return root


def labelled(root: Path, count: int) -> Path:
    return images(root, {f"img{i:03d}.png": LABELS[i % len(LABELS)] for i in range(count)})


class Waits:
    """The wait between retries, recorded and skipped."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> bool:
        self.delays.append(seconds)
        return False


def job(
    source: Path,
    out: Path,
    stub: Stub | None = None,
    *,
    url: str = "",
    glob: str | None = None,
    waits: Callable[[float], bool] | None = None,
    stream: StringIO | None = None,
    session_factory: Callable[[], requests.Session] = requests.Session,
    **options: Any,
) -> Backfill:
    settings = {"batch_size": 4, "concurrency": 2, "max_retries": 3, "timeout_s": 10.0, "grace_s": 2.0} | options
    return Backfill(
        Source.open(str(source), glob),
        ResultsFile(str(out), fsync_interval_s=0.0),
        Options(url or (stub.url if stub else ""), **settings),
        reporter=Reporter(stream),
        session_factory=session_factory,
        backoff=Backoff(base_s=0.001, cap_s=0.01),
        wait=waits or Waits(),
    )


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_bytes().decode("utf-8").splitlines()]


def assert_each_once(out: Path, expected: set[str]) -> dict[str, dict[str, Any]]:
    data = out.read_bytes()
    assert not data or data.endswith(b"\n")
    got = Counter(r["file"] for r in records(out))
    assert set(got) == expected and set(got.values()) == {1}, got
    return {r["file"]: r for r in records(out)}


# Sources


def test_a_directory_is_walked_for_image_extensions_without_entering_symlinked_directories(tmp_path: Path) -> None:
    root = images(tmp_path / "src", {"b.PNG": "", "a.jpeg": "", "notes.txt": "", "sub/c.webp": "", "sub/x/d.TIFF": ""})
    outside = images(tmp_path / "outside", {"e.png": ""})
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "away").symlink_to(outside, target_is_directory=True)
    (root / "linked.jpg").symlink_to(outside / "e.png")  # a symlinked file counts
    (root / "dangling.png").symlink_to(tmp_path / "nothing.png")
    source = Source.open(str(root))
    assert source.keys == ["a.jpeg", "b.PNG", "linked.jpg", "sub/c.webp", "sub/x/d.TIFF"]
    assert source.path_of("sub/c.webp") == os.path.join(root, "sub/c.webp")


def test_glob_matches_the_path_under_the_source_and_star_crosses_directories(tmp_path: Path) -> None:
    root = images(tmp_path, {"x.png": "", "X.PNG": "", "sub/y.png": "", "sub/deep/z.png": "", "sub/w.jpg": ""})
    assert walk(str(root), "*.png") == ["sub/deep/z.png", "sub/y.png", "x.png"]  # case-sensitive
    assert walk(str(root), "**/*.png") == ["sub/deep/z.png", "sub/y.png", "x.png"]  # **/ may match nothing
    assert walk(str(root), "sub/*.jpg") == ["sub/w.jpg"]
    assert walk(str(root), "sub/**/*.png") == ["sub/deep/z.png", "sub/y.png"]
    assert walk(str(root), "sub/**/deep/*.png") == ["sub/deep/z.png"]
    assert walk(str(root), "sub/?.png") == ["sub/y.png"]
    assert walk(str(root), "*") == ["X.PNG", "sub/deep/z.png", "sub/w.jpg", "sub/y.png", "x.png"]


def test_a_list_names_files_relative_to_itself_each_once_as_written(
    tmp_path: Path, stub: Stub, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = images(tmp_path / "lists", {"a.png": "红色圆形", "sub/b.png": "绿色方形"})
    elsewhere = images(tmp_path / "elsewhere", {"c.png": "蓝色圆形"})
    listing = root / "files.txt"
    listing.write_text(f"# the images\n\na.png\n  sub/b.png  \n{elsewhere / 'c.png'}\na.png\n# a.png again\n")
    assert Source.open(str(listing)).keys == ["a.png", "sub/b.png", str(elsewhere / "c.png")]
    with pytest.raises(BackfillError, match="--glob applies to a directory"):
        Source.open(str(listing), "*.png")
    monkeypatch.chdir(tmp_path)  # paths resolve against the list, not the working directory
    summary = job(listing, tmp_path / "out.jsonl", stub).run()
    got = assert_each_once(tmp_path / "out.jsonl", {"a.png", "sub/b.png", str(elsewhere / "c.png")})
    assert got["sub/b.png"]["predictions"][0]["label"] == "绿色方形"
    assert summary.exit_status == 0


# Running, resuming, stopping


def test_every_file_is_classified_once_in_batches_at_batch_priority(tmp_path: Path, stub: Stub) -> None:
    src = labelled(tmp_path / "src", 10)
    summary = job(src, tmp_path / "out.jsonl", stub, top_k=3).run()
    got = assert_each_once(tmp_path / "out.jsonl", {f"img{i:03d}.png" for i in range(10)})
    predictions = [{"label": "红色方形", "score": 0.9}, {"label": "x", "score": 0.1}]
    assert got["img007.png"] == {"file": "img007.png", "predictions": predictions}
    assert sorted(len(b["files"]) for b in stub.batches) == [2, 4, 4]  # concurrent: any order
    assert {(b["model"], b["priority"], b["top_k"]) for b in stub.batches} == {("demo-shapes", "batch", "3")}
    assert sorted(f for b in stub.batches for f in b["files"]) == sorted(got)  # the part's filename is the key
    assert (summary.total, summary.done, summary.failed, summary.exit_status) == (10, 10, 0, 0)
    ranked = summary.ranked_labels()  # by count, then by label
    assert ranked == sorted([(label, 2) for label in LABELS[:4]]) + sorted([(label, 1) for label in LABELS[4:]])
    assert "红色圆形" in (tmp_path / "out.jsonl").read_text(encoding="utf-8")  # not \\u escapes


def test_a_rerun_skips_what_is_done_and_redoes_a_torn_last_line(tmp_path: Path, stub: Stub) -> None:
    src = labelled(tmp_path / "src", 10)
    out = tmp_path / "out.jsonl"
    done: list[dict[str, Any]] = [
        {"file": f"img{i:03d}.png", "predictions": [{"label": "红", "score": 1}]} for i in range(3)
    ]
    done.append({"file": "img003.png", "error": {"code": "not_an_image", "message": "no"}})
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done)
    out.write_text(text + 'not json\n{"nofile": 1}\n\n{"file": "img004.png", "predic', encoding="utf-8")
    stream = StringIO()
    summary = job(src, out, stub, stream=stream).run()
    assert sorted(f for b in stub.batches for f in b["files"]) == [f"img{i:03d}.png" for i in range(4, 10)]
    assert (summary.skipped, summary.done, summary.ignored_lines, summary.truncated_bytes) == (4, 6, 2, 30)
    assert "partial line (30 bytes" in stream.getvalue() and "ignoring 2 lines" in stream.getvalue()
    kept = [r for r in out.read_text(encoding="utf-8").splitlines() if r.startswith('{"file"')]
    assert Counter(json.loads(r)["file"] for r in kept) == Counter(f"img{i:03d}.png" for i in range(10))
    again = job(src, out, stub).run()
    assert (again.skipped, again.done, len(stub.batches)) == (10, 0, 2)


def test_a_job_stopped_after_some_batches_resumes_with_every_file_once(tmp_path: Path, stub: Stub) -> None:
    src = labelled(tmp_path / "src", 40)
    out = tmp_path / "out.jsonl"
    stop = threading.Event()
    stub.on_batch = lambda count: stop.set() if count == 3 else None
    first = job(src, out, stub, batch_size=2).run(stop)
    assert first.interrupted and first.exit_status == 130 and 0 < first.done < 40
    assert len(records(out)) == first.done
    stub.on_batch = None
    second = job(src, out, stub, batch_size=2).run()
    assert_each_once(out, {f"img{i:03d}.png" for i in range(40)})
    assert (second.skipped, second.done, second.exit_status) == (first.done, 40 - first.done, 0)


def test_the_results_file_inside_the_source_is_not_taken_for_an_image(tmp_path: Path, stub: Stub) -> None:
    src = labelled(tmp_path, 3)
    (tmp_path / "out.jsonl").write_text("")
    summary = job(src, tmp_path / "out.jsonl", stub, glob="*").run()
    assert_each_once(tmp_path / "out.jsonl", {"img000.png", "img001.png", "img002.png"})
    assert summary.total == 3 and summary.exit_status == 0


def test_the_options_sidecar_is_not_taken_for_an_image_either(tmp_path: Path, stub: Stub) -> None:
    src = labelled(tmp_path, 2)
    job(src, tmp_path / "out.jsonl", stub, glob="*").run()
    assert (tmp_path / "out.jsonl.options.json").exists()
    again = job(src, tmp_path / "out.jsonl", stub, glob="*").run()
    assert (again.total, again.skipped, again.exit_status) == (2, 2, 0)


def test_only_one_job_writes_a_results_file(tmp_path: Path) -> None:
    first = ResultsFile(str(tmp_path / "out.jsonl"))
    first.open()
    with pytest.raises(BackfillError, match="another job is writing"):
        ResultsFile(str(tmp_path / "out.jsonl")).open()
    first.close()
    ResultsFile(str(tmp_path / "out.jsonl")).open()


def test_a_name_that_is_not_utf8_is_written_as_valid_json_and_resumed(tmp_path: Path, stub: Stub) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (Path(os.fsdecode(bytes(src) + b"/\xff\xfe.png"))).write_text("蓝色方形")
    out = tmp_path / "out.jsonl"
    assert job(src, out, stub).run().done == 1
    out.read_bytes().decode("utf-8")  # strict: the line is valid UTF-8
    assert records(out)[0]["file"] == os.fsdecode(b"\xff\xfe.png")
    assert job(src, out, stub).run().skipped == 1


# The options a results file was made with


def sidecar(out: Path) -> dict[str, Any]:
    return dict(json.loads(Path(f"{out}.options.json").read_text(encoding="utf-8")))


def test_the_options_that_shape_a_line_are_kept_beside_the_results(tmp_path: Path, stub: Stub) -> None:
    out = tmp_path / "out.jsonl"
    job(labelled(tmp_path / "src", 3), out, stub, top_k=3, lang="en").run()
    assert sidecar(out) == {"version": 1, "model": "demo-shapes", "top_k": 3, "lang": "en"}
    assert len(records(out)) == 3  # the options are not a line of the results


def test_resuming_with_other_options_is_refused_naming_each_change(tmp_path: Path, stub: Stub) -> None:
    src, out = labelled(tmp_path / "src", 6), tmp_path / "out.jsonl"
    stop = threading.Event()
    stub.on_batch = lambda count: stop.set()
    job(src, out, stub, top_k=3, concurrency=1).run(stop)
    written, sent = out.read_bytes(), len(stub.batches)
    assert 0 < len(records(out)) < 6
    stub.on_batch = None
    with pytest.raises(OptionsMismatch) as refused:
        job(src, out, stub, top_k=2, lang="en").run()
    message = str(refused.value)
    assert "--top-k 3 then, 2 now" in message and "--lang unset then, en now" in message
    assert "--model" not in message and f"{out}.options.json" in message
    with pytest.raises(OptionsMismatch, match="--model demo-shapes then, other now; --top-k 3 then, 2 now"):
        job(src, out, stub, model="other").run()  # other has two labels: top_k is capped at 2
    assert out.read_bytes() == written and len(stub.batches) == sent  # nothing sent, nothing written
    assert sidecar(out)["top_k"] == 3
    summary = job(src, out, stub, top_k=3, model="demo-shapes").run()  # the same options, named or not
    assert_each_once(out, {f"img{i:03d}.png" for i in range(6)})
    assert (summary.skipped + summary.done, summary.exit_status) == (6, 0)


def test_the_cli_refuses_other_options_as_a_usage_error(tmp_path: Path, stub: Stub) -> None:
    src, out = labelled(tmp_path / "src", 2), tmp_path / "o.jsonl"
    args = ["backfill", str(src), "--out", str(out), "--url", stub.url, "--quiet"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    refused = CliRunner().invoke(cli, [*args, "--top-k", "2"])
    assert refused.exit_code == 2, refused.output
    assert "Error:" in refused.stderr and "--top-k 5 then, 2 now" in refused.stderr


def test_a_results_file_without_options_is_resumed_with_a_warning_and_gets_them(tmp_path: Path, stub: Stub) -> None:
    src, out = labelled(tmp_path / "src", 3), tmp_path / "out.jsonl"
    out.write_text('{"file": "img000.png", "predictions": []}\n')  # made before the options were kept
    stream = StringIO()
    summary = job(src, out, stub, top_k=2, stream=stream).run()
    assert (summary.skipped, summary.done) == (1, 2)
    assert "no record of the options" in stream.getvalue()
    assert sidecar(out) == {"version": 1, "model": "demo-shapes", "top_k": 2, "lang": None}


def test_an_empty_results_file_takes_the_options_given_now(tmp_path: Path, stub: Stub) -> None:
    src, out = labelled(tmp_path / "src", 2), tmp_path / "out.jsonl"
    job(src, out, stub, top_k=3).run()
    out.unlink()  # starting over: the old options no longer say anything
    job(src, out, stub, top_k=2).run()
    assert sidecar(out)["top_k"] == 2 and len(records(out)) == 2
    Path(f"{out}.options.json").write_text("[]")
    with pytest.raises(BackfillError, match="not a record of backfill options"):
        job(src, out, stub, top_k=2).run()


def test_the_directory_is_fsynced_when_the_results_or_their_options_are_created(tmp_path: Path) -> None:
    synced: list[str] = []
    results = ResultsFile(str(tmp_path / "out.jsonl"), sync_dir=synced.append)
    results.open()
    assert synced == [str(tmp_path)]  # the new file's name is on disk before any line
    results.record_options({"model": "m", "top_k": 1, "lang": None})
    assert synced == [str(tmp_path)] * 2  # and so is the renamed sidecar
    results.close()
    ResultsFile(str(tmp_path / "out.jsonl"), sync_dir=synced.append).open()
    assert len(synced) == 2  # an existing file: nothing new in the directory
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "out.jsonl.options.json"]  # no temporary left
    fsync_directory(str(tmp_path))  # the real one, on a real directory


def test_changed_options_compares_only_what_shapes_a_line() -> None:
    then = {"version": 1, "model": "a", "top_k": 5, "lang": None}
    assert changed_options(then, {"model": "a", "top_k": 5, "lang": None}) == []
    assert changed_options(then, {"model": "b", "top_k": 5, "lang": "en"}) == [
        "--model a then, b now",
        "--lang unset then, en now",
    ]


# Failures


def test_503_is_retried_after_retry_after_until_the_job_completes(tmp_path: Path, stub: Stub) -> None:
    busy = {"error": {"code": "no_capacity", "message": "all workers busy", "request_id": "r"}}
    stub.script.extend([(503, busy, {"Retry-After": "2"})] * 4)
    waits, stream = Waits(), StringIO()
    summary = job(labelled(tmp_path / "src", 4), tmp_path / "out.jsonl", stub, concurrency=1, waits=waits,
                  stream=stream, max_retries=1).run()  # fmt: skip
    assert summary.exit_status == 0 and summary.done == 4  # more 503s than --max-retries: still retried
    assert waits.delays == [2.0] * 4  # Retry-After is the floor of the backoff
    assert "keeps answering 503 no_capacity" in stream.getvalue()


def test_retryable_image_errors_are_retried_then_left_for_the_next_run(tmp_path: Path, stub: Stub) -> None:
    src = images(
        tmp_path / "src",
        {"a.png": "flaky:2:绿色圆形", "b.png": "bad", "c.png": "flaky:5:蓝色方形", "d.png": "蓝色圆形"},
    )
    out = tmp_path / "out.jsonl"
    summary = job(src, out, stub, max_retries=3).run()
    got = assert_each_once(out, {"a.png", "b.png", "d.png"})  # c.png outlasted the retries: no line
    assert got["a.png"]["predictions"][0]["label"] == "绿色圆形"
    assert got["b.png"] == {"file": "b.png", "error": {"code": "not_an_image", "message": "no"}}
    assert stub.seen == Counter({"a.png": 3, "b.png": 1, "c.png": 4, "d.png": 1})
    assert (summary.done, summary.failed, summary.left, summary.exit_status) == (
        3,
        1,
        1,
        1,
    )  # an error line wins over a file left for later
    assert summary.to_json()["left_for_next_run"] == 1
    assert summary.to_json()["left_for_next_run_by_code"] == {"worker_failed": 1}
    assert "1 left for the next run" in "\n".join(summary.describe())
    again = job(src, out, stub, max_retries=3).run()  # resuming retries it (and it gets through now)
    got = assert_each_once(out, {"a.png", "b.png", "c.png", "d.png"})
    assert got["c.png"]["predictions"][0]["label"] == "蓝色方形"
    assert (again.skipped, again.done, again.left, again.exit_status) == (3, 1, 0, 0)


def test_a_request_failing_past_max_retries_leaves_its_files_for_the_next_run(tmp_path: Path, stub: Stub) -> None:
    bad_gateway = {"error": {"code": "http_502", "message": "bad gateway"}}
    stub.script.extend([(502, bad_gateway, {})] * 2)
    src, out = labelled(tmp_path / "src", 2), tmp_path / "out.jsonl"
    summary = job(src, out, stub, concurrency=1, max_retries=1).run()
    assert records(out) == [] and len(stub.batches) == 2
    assert (summary.done, summary.failed, summary.left, summary.exit_status) == (0, 0, 2, 4)
    again = job(src, out, stub, concurrency=1, max_retries=1).run()
    assert_each_once(out, {"img000.png", "img001.png"})
    assert (again.done, again.exit_status) == (2, 0)


def test_an_unreadable_file_gets_an_error_line_and_the_rest_go_on(tmp_path: Path, stub: Stub) -> None:
    root = images(tmp_path, {"a.png": "红色方形", "gone.png": "x", "dir.png/inside.png": "x"})
    os.mkfifo(root / "fifo.png")
    listing = root / "list.txt"
    listing.write_text("a.png\ngone.png\nmissing.png\ndir.png\nfifo.png\n")
    backfill = job(listing, tmp_path / "out.jsonl", stub)
    (root / "gone.png").unlink()  # vanished after it was listed
    summary = backfill.run()
    got = assert_each_once(tmp_path / "out.jsonl", {"a.png", "gone.png", "missing.png", "dir.png", "fifo.png"})
    assert got["a.png"]["predictions"][0]["label"] == "红色方形"
    assert {k: r["error"]["code"] for k, r in got.items() if "error" in r} == dict.fromkeys(
        ["gone.png", "missing.png", "dir.png", "fifo.png"], "unreadable"
    )
    assert got["dir.png"]["error"]["message"] == "Is a directory"
    assert [b["files"] for b in stub.batches] == [["a.png"]]
    assert (summary.failed, summary.exit_status) == (4, 1)


def test_413_splits_the_batch_and_a_single_image_still_too_large_gets_an_error(tmp_path: Path, stub: Stub) -> None:
    src = labelled(tmp_path / "src", 8)
    images(src, {"img004.png": "x" * 6000})
    stub.max_images, stub.max_bytes = 3, 5000
    summary = job(src, tmp_path / "out.jsonl", stub, batch_size=8, concurrency=1).run()
    got = assert_each_once(tmp_path / "out.jsonl", {f"img{i:03d}.png" for i in range(8)})
    assert got["img004.png"]["error"]["code"] == "too_large"
    assert [len(b["files"]) for b in stub.batches] == [8, 4, 2, 2, 4, 2, 1, 1, 2]
    assert (summary.done, summary.failed) == (8, 1)


def test_requests_stay_within_the_gateways_upload_limits(tmp_path: Path, stub: Stub) -> None:
    small: dict[str, str | bytes] = {f"f{i}.png": "红色圆形" for i in range(6)}
    src = images(tmp_path / "src", small | {f"g{i}.png": "x" * 2200 for i in range(4)} | {"huge.png": "x" * 3000})
    stub.limits = {"max_upload_mb": 2500 / 2**20, "max_batch_images": 3, "max_batch_upload_mb": 6000 / 2**20}
    summary = job(src, tmp_path / "out.jsonl", stub, batch_size=32).run()
    got = assert_each_once(tmp_path / "out.jsonl", {*small, "g0.png", "g1.png", "g2.png", "g3.png", "huge.png"})
    assert got["huge.png"]["error"]["code"] == "too_large" and stub.seen["huge.png"] == 0  # never sent
    # Batches of max_batch_images (3), and the big files split further to stay under 6000 bytes.
    assert sorted(b["files"] for b in stub.batches) == [
        ["f0.png", "f1.png", "f2.png"],
        ["f3.png", "f4.png", "f5.png"],
        ["g0.png", "g1.png"],
        ["g2.png"],
        ["g3.png"],
    ]
    assert max(b["bytes"] for b in stub.batches) <= 6000
    assert summary.failed == 1


def test_an_unknown_model_stops_before_and_during_the_job(tmp_path: Path, stub: Stub) -> None:
    src = labelled(tmp_path / "src", 8)
    with pytest.raises(BackfillError, match=r"serves no model named nope \(it has: demo-shapes, other\)"):
        job(src, tmp_path / "out.jsonl", stub, model="nope").run()
    assert not (tmp_path / "out.jsonl").exists()
    gone = {"error": {"code": "unknown_model", "message": "no model named other", "request_id": "r"}}
    stub.script.append((404, gone, {}))
    summary = job(src, tmp_path / "out.jsonl", stub, model="other", top_k=5, concurrency=1).run()
    assert summary.fatal is not None and "serves no model named other" in summary.fatal
    assert summary.exit_status == 1 and summary.done == 0 and len(stub.batches) == 1
    assert stub.batches[0]["top_k"] == "2"  # top_k is capped at the model's labels


def test_an_unreachable_gateway_stops_the_job_after_max_retries(tmp_path: Path, stub: Stub) -> None:
    src = labelled(tmp_path / "src", 8)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    waits = Waits()
    with pytest.raises(GatewayUnreachable, match=r"after 3 tries.*rerun the same command to resume"):
        job(src, tmp_path / "out.jsonl", url=closed, waits=waits, max_retries=2).run()
    assert len(waits.delays) == 2
    stopped = job(src, tmp_path / "out.jsonl", url=closed, waits=lambda seconds: True).run()
    assert stopped.interrupted and stopped.exit_status == 130 and not (tmp_path / "out.jsonl").exists()

    class Down(requests.adapters.HTTPAdapter):
        def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
            if request.method == "POST":
                raise requests.ConnectionError("connection refused")
            return super().send(request, *args, **kwargs)

    def session() -> requests.Session:
        s = requests.Session()
        s.mount("http://", Down())
        return s

    summary = job(src, tmp_path / "out.jsonl", stub, session_factory=session, max_retries=2).run()
    assert summary.unreachable is not None and "rerun the same command to resume" in summary.unreachable
    assert summary.exit_status == 3 and summary.done == 0


def test_the_cli_exits_3_when_the_gateway_is_down(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    src = labelled(tmp_path / "src", 2)
    args = ["backfill", str(src), "--out", str(tmp_path / "o.jsonl"), "--url", closed, "--max-retries", "0"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 3, result.output
    assert "gateway unreachable" in result.stderr and "rerun the same command to resume" in result.stderr


# The command, its summary and signals


def test_the_cli_prints_a_summary_with_label_counts_and_writes_it_as_json(tmp_path: Path, stub: Stub) -> None:
    src = images(tmp_path / "src", {"a.png": "蓝色方形", "b.png": "蓝色方形", "c.png": "红色圆形", "d.png": "bad"})
    args = ["backfill", str(src), "--out", str(tmp_path / "o.jsonl"), "--url", stub.url, "--summary-json"]
    result = CliRunner().invoke(cli, [*args, str(tmp_path / "s.json")])
    assert result.exit_code == 1, result.output  # one error line
    report = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert (report["total"], report["skipped"], report["done"], report["failed"]) == (4, 0, 4, 1)
    assert list(report["labels"].items()) == [("蓝色方形", 2), ("红色圆形", 1)]
    assert "4 done now, 1 failed now" in result.stderr and "top-1 labels" in result.stderr
    again = CliRunner().invoke(cli, [*args[:-1], "--quiet"])
    assert again.exit_code == 0 and "4 skipped" in again.stderr


def test_the_cli_exits_4_when_files_are_left_for_the_next_run(tmp_path: Path, stub: Stub) -> None:
    src = images(tmp_path / "src", {"a.png": "蓝色方形", "b.png": "flaky:1:红色圆形"})
    args = ["backfill", str(src), "--out", str(tmp_path / "o.jsonl"), "--url", stub.url, "--max-retries", "0"]
    result = CliRunner().invoke(cli, [*args, "--summary-json", str(tmp_path / "s.json")])
    assert result.exit_code == 4, result.output
    report = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert (report["done"], report["failed"], report["left"], report["left_for_next_run"]) == (1, 0, 1, 1)
    assert "1 left for the next run" in result.stderr and "rerun the same command" in result.stderr
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert [r["file"] for r in records(tmp_path / "o.jsonl")] == ["a.png", "b.png"]


def test_progress_reads_done_total_rate_eta_skipped_and_failed() -> None:
    summary = Summary("o.jsonl", total=1000, skipped=100, done=300, failed=2)
    assert format_progress(summary, 50.0) == (
        "backfill: 400/1000 (40.0 %), 50.0 images/s, ETA 12.0 s, 100 skipped, 2 failed"
    )
    assert "ETA 2h46m" in format_progress(summary, 0.06)
    stream = StringIO()
    reporter = Reporter(stream, interval_s=10.0, clock=lambda: 0.0)
    reporter.progress(summary, force=True)
    assert stream.getvalue().startswith("backfill: 400/1000") and "\r" not in stream.getvalue()


def test_backoff_grows_to_its_cap_with_jitter_and_keeps_retry_after_as_its_floor() -> None:
    backoff = Backoff(base_s=0.5, cap_s=60.0)
    assert [backoff.delay(n, rand=1.0) for n in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff.delay(0, rand=0.0) == 0.25 and backoff.delay(20, rand=1.0) == 60.0
    assert backoff.delay(0, floor_s=5.0, rand=1.0) == 5.0 and backoff.delay(30, floor_s=90.0) == 90.0


def start(src: Path, out: Path, stub: Stub) -> subprocess.Popen[bytes]:
    args = ["backfill", str(src), "--out", str(out), "--url", stub.url, "--batch-size", "4", "--concurrency", "2"]
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def wait_for(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def lines_in(out: Path) -> int:
    return out.read_bytes().count(b"\n") if out.exists() else 0


def test_a_killed_job_reruns_to_every_file_exactly_once(tmp_path: Path, stub: Stub) -> None:
    src, out = labelled(tmp_path / "src", 120), tmp_path / "out.jsonl"
    stub.delay_s = 0.05
    proc = start(src, out, stub)
    wait_for(lambda: lines_in(out) >= 12)
    proc.kill()
    assert proc.wait(10) == -signal.SIGKILL
    assert 12 <= len(records(out)) < 120
    stub.delay_s = 0.0
    summary = job(src, out, stub).run()
    assert_each_once(out, {f"img{i:03d}.png" for i in range(120)})
    assert summary.skipped + summary.done == 120


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_finishes_what_is_in_flight_exits_130_and_resumes(
    tmp_path: Path, stub: Stub, signum: signal.Signals
) -> None:
    src, out = labelled(tmp_path / "src", 120), tmp_path / "out.jsonl"
    stub.delay_s = 0.05
    proc = start(src, out, stub)
    wait_for(lambda: lines_in(out) >= 12)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 130, stderr.decode()
    assert "interrupted: rerun the same command to resume" in stderr.decode()
    sent = sum(len(b["files"]) for b in stub.batches)
    assert len(records(out)) == sent < 120  # what was in flight was written; nothing was torn
    stub.delay_s = 0.0
    assert job(src, out, stub).run().exit_status == 0
    assert_each_once(out, {f"img{i:03d}.png" for i in range(120)})


def test_a_second_ctrl_c_leaves_at_once_without_a_torn_line(tmp_path: Path, stub: Stub) -> None:
    src, out = labelled(tmp_path / "src", 40), tmp_path / "out.jsonl"
    stub.delay_s = 3.0
    proc = start(src, out, stub)
    wait_for(lambda: len(stub.batches) >= 2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 130 and time.monotonic() - began < 2.0, stderr.decode()
    assert out.read_bytes() == b""  # the answers in flight were dropped whole, to be redone


def test_a_directory_that_cannot_be_synced_only_warns_when_the_options_are_recorded(tmp_path: Path) -> None:
    def failing(directory: str) -> None:
        fsync_directory("/nonexistent/wanwu")  # the real one, failing: it warns and goes on

    results = ResultsFile(str(tmp_path / "out.jsonl"), sync_dir=failing)
    results.open()
    results.record_options({"model": "m", "top_k": 1, "lang": None})  # the record is whole; no error
    results.close()
    assert json.loads((tmp_path / "out.jsonl.options.json").read_text())["model"] == "m"


def test_a_partial_options_record_a_crash_left_is_not_taken_for_an_image(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.png").write_bytes(b"x")
    results = ResultsFile(str(src / "out.jsonl"))
    for name in ("out.jsonl", "out.jsonl.options.json", ".out.jsonl.options.json.k3j9x_q.partial", "b.png"):
        (src / name).write_bytes(b"x")
    owned = sorted(name for name in os.listdir(src) if results.owns(str(src / name)))
    assert owned == [".out.jsonl.options.json.k3j9x_q.partial", "out.jsonl", "out.jsonl.options.json"]
