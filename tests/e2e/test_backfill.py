"""``wanwu backfill`` against a real gateway and real worker containers: the same labels
as one-by-one requests, every file exactly once after a SIGKILL and a rerun, a bad file
answered on its own, and interactive requests ahead of the batch queue."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.gatewayproc import ROOT, Gateway
from tests.images import demo_tree, truncated_png

MODEL = "demo-shapes"


def backfill(gateway: Gateway, source: Path, out: Path, *options: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "gateway.cli", "backfill", str(source), "--out", str(out), "--url", gateway.url]
    return subprocess.Popen([*command, "--quiet", *options], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def lines_of(out: Path) -> list[dict[str, object]]:
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_a_killed_backfill_resumes_to_every_file_once_with_one_by_one_labels(gateway: Gateway, tmp_path: Path) -> None:
    source = tmp_path / "images"
    expected = demo_tree(source, 300, seed=7)
    (source / "broken").mkdir()
    (source / "broken" / "bad.png").write_bytes(truncated_png())
    (source / "notes.txt").write_text("not an image, not picked up")
    out = tmp_path / "results.jsonl"

    # A slow first run (small batches, one at a time), killed without warning mid-way.
    first = backfill(gateway, source, out, "--batch-size", "2", "--concurrency", "1")
    deadline = time.monotonic() + 120
    while len(lines_of(out)) < 30 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    before = len(out.read_bytes().splitlines())
    assert 30 <= before < len(expected), f"the first run was not killed mid-way ({before} lines)"

    second = backfill(gateway, source, out, "--batch-size", "16", "--concurrency", "3")
    _, err = second.communicate(timeout=300)
    assert second.returncode in (0, 1), err.decode()
    assert b"skipped" in err  # the summary says how many the rerun skipped

    lines = lines_of(out)
    files = [str(line["file"]) for line in lines]
    assert len(files) == len(set(files)) == len(expected) + 1  # every file exactly once, bad.png too
    by_file = {str(line["file"]): line for line in lines}
    bad = by_file.pop("broken/bad.png")
    assert bad["error"]["code"] == "corrupt_image"  # type: ignore[index]
    assert set(by_file) == set(expected)

    # The same labels as one request per image (fresh answers, not the cache).
    session = requests.Session()
    mismatches = []
    for relative, line in by_file.items():
        with (source / relative).open("rb") as handle:
            answer = session.post(
                f"{gateway.url}/v1/models/{MODEL}/predict",
                files={"image": (relative, handle)},
                headers={"Cache-Control": "no-cache"},
                timeout=60,
            )
        assert answer.status_code == 200, answer.text
        single = answer.json()["predictions"][0]
        batched = line["predictions"][0]  # type: ignore[index]
        if single["label"] != batched["label"] or abs(single["score"] - batched["score"]) > 1e-3:
            mismatches.append((relative, single, batched))
    assert not mismatches, mismatches[:5]
    correct = sum(line["predictions"][0]["label"] == expected[f] for f, line in by_file.items())  # type: ignore[index]
    assert correct >= 0.97 * len(expected)


def test_interactive_requests_are_answered_ahead_of_the_batch_queue(gateway: Gateway, tmp_path: Path) -> None:
    source = tmp_path / "images"
    demo_tree(source, 1600, seed=11)  # long enough for five probes on a loaded machine
    out = tmp_path / "results.jsonl"
    job = backfill(gateway, source, out, "--batch-size", "8", "--concurrency", "8")
    probe = (source / "part-1" / "00" / "img-00001.png").read_bytes()
    checked = jumped = 0
    try:
        deadline = time.monotonic() + 120
        while checked < 5 and job.poll() is None and time.monotonic() < deadline:
            pool = requests.get(f"{gateway.url}/v1/pool", timeout=10).json()
            if pool["waiting"]["batch"] < 3:  # a batch queue the probe could wait behind
                time.sleep(0.002)
                continue
            jumps = pool["counters"]["queue_jumps"]
            answer = requests.post(
                f"{gateway.url}/v1/models/{MODEL}/predict",
                files={"image": ("probe.png", probe)},
                headers={"Cache-Control": "no-cache"},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            after = requests.get(f"{gateway.url}/v1/pool", timeout=10).json()["counters"]["queue_jumps"]
            # In FIFO order no interactive grant is ever made while older batch work waits.
            # The queue may drain in the moment between the look and the probe, so not every
            # probe need jump; most must.
            jumped += after > jumps
            checked += 1
        assert checked == 5, "the backfill never had a batch queue to jump"
        assert jumped >= 3, f"only {jumped} of 5 probes went ahead of the waiting batch work"
    finally:
        _, err = job.communicate(timeout=300)
    assert job.returncode == 0, err.decode()
    files = [line["file"] for line in lines_of(out)]
    assert len(files) == len(set(files)) == 1600
