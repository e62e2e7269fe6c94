"""The wanwu stack (deploy/swarm/stack.yml) on a test swarm (tests/swarmnet.py): deploy
it, reach the gateway through a relay, and look at its workers through the manager.
Used by tests/e2e/test_swarm.py and the bench's swarm section."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import requests

from tests import swarmnet
from tests.dockerutil import IMAGE
from tests.gatewayproc import ROOT
from tests.images import demo_images

GATEWAY_IMAGE = "wanwu-gateway:latest"
STACK = ROOT / "deploy" / "swarm" / "stack.yml"
ENCRYPTED = ROOT / "deploy" / "swarm" / "encrypted.yml"  # over STACK where the kernel has IPsec
ADMIN_SECRET = "wanwu-admin-token"  # the stack's external secret (WANWU_ADMIN_TOKEN_SECRET's default)
GPU_MB = 16384
EMBED = "demo-shapes-embed"
IMAGE_BYTES = next(iter(demo_images().values()))


class Swarm:
    """The cluster, the gateway's address through a relay, and the stack's settings."""

    def __init__(
        self, cluster: swarmnet.SwarmCluster, models: Path, url: str, admin_token: str, encrypted: bool
    ) -> None:
        self.cluster = cluster
        self.models = models
        self.url = url
        self.admin_token = admin_token  # the gateway's, from the stack's Docker secret
        self.encrypted = encrypted  # whether the worker network is deployed encrypted (ENCRYPTED)
        self.pool_id = ""

    @property
    def manager(self) -> Any:
        return self.cluster.manager.client()

    def deploy(self, **settings: str) -> None:
        """Deploy (or update) the stack with ``settings`` (WANWU_* without the prefix);
        wait until the new gateway answers /readyz for its pool id."""
        self.pool_id = "sw" + uuid.uuid4().hex[:6]
        # The demo model: these tests are about placement and failures across nodes, and
        # its 2 ms answers keep the three-node test swarm quick.
        settings.setdefault("default_model", "demo-shapes")
        env = {
            **os.environ,
            "WANWU_MODELS_DIR": str(self.models),
            "WANWU_WORKER_IMAGE": IMAGE,
            "WANWU_POOL_ID": self.pool_id,
            "WANWU_DOCKER_SOCKET": str(self.cluster.manager.socket),  # the nodes share this filesystem
            **{f"WANWU_{key.upper()}": value for key, value in settings.items()},
        }
        command = ["docker", "-H", self.cluster.manager.base_url, "stack", "deploy", "--resolve-image", "never"]
        files = ["-c", str(STACK), *(["-c", str(ENCRYPTED)] if self.encrypted else [])]
        subprocess.run([*command, *files, "wanwu"], env=env, check=True, capture_output=True, timeout=60)
        self.wait_gateway(lambda pool: self.gateway_pool_id() == self.pool_id, "the new gateway")

    def gateway_pool_id(self) -> str | None:
        """The pool id of the gateway task running now, as the manager sees it."""
        tasks = self.manager.api.tasks(filters={"service": "wanwu_gateway", "desired-state": "running"})
        for task in tasks:
            if task["Status"]["State"] == "running":
                env = task["Spec"]["ContainerSpec"].get("Env") or []
                return next((e.split("=", 1)[1] for e in env if e.startswith("WANWU_POOL_ID=")), None)
        return None

    def wait_gateway(self, ready: Callable[[dict[str, Any]], bool], what: str, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    pool = requests.get(f"{self.url}/v1/pool", timeout=5).json()
                    if ready(pool):
                        return pool
                    last = pool
            except requests.RequestException as exc:
                last = exc
            time.sleep(0.3)
        raise AssertionError(f"{what} was not ready within {timeout:g} s: {last}\n{self.gateway_logs()}")

    def gateway_logs(self, tail: int | str = 40) -> str:
        """The gateway's last log lines; all of them are also written to the cluster's
        directory (gateway.log) for a failure's post-mortem."""
        try:
            raw = self.manager.api.service_logs("wanwu_gateway", stdout=True, stderr=True, tail="all")
            lines = b"".join(raw).decode("utf-8", "replace").splitlines()
            keep = Path(os.environ.get("WANWU_SWARM_LOG_DIR", "/tmp")) / "wanwu-swarm-gateway.log"
            keep.write_text("\n".join(lines) + "\n")
            return "\n".join(lines[-int(tail) :] if tail != "all" else lines) + f"\n(all of it: {keep})"
        except Exception as exc:  # noqa: BLE001 - only for a failure message
            return f"(gateway logs unavailable: {exc})"

    def predict(self, model: str = "demo-shapes", timeout: float = 90) -> requests.Response:
        return requests.post(
            f"{self.url}/v1/models/{model}/{'embed' if model == EMBED else 'predict'}",
            files={"image": ("x.png", IMAGE_BYTES)},
            headers={"Cache-Control": "no-cache"},
            timeout=timeout,
        )

    def workers(self) -> dict[str, dict[str, Any]]:
        """This pool's worker services by model: node hostname, task, service spec."""
        out = {}
        nodes = {n["ID"]: n["Description"]["Hostname"] for n in self.manager.api.nodes()}
        for service in self.manager.api.services(filters={"label": f"wanwu.pool={self.pool_id}"}):
            labels = service["Spec"]["Labels"]
            try:
                tasks = self.manager.api.tasks(filters={"service": service["ID"]})
            except docker.errors.NotFound:  # removed since it was listed (the gateway replaced the worker)
                continue
            running = [t for t in tasks if t["Status"]["State"] == "running"]
            task = running[0] if running else None
            out[labels["wanwu.model"]] = {
                "node": nodes.get(task["NodeID"]) if task else None,
                "task": task,
                "service": service,
            }
        return out

    def containers_of_pool(self, pool_id: str) -> dict[str, list[str]]:
        """Every node's containers labelled with ``pool_id``, running or not."""
        out = {}
        for name, node in self.cluster.nodes.items():
            rows = node.client().api.containers(all=True, filters={"label": f"wanwu.pool={pool_id}"})
            out[name] = [row["Names"][0] for row in rows]
        return out


@contextmanager
def running_swarm(timings: dict[str, float] | None = None) -> Iterator[Swarm]:
    """A three-node swarm (n3 with one fake GPU, labelled with its size), the gateway
    image built from this checkout and loaded on the manager, the worker image on every
    node; torn down afterwards, leaving nothing. ``timings`` gets the phases' seconds."""
    from scheduler.backends.docker_image import build_gateway_image
    from scheduler.backends.docker_swarm_network import probe_ipsec

    timings = {} if timings is None else timings
    swarmnet.clean_leftovers()
    began = time.monotonic()
    build_gateway_image(GATEWAY_IMAGE)  # the checkout as it is now
    timings["gateway_image"] = round(time.monotonic() - began, 1)
    cluster = swarmnet.SwarmCluster(nodes=3, gpu_nodes={"n3": 1}, images=(IMAGE,))
    models = cluster.root / "models"  # the same path on every node: they share this filesystem
    try:
        began = time.monotonic()
        cluster.start()
        timings["cluster_start"] = round(time.monotonic() - began, 1)
        timings.update({f"start_{k}": v for k, v in cluster.timings_s.items()})
        began = time.monotonic()
        distribute = [str(ROOT / "deploy" / "swarm" / "distribute-image.sh"), GATEWAY_IMAGE, cluster.manager.base_url]
        for _ in range(2):  # the second run finds the image there and skips it
            shown = subprocess.run(distribute, check=True, capture_output=True, text=True, timeout=300).stdout
        if "already has" not in shown:
            raise RuntimeError(f"distribute-image.sh loaded {GATEWAY_IMAGE} twice: {shown}")
        timings["gateway_image_distributed"] = round(time.monotonic() - began, 1)
        models.mkdir(mode=0o755)
        manager = cluster.manager.client()
        gpu_node = manager.api.inspect_node(cluster.node_id("n3"))
        spec = gpu_node["Spec"]
        spec["Labels"] = {**spec.get("Labels", {}), "wanwu.gpu-memory-mb": str(GPU_MB)}
        manager.api.update_node(cluster.node_id("n3"), gpu_node["Version"]["Index"], spec)
        admin_token = secrets.token_hex(32)
        manager.secrets.create(name=ADMIN_SECRET, data=admin_token.encode())
        encrypted, why = probe_ipsec()  # the nodes run on this machine's kernel
        print(f"\nswarm worker network: {'encrypted' if encrypted else 'NOT encrypted'} ({why})")
        with cluster.relay(cluster.manager.address, 8080) as (host, port):
            yield Swarm(cluster, models, f"http://{host}:{port}", admin_token, encrypted)
            subprocess.run(
                ["docker", "-H", cluster.manager.base_url, "stack", "rm", "wanwu"], capture_output=True, timeout=60
            )
    finally:
        timings["teardown"] = round(cluster.close(), 1)
    left = swarmnet.leftovers()
    if left:
        raise RuntimeError(f"the test swarm left things behind: {left}")
