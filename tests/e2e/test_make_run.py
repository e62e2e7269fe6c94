"""`make run` in a fresh copy of the tree sets itself up, serves the general model on
127.0.0.1:8080 and answers a curl of a real photo in Chinese: the cat is a cat (猫), the
coffee is espresso or a cup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import docker
import pytest

from scheduler.backends.docker_common import POOL_LABEL
from tests.gatewayproc import ROOT, stop, wait_ready
from tests.photos import PHOTOS

pytestmark = pytest.mark.docker

LABELS = ROOT / "worker_image" / "wanwu_worker" / "general"
ZH, EN = ((LABELS / f"labels_{lang}.txt").read_text(encoding="utf-8").splitlines() for lang in ("zh", "en"))


def tracked_and_new_files() -> list[str]:
    command = ["git", "ls-files", "-co", "--exclude-standard", "-z"]
    out = subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return [name for name in out.stdout.decode().split("\0") if name and (ROOT / name).is_file()]


def test_make_run_from_a_fresh_tree_answers_curl(tmp_path: Path, docker_client: docker.DockerClient) -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8080)) == 0:
            pytest.fail("127.0.0.1:8080 is taken; `make run` serves there")
    tree = tmp_path / "wanwu"
    for name in tracked_and_new_files():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    pool_id = "mkrun" + uuid.uuid4().hex[:5]
    env = {
        **os.environ,
        "WANWU_POOL_ID": pool_id,
        "WANWU_MODELS_DIR": str(tmp_path / "models"),
        "WANWU_SOCKET_DIR": f"/tmp/mr-{pool_id}",
    }
    log = tmp_path / "make-run.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["make", "run"], cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_ready("http://127.0.0.1:8080", process, log, timeout=600)
        english = dict(zip(ZH, EN, strict=True))
        for name, classes, group in (
            ("chelsea.png", {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}, "猫"),
            ("coffee.png", {"espresso", "cup", "coffee mug"}, "食物"),
        ):
            curl = subprocess.run(
                ["curl", "-sS", "-F", f"image=@{PHOTOS / name}", "http://127.0.0.1:8080/predict"],
                check=True,
                capture_output=True,
                timeout=120,
            )
            answer = json.loads(curl.stdout)
            assert answer["model"] == "general", answer
            assert english[answer["result"]] in classes, answer
            assert answer["groups"][0]["label"] == group, answer
    finally:
        # make runs wanwu in its own process group: signal the whole group.
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        stop(process)
        shutil.rmtree(f"/tmp/mr-{pool_id}", ignore_errors=True)
    left = docker_client.api.containers(all=True, filters={"label": f"{POOL_LABEL}={pool_id}"})
    for row in left:
        docker_client.api.remove_container(row["Id"], force=True)
    assert not left, "make run left containers behind"
