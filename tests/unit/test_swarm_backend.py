"""The swarm backend's own logic, on manager answers shaped as Docker 20.10 gives them:
GPU inventory and readings, and which workers the watcher reports gone. The backend
against a real swarm is tests/e2e/test_swarm.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from scheduler.backends.docker_swarm import SwarmBackend
from scheduler.backends.docker_swarm_network import address_on
from scheduler.backends.docker_swarm_nodes import RemoteWorker
from scheduler.backends.docker_swarm_placement import split_device
from scheduler.errors import WorkerStartError


def node(node_id: str, host: str, state: str = "ready", gpus: tuple[str, ...] = (), memory: str | None = None) -> dict:
    labels = {"wanwu.gpu-memory-mb": memory} if memory else {}
    return {
        "ID": node_id,
        "Description": {
            "Hostname": host,
            "Resources": {
                "GenericResources": [{"NamedResourceSpec": {"Kind": "NVIDIA-GPU", "Value": g}} for g in gpus]
                + [{"DiscreteResourceSpec": {"Kind": "other", "Value": 4}}]
            },
        },
        "Status": {"State": state},
        "Spec": {"Availability": "active", "Labels": labels},
    }


def task(task_id: str, node_id: str, state: str = "running", desired: str = "running") -> dict:
    return {"ID": task_id, "NodeID": node_id, "DesiredState": desired, "Status": {"State": state, "Err": ""}}


class Api:
    """The two manager calls the watcher makes."""

    def __init__(self, nodes: list[dict], tasks: list[dict]) -> None:
        self.rows, self.task_rows = nodes, tasks

    def nodes(self) -> list[dict]:
        return self.rows

    def tasks(self, filters: dict[str, Any] | None = None) -> list[dict]:
        return self.task_rows


def backend(api: Api) -> SwarmBackend:
    return SwarmBackend("img", "p", "net", client=SimpleNamespace(api=api))  # type: ignore[arg-type]


def ready_worker(
    b: SwarmBackend, worker_id: str, task_id: str, node_id: str, device: str | None = None
) -> RemoteWorker:
    remote = RemoteWorker(worker_id, f"svc-{worker_id}", "secret", device, task_id, node_id, "10.0.1.5", ready=True)
    b._workers[worker_id] = remote
    return remote


def test_gpus_are_the_named_generic_resources_of_the_kind_asked() -> None:
    b = backend(
        Api([node("a", "gpu-2", gpus=("GPU-b", "GPU-a")), node("b", "cpu-1"), node("c", "gpu-1", gpus=("GPU-c",))], [])
    )
    assert b.gpu_devices() == ("gpu-1/GPU-c", "gpu-2/GPU-a", "gpu-2/GPU-b")


def test_readings_count_this_pools_workers_and_a_down_node_is_full() -> None:
    api = Api([node("a", "gpu-1", gpus=("GPU-0", "GPU-1"), memory="16000"), node("b", "gpu-2", gpus=("GPU-0",))], [])
    b = backend(api)
    devices = ("gpu-1/GPU-0", "gpu-1/GPU-1", "gpu-2/GPU-0")
    b.gpu_monitor(devices)
    ready_worker(b, "w1", "t1", "a", "gpu-1/GPU-0").gpu_mb = 1200.0
    readings = {r.device: (r.used_mb, r.total_mb) for r in b.gpu_readings(devices)}
    # gpu-2 has no memory label: not offered; gpu-1/GPU-1 is free
    assert readings == {"gpu-1/GPU-0": (1200.0, 16000.0), "gpu-1/GPU-1": (0.0, 16000.0)}
    api.rows[0]["Status"]["State"] = "down"
    b.nodes()
    readings = {r.device: (r.used_mb, r.total_mb) for r in b.gpu_readings(devices)}
    assert readings == {"gpu-1/GPU-0": (16000.0, 16000.0), "gpu-1/GPU-1": (16000.0, 16000.0)}


@pytest.mark.parametrize(
    ("row", "node_state", "reason"),
    [
        (task("t1", "a"), "ready", None),
        (task("t1", "a"), "unknown", None),  # every node, for a moment, after a leader change
        (task("t1", "a"), "down", "its node n-a is down"),
        (task("t1", "a", state="rejected"), "ready", "its task is rejected"),
        (task("t1", "a", desired="shutdown"), "ready", "swarm is stopping its task (shutdown)"),
        (task("t2", "a"), "ready", "its task was removed"),  # swarm replaced it: another task now
    ],
)
def test_the_watcher_reports_a_worker_gone_once_for_each_way_it_goes(
    row: dict, node_state: str, reason: str | None
) -> None:
    b = backend(Api([node("a", "n-a", state=node_state)], [row]))
    ready_worker(b, "w1", "t1", "a")
    gone = [(r.worker_id, why) for r, why in b._gone()]
    if reason is None:
        assert gone == []
    else:
        assert gone == [("w1", reason)]
        assert b._gone() == []  # reported once


def test_a_starting_worker_is_not_watched() -> None:
    b = backend(Api([node("a", "n-a")], []))
    ready_worker(b, "w1", "t1", "a").ready = False
    assert b._gone() == []


def test_devices_and_addresses() -> None:
    assert split_device("gpu-1/GPU-0") == ("gpu-1", "GPU-0")
    for bad in ("GPU-0", "/GPU-0", "gpu-1/"):
        with pytest.raises(WorkerStartError, match="NODE/GPU"):
            split_device(bad)
    attached = {
        "NetworksAttachments": [
            {"Network": {"ID": "other"}, "Addresses": ["10.0.0.3/24"]},
            {"Network": {"ID": "net1"}, "Addresses": ["10.0.1.7/24"]},
        ]
    }
    assert address_on(attached, "net1") == "10.0.1.7"
    assert address_on(attached, "net2") == ""
