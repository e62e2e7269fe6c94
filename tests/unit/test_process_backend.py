"""The process backend's pieces that need no model: sizes, cgroups on fake hierarchies,
the sh wrapper, process identity, and starts that fail (with real child processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler.assembly import build_backend
from scheduler.backends.base import SpawnRequest
from scheduler.backends.limits import (
    Cgroups,
    ProcessLimits,
    boot_id,
    is_same_process,
    parse_size,
    process_start_time,
    wrapper,
)
from scheduler.backends.process import ProcessBackend
from scheduler.errors import BackendUnavailable, ConfigError, WorkerStartError, WorkerStartTimeout
from scheduler.settings import Settings
from tests.workerprocs import worker_processes

LIMITS = ProcessLimits(memory_bytes=3 * 2**30, pids=64, cpus=1.5)


@pytest.mark.parametrize(
    ("text", "size"), [("512m", 512 * 2**20), ("2g", 2 * 2**30), ("1.5G", 3 * 2**29), ("4096", 4096), ("64kb", 65536)]
)
def test_sizes_read_like_dockers(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "2x", "-1g"])
def test_a_bad_size_says_what_it_expected(text: str) -> None:
    with pytest.raises(ValueError, match="such as 512m"):
        parse_size(text)


def fake_v1(root: Path) -> Path:
    for controller in ("memory", "pids", "cpu"):
        (root / controller).mkdir()
    (root / "memory" / "svc").mkdir()
    own = root / "self_cgroup"
    own.write_text("9:name=systemd:/\n8:pids:/\n4:memory:/svc\n2:cpu,cpuacct:/\n")
    return own


def test_v1_cgroups_are_made_under_our_own_with_every_limit(tmp_path: Path) -> None:
    cgroups = Cgroups("p1", root=tmp_path, self_cgroup=fake_v1(tmp_path))
    assert cgroups.mode == "v1"
    assert not (tmp_path / "memory/svc/wanwu.p1").exists()  # detecting (doctor) changes nothing
    paths = cgroups.create("w1", LIMITS)
    memory, pids, cpu = tmp_path / "memory/svc/wanwu.p1/w1", tmp_path / "pids/wanwu.p1/w1", tmp_path / "cpu/wanwu.p1/w1"
    assert sorted(paths) == sorted([memory, pids, cpu])
    assert (memory / "memory.limit_in_bytes").read_text() == str(3 * 2**30)
    assert (pids / "pids.max").read_text() == "64"
    assert (cpu / "cpu.cfs_quota_us").read_text() == "150000" and (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert cgroups.describe(LIMITS) == "cgroup v1: memory 3072 MiB, pids 64, cpus 1.5"
    assert not cgroups.oom_killed(paths)
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    assert cgroups.oom_killed(paths)


def test_v2_cgroups_are_delegated_below_our_own_with_the_gateway_moved_to_a_leaf(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    service = tmp_path / "system.slice" / "wanwu.service"
    service.mkdir(parents=True)
    (service / "cgroup.controllers").write_text("cpu io memory pids\n")
    (service / "cgroup.subtree_control").write_text("\n")
    (service / "cgroup.procs").write_text("4242\n")
    own = tmp_path / "self_cgroup"
    own.write_text("0::/system.slice/wanwu.service\n")
    cgroups = Cgroups("p2", root=tmp_path, self_cgroup=own)
    assert cgroups.mode == "v2" and not (service / "wanwu.gateway").exists()
    (path,) = cgroups.create("w1", LIMITS)
    base = service / "wanwu.p2"
    assert (service / "wanwu.gateway" / "cgroup.procs").read_text() == "4242"  # out of the way first
    assert (service / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (base / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert path == base / "w1"
    assert (path / "memory.max").read_text() == str(3 * 2**30)
    assert not (path / "memory.swap.max").exists()  # no swap accounting on this "kernel": not written
    assert (path / "pids.max").read_text() == "64" and (path / "cpu.max").read_text() == "150000 100000"
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert cgroups.oom_killed([path])


def test_what_is_left_in_a_workers_cgroup_is_killed(tmp_path: Path) -> None:
    straggler = subprocess.Popen(["sleep", "60"])
    group = tmp_path / "w1"
    group.mkdir()
    (group / "cgroup.procs").write_text(f"{straggler.pid}\n")
    Cgroups.kill_members([group])
    assert straggler.wait(5) == -9


def test_without_a_writable_hierarchy_only_rlimit_as_is_left(tmp_path: Path) -> None:
    own = tmp_path / "self_cgroup"
    own.write_text("0::/\n")
    cgroups = Cgroups("p3", root=tmp_path / "nothing", self_cgroup=own)
    assert cgroups.mode is None and cgroups.create("w1", LIMITS) == []
    assert "RLIMIT_AS" in cgroups.describe(LIMITS)


def test_the_wrapper_joins_its_cgroups_and_bounds_address_space_before_exec(tmp_path: Path) -> None:
    group = tmp_path / "a group's dir"  # quoting matters
    group.mkdir()
    show = "import os, resource; print(os.getpid(), resource.getrlimit(resource.RLIMIT_AS)[0])"
    command = [*wrapper([group], 512 * 2**20), sys.executable, "-c", show]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    pid, limit = result.stdout.split()
    assert (group / "cgroup.procs").read_text().strip() == pid  # the same process: sh exec'd python
    assert int(limit) == 512 * 2**20


def test_a_process_is_known_by_pid_start_time_and_boot() -> None:
    leader = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        start = process_start_time(leader.pid)
        assert start is not None
        assert is_same_process(leader.pid, start, boot_id())
        assert not is_same_process(leader.pid, start + 1, boot_id())  # a reused pid
        assert not is_same_process(leader.pid, start, "another boot")
    finally:
        leader.kill()
        leader.wait()
    assert process_start_time(leader.pid) is None or not is_same_process(leader.pid, start, boot_id())


def fake_python(tmp_path: Path, body: str) -> str:
    script = tmp_path / "python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


def backend(tmp_path: Path, python: str, timeout: float = 5.0) -> ProcessBackend:
    own = tmp_path / "self_cgroup"
    own.write_text("0::/\n")
    cgroups = Cgroups("unit", root=tmp_path / "no-cgroups", self_cgroup=own)
    # As the test's own user: these are about starts that fail (uid 10001: test_process_user.py).
    return ProcessBackend(
        "unit", tmp_path / "sockets", python, ProcessLimits(), timeout, cgroups=cgroups, worker_uid=os.geteuid()
    )


def test_a_worker_that_exits_while_starting_reports_its_status_and_log(tmp_path: Path) -> None:
    python = fake_python(tmp_path, 'echo "loading the bundle failed: bad weights" >&2; exit 3')
    processes = backend(tmp_path, python)
    with pytest.raises(WorkerStartError, match=r"exited with status 3 while starting; last log lines:\n.*bad weights"):
        processes.spawn(SpawnRequest("w1", "m", tmp_path))
    assert not (tmp_path / "sockets" / "unit" / "w1").exists() and processes.list_workers() == []


def test_a_worker_that_never_answers_is_killed_at_the_deadline(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "echo still warming up; exec sleep 60")
    processes = backend(tmp_path, python, timeout=0.5)
    with pytest.raises(WorkerStartTimeout, match=r"not ready within 0.5 s; last log lines:\nstill warming up"):
        processes.spawn(SpawnRequest("w1", "m", tmp_path))
    assert worker_processes("unit") == [] and processes.list_workers() == []


def test_the_worker_is_told_its_model_socket_and_no_gpu_and_not_the_gateways_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANWU_ADMIN_TOKEN", "a-secret-admin-token")
    dump = tmp_path / "env.txt"
    python = fake_python(tmp_path, f"env > {dump}; exit 1")
    with pytest.raises(WorkerStartError):
        backend(tmp_path, python).spawn(SpawnRequest("w1", "m", tmp_path / "m"))
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert env["WANWU_MODEL_DIR"] == str(tmp_path / "m") and env["WANWU_WORKER_ID"] == "w1"
    assert env["WANWU_SOCKET"] == str(tmp_path / "sockets" / "unit" / "w1" / "worker.sock")
    assert env["CUDA_VISIBLE_DEVICES"] == "" and "WANWU_ADMIN_TOKEN" not in env
    assert "worker_image" in env["PYTHONPATH"]


def test_a_missing_interpreter_is_the_backend_unavailable(tmp_path: Path) -> None:
    processes = backend(tmp_path, str(tmp_path / "no-python"))
    with pytest.raises(BackendUnavailable, match="WANWU_WORKER_PYTHON"):
        processes.ping()
    ok, detail = processes.readiness()["worker_python"]
    assert not ok and "no-python" in detail


def test_an_interpreter_without_torch_is_not_ready(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "echo \"ModuleNotFoundError: No module named 'torch'\" >&2; exit 1")
    ok, detail = backend(tmp_path, python).readiness()["worker_python"]
    assert not ok and "No module named 'torch'" in detail


def test_the_backend_is_chosen_by_a_setting() -> None:
    from scheduler.backends.docker import DockerBackend

    assert isinstance(build_backend(Settings(backend="docker")), DockerBackend)
    with pytest.raises(ConfigError, match="WANWU_WORKER_MEMORY='plenty'"):
        build_backend(Settings(backend="process", worker_memory="plenty"))
    with pytest.raises(ConfigError, match="WANWU_BACKEND='lxc': must be one of docker, process"):
        Settings.load(environ={"WANWU_BACKEND": "lxc"})


def test_doctor_checks_what_the_process_backend_needs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from gateway.doctor import run_checks

    monkeypatch.setenv("WANWU_BACKEND", "process")
    monkeypatch.setenv("WANWU_SOCKET_DIR", str(tmp_path / "s"))
    monkeypatch.setenv("WANWU_MODELS_DIR", str(tmp_path / "models"))
    # Workers as the test's user: under root they would be uid 10001, which cannot read a
    # tmp_path (nor, here, an interpreter under /root); that is test_process_user.py's.
    monkeypatch.setenv("WANWU_WORKER_USER", "gateway")
    checks = {check.name: check for check in run_checks()}
    assert "docker engine" not in checks
    assert checks["backend"].detail == "process"
    assert checks["worker python"].ok and "torch 2.13.0" in checks["worker python"].detail
    assert checks["worker limits"].ok
    assert checks["models"].ok and "trains it" in checks["models"].detail
    assert os.listdir(tmp_path / "s") == [] or not (tmp_path / "s" / "wanwu").exists()


def test_a_worker_given_a_gpu_it_cannot_use_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import torch
    from wanwu_worker.predictor import choose_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as a CPU build of torch says
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert choose_device().type == "cpu"
    assert "GPU 0 was given to this worker but torch" in caplog.text
    caplog.clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert choose_device().type == "cpu" and caplog.text == ""


def test_a_worker_killed_by_a_nameless_signal_is_reported_not_a_crash_of_the_backend(tmp_path: Path) -> None:
    python = fake_python(tmp_path, "kill -40 $$")  # a real-time signal: no name in signal.Signals
    with pytest.raises(WorkerStartError, match="was killed by signal 40 while starting"):
        backend(tmp_path, python).spawn(SpawnRequest("w1", "m", tmp_path))


def test_a_relative_interpreter_path_still_starts_workers_in_their_own_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_python(tmp_path, 'echo "started as $0" >&2; exit 4')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkerStartError, match=r"exited with status 4 (.|\n)*started as /"):
        backend(tmp_path, "./python").spawn(SpawnRequest("w1", "m", tmp_path))
