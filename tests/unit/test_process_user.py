"""Who a process worker runs as, and what it is given: under a root gateway, uid 10001
with a clean environment, its own directory, and bundles it can read but not change.
Real child processes (fake interpreters: sh scripts), no model."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from scheduler.backends.base import WORKER_UID, SpawnRequest
from scheduler.backends.limits import Cgroups, ProcessLimits
from scheduler.backends.process import ProcessBackend
from scheduler.backends.process_user import default_worker_uid, kept_environment, parse_worker_user
from scheduler.errors import BackendUnavailable, ConfigError, WorkerStartError
from tests.workerprocs import open_directory, worker_processes

as_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="workers change user only under root, with setpriv"
)


def test_a_root_gateway_runs_workers_as_10001_and_any_other_as_itself() -> None:
    assert default_worker_uid(0) == WORKER_UID
    assert default_worker_uid(1000) == 1000


def test_worker_user_is_a_uid_gateway_or_nothing() -> None:
    assert parse_worker_user("") is None
    assert parse_worker_user("gateway") == os.geteuid()
    assert parse_worker_user(" 10002 ") == 10002
    with pytest.raises(ConfigError, match="WANWU_WORKER_USER='nobody': expected a uid, gateway, or nothing"):
        parse_worker_user("nobody")


def test_a_worker_keeps_only_paths_locale_and_gpu_knobs_of_the_gateways_environment() -> None:
    gateway = {
        "PATH": "/usr/bin",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": "/opt/extra",
        "CUDA_VISIBLE_DEVICES": "0",
        "LD_LIBRARY_PATH": "/usr/local/cuda/lib64",
        "WANWU_ADMIN_TOKEN": "the-admin-token-of-the-gateway",
        "AWS_SECRET_ACCESS_KEY": "x",
        "DOCKER_HOST": "unix:///var/run/docker.sock",
        "HTTPS_PROXY": "http://user:pass@proxy",
    }
    kept = ["CUDA_VISIBLE_DEVICES", "LC_ALL", "LD_LIBRARY_PATH", "PATH", "PYTHONPATH"]
    assert sorted(kept_environment(gateway)) == kept


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory uid 10001 may search, holding a fake interpreter, a bundle, and a
    directory the fake worker may write what it found into."""
    path = open_directory("wanwu-user-")
    (path / "models" / "m").mkdir(parents=True)
    (path / "models" / "m" / "model.json").write_text("{}")
    (path / "out").mkdir()
    os.chown(path / "out", WORKER_UID, WORKER_UID)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def fake_python(where: Path, body: str) -> str:
    script = where / "python"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return str(script)


def backend(where: Path, python: str, **options: object) -> ProcessBackend:
    own = where / "self_cgroup"
    own.write_text("0::/\n")
    cgroups = Cgroups("unit", root=where / "no-cgroups", self_cgroup=own)
    return ProcessBackend("unit", where / "sockets", python, ProcessLimits(), 5.0, cgroups=cgroups, **options)  # type: ignore[arg-type]


@as_root
def test_under_root_a_worker_runs_as_10001_with_a_clean_environment(
    shared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANWU_ADMIN_TOKEN", "the-admin-token-of-the-gateway")
    monkeypatch.setenv("GATEWAY_ONLY", "a credential the gateway was given")
    out = shared / "out"
    python = fake_python(
        shared,
        f"id -u > {out}/uid; id -g > {out}/gid; id -G > {out}/groups; env > {out}/env\n"
        f"grep NoNewPrivs /proc/self/status > {out}/nnp\n"
        f"cat /proc/$PPID/environ > /dev/null 2>&1 && echo read > {out}/gw || echo denied > {out}/gw\n"
        "exit 3",
    )
    processes = backend(shared, python)
    processes.ping()
    with pytest.raises(WorkerStartError, match="exited with status 3 while starting"):
        processes.spawn(SpawnRequest("w1", "m", shared / "models" / "m"))
    assert [(out / name).read_text().split() for name in ("uid", "gid", "groups")] == [["10001"]] * 3
    assert (out / "nnp").read_text().split() == ["NoNewPrivs:", "1"]
    assert (out / "gw").read_text().strip() == "denied"  # /proc/<gateway>/environ: not its own
    env = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines() if "=" in line)
    assert "WANWU_ADMIN_TOKEN" not in env and "GATEWAY_ONLY" not in env
    assert env["HOME"] == str(shared / "sockets" / "unit" / "w1")  # its own directory, not the gateway's home
    assert env["WANWU_MODEL_DIR"] == str(shared / "models" / "m")
    assert env["PYTHONNOUSERSITE"] == "1"  # no usercustomize.py from a HOME others may write


@as_root
def test_a_workers_directory_is_its_own_and_the_gateways_files_are_out_of_its_reach(shared: Path) -> None:
    out, pool = shared / "out", shared / "sockets" / "unit"
    python = fake_python(
        shared,
        f"stat -c '%u %a' . > {out}/own\n"
        f"ls .. > /dev/null 2>&1 && echo listed > {out}/pool || echo denied > {out}/pool\n"
        f"echo '{{}}' > ../w1.json 2> /dev/null && echo wrote > {out}/record || echo denied > {out}/record\n"
        "exit 3",
    )
    with pytest.raises(WorkerStartError, match="exited with status 3"):
        backend(shared, python).spawn(SpawnRequest("w1", "m", shared / "models" / "m"))
    assert (out / "own").read_text().split() == [str(WORKER_UID), "700"]
    assert (out / "pool").read_text().strip() == "denied"  # the pool's directory: 0711, root's
    assert (out / "record").read_text().strip() == "denied"  # records and logs live there
    assert oct(pool.stat().st_mode & 0o777) == "0o711" and list(pool.iterdir()) == []


@as_root
def test_a_record_inside_a_directory_a_worker_owns_is_not_believed(shared: Path) -> None:
    """Records once lived in the worker's own directory; one found there (a worker could
    have written it, naming any pid) counts only if that directory is the gateway's."""
    processes = backend(shared, fake_python(shared, "exit 1"))
    processes.ping()
    record = {"worker_id": "w9", "model": "m", "pid": 1, "start_time": 1, "boot_id": "b"}
    for name, owner in (("w8", 0), ("w9", WORKER_UID)):
        (shared / "sockets" / "unit" / name).mkdir()
        (shared / "sockets" / "unit" / name / "worker.json").write_text(json.dumps({**record, "worker_id": name}))
        os.chown(shared / "sockets" / "unit" / name, owner, owner)
    assert [w.worker_id for w in processes.list_workers()] == ["w8"]


@as_root
@pytest.mark.parametrize("opening", ["bundle", "file", "models"])
def test_a_worker_that_could_change_a_bundle_is_not_started(shared: Path, opening: str) -> None:
    models = shared / "models"
    target = {"bundle": models / "m", "file": models / "m" / "model.json", "models": models}[opening]
    target.chmod(0o777 if target.is_dir() else 0o666)
    python = fake_python(shared, f"touch {shared}/out/started; exit 1")
    with pytest.raises(WorkerStartError, match=rf"uid 10001 \(the workers' user\) could change {target}: .*read-only"):
        backend(shared, python).spawn(SpawnRequest("w1", "m", models / "m"))
    assert not (shared / "out" / "started").exists() and worker_processes("unit") == []


@as_root
def test_a_bundle_10001_cannot_read_is_named(shared: Path) -> None:
    (shared / "models").chmod(0o700)
    with pytest.raises(WorkerStartError, match=rf"cannot read its bundle: {shared}/models \(mode 0700"):
        backend(shared, fake_python(shared, "exit 1")).spawn(SpawnRequest("w1", "m", shared / "models" / "m"))
    processes = backend(shared, fake_python(shared, "exit 1"))
    assert "stem cells (uid 10001) cannot read the models directory" in str(processes.stem_problem(shared / "models"))


@as_root
def test_an_interpreter_10001_cannot_run_is_refused_at_start_naming_where(shared: Path, tmp_path: Path) -> None:
    python = fake_python(tmp_path, "exit 0")  # pytest's tmp_path: under a 0700 directory of root's
    processes = backend(shared, python)
    closed = next(p for p in reversed(tmp_path.parents) if p.stat().st_mode & 0o001 == 0)
    with pytest.raises(BackendUnavailable, match=rf"cannot run the worker interpreter {python} .*: {closed} \(mode"):
        processes.ping()
    ok, detail = processes.readiness()["worker_python"]
    assert not ok and "cannot run the worker interpreter" in detail
    ok, detail = processes.readiness()["worker_user"]
    assert not ok and str(closed) in detail


@as_root
def test_workers_as_the_gateway_itself_when_told(shared: Path) -> None:
    out = shared / "out"
    python = fake_python(shared, f"id -u > {out}/uid; exit 3")
    processes = backend(shared, python, worker_uid=0)
    assert processes.readiness()["worker_user"] == (
        True,
        "workers run as the gateway's own user (uid 0): not separated from it",
    )
    with pytest.raises(WorkerStartError, match="exited with status 3"):
        processes.spawn(SpawnRequest("w1", "m", shared / "models" / "m"))
    assert (out / "uid").read_text().strip() == "0"


@as_root
def test_an_interpreter_workers_could_change_is_refused(shared: Path) -> None:
    """A root gateway runs the same interpreter and worker package: one its workers could
    rewrite would run their code as root."""
    bin_dir = shared / "bin"
    bin_dir.mkdir()
    python = fake_python(bin_dir, "exit 3")
    bin_dir.chmod(0o777)
    with pytest.raises(BackendUnavailable, match=rf"uid {WORKER_UID} .* could change {bin_dir}, which a root gateway"):
        backend(shared, python).ping()
