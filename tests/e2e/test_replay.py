"""``wanwu replay`` against a real gateway over real containers: the simulator's
prediction must match what the live pool did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import docker
import pytest
from click.testing import CliRunner

from gateway.cli import cli
from tests.dockerutil import demo_bundle_dir
from tests.gatewayproc import running_gateway

TRACE = Path(__file__).resolve().parents[1] / "data" / "traces" / "azure2019-sample50"
MODELS = ("demo-shapes", "demo-b", "demo-c")


def models_dir(root: Path) -> None:
    demo = demo_bundle_dir(root / "built-in")
    for name in MODELS:
        shutil.copytree(demo, root / "models" / name)
        config_file = root / "models" / name / "model.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["name"] = name
        config_file.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


@pytest.mark.docker
def test_replay_measures_what_the_simulator_predicts(docker_client: docker.DockerClient, tmp_path: Path) -> None:
    assert TRACE.is_dir(), f"the trace is missing: {TRACE}"
    models_dir(tmp_path)
    settings = {"max_workers": "2", "idle_ttl_s": "5", "queue_timeout_s": "20"}
    with running_gateway(tmp_path, docker_client, **settings) as gw:
        # 30 minutes of the low-QPS functions, 60x faster: 52 requests over 30 s, to three models.
        args = ["replay", str(TRACE), "--url", gw.url, "--speedup", "60", "--minutes", "300:330"]
        args += ["--max-per-day", "1440", "--model", ",".join(MODELS), "--json"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert len(gw.containers(docker_client)) <= 2  # N was never exceeded
    report = json.loads(result.stdout)
    print(json.dumps({k: report[k] for k in ("measured", "predicted", "profile")}))  # shown by pytest on failure
    measured, predicted = report["measured"], report["predicted"]
    assert measured["requests"] == predicted["requests"] == 52
    assert measured["errors"] == 0 and measured["reject_rate"] == 0
    assert measured["cold_starts"] >= 5  # TTL expiries and evictions among three models on two slots
    # Stated tolerance: within 3 cold starts or 25 %, whichever is more (start-up times vary on 2 cores).
    tolerance = max(3, 0.25 * measured["cold_starts"])
    assert abs(measured["cold_starts"] - predicted["cold_starts"]) <= tolerance, report
    assert report["settings"]["max_workers"] == 2 and report["settings"]["idle_ttl_s"] == 5
