"""Where the gateway keeps worker sockets, and what a worker's uid may reach: real
directories (the tests run as root, so they can hand one to another uid)."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from unittest.mock import MagicMock

import pytest

from scheduler.backends.base import (
    WORKER_UID,
    access_problem,
    ancestor_problem,
    prepare_private_dir,
    private_dir_problem,
    writable_path,
)
from scheduler.backends.docker import DockerBackend
from scheduler.backends.docker_container import WorkerSpec, container_user, prepare_socket_dir, run_options
from scheduler.errors import BackendUnavailable
from scheduler.settings import _default_socket_root
from tests.workerprocs import open_directory

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="hands directories to other uids")
OTHER = 4242  # a uid that is neither the test's nor the workers'


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user may search (tmp_path is under a 0700 directory of root's)."""
    path = open_directory("wanwu-dirs-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_missing_socket_directory_is_made_private(tmp_path: Path) -> None:
    prepare_private_dir(tmp_path / "sockets" / "pool")
    assert mode(tmp_path / "sockets" / "pool") == 0o700
    prepare_private_dir(tmp_path / "open", 0o711)  # the process backend's, for workers as uid 10001
    assert mode(tmp_path / "open") == 0o711


def test_a_named_socket_root_keeps_its_mode_and_a_pool_directory_of_ours_is_closed(tmp_path: Path) -> None:
    """WANWU_SOCKET_DIR may name a shared directory such as /run: it is checked, never
    changed. The pool's own directory in it is set to the mode asked for."""
    (tmp_path / "s").mkdir(mode=0o755)
    (tmp_path / "s").chmod(0o755)
    prepare_private_dir(tmp_path / "s")
    assert mode(tmp_path / "s") == 0o755
    (tmp_path / "s" / "pool").mkdir(mode=0o755)
    (tmp_path / "s" / "pool").chmod(0o755)
    prepare_private_dir(tmp_path / "s" / "pool", adjust=True)
    assert mode(tmp_path / "s" / "pool") == 0o700
    prepare_private_dir(tmp_path / "new", 0o711)
    assert mode(tmp_path / "new") == 0o711  # made here: the umask does not decide


def test_a_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "s").chmod(0o777)
    with pytest.raises(BackendUnavailable, match=r"socket directory .*/s is writable by others \(mode 0777\)"):
        prepare_private_dir(tmp_path / "s")
    assert mode(tmp_path / "s") == 0o777  # refused, not repaired: someone may have put things in it


def test_a_link_is_refused_even_to_a_directory_of_ours(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "s").symlink_to(tmp_path / "real")
    with pytest.raises(BackendUnavailable, match=r"/s is a symbolic link"):
        prepare_private_dir(tmp_path / "s")


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("")
    with pytest.raises(BackendUnavailable, match=r"/s is not a directory"):
        prepare_private_dir(tmp_path / "s")


@root_only
def test_a_directory_another_user_made_is_refused(tmp_path: Path) -> None:
    """/tmp/wanwu-<uid> is a name anyone can guess and make first."""
    (tmp_path / "s").mkdir(mode=0o700)
    os.chown(tmp_path / "s", OTHER, OTHER)
    with pytest.raises(BackendUnavailable, match=rf"/s is owned by uid {OTHER}, not by this gateway's uid 0"):
        prepare_private_dir(tmp_path / "s")


@root_only
def test_a_directory_under_another_users_is_refused(tmp_path: Path) -> None:
    (tmp_path / "theirs").mkdir(mode=0o755)
    os.chown(tmp_path / "theirs", OTHER, OTHER)
    with pytest.raises(BackendUnavailable, match=rf"is under .*/theirs, which is owned by uid {OTHER}"):
        prepare_private_dir(tmp_path / "theirs" / "s")


def test_a_parent_anyone_may_write_is_refused_unless_sticky(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    with pytest.raises(BackendUnavailable, match=r"writable by others without the sticky bit \(mode 0777\)"):
        prepare_private_dir(tmp_path / "open" / "s")
    (tmp_path / "open").chmod(0o1777)  # as /tmp: nobody may rename or remove what is ours
    prepare_private_dir(tmp_path / "open" / "s")
    assert mode(tmp_path / "open" / "s") == 0o700


def test_the_checks_are_plain_functions_of_a_stat(tmp_path: Path) -> None:
    assert private_dir_problem(os.lstat(tmp_path), os.geteuid()) is None
    assert private_dir_problem(os.lstat(tmp_path), os.geteuid() + 1) is not None
    assert ancestor_problem(os.stat("/tmp"), os.geteuid()) is None  # sticky


def test_the_default_is_run_wanwu_for_root_else_a_place_the_user_owns(tmp_path: Path) -> None:
    assert _default_socket_root(0, {"XDG_RUNTIME_DIR": str(tmp_path)}) == Path("/run/wanwu")
    assert _default_socket_root(1000, {}) == Path("/tmp/wanwu-1000")  # checked (above) when made
    assert _default_socket_root(1000, {"XDG_RUNTIME_DIR": "relative"}) == Path("/tmp/wanwu-1000")
    # Another user's runtime directory (set by mistake, or by someone else) is not used.
    assert _default_socket_root(OTHER, {"XDG_RUNTIME_DIR": str(tmp_path)}) == Path(f"/tmp/wanwu-{OTHER}")


@root_only
def test_a_runtime_directory_of_the_users_own_is_used(tmp_path: Path) -> None:
    runtime = tmp_path / "run-user-1000"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, 1000, 1000)
    assert _default_socket_root(1000, {"XDG_RUNTIME_DIR": str(runtime)}) == runtime / "wanwu"


# -- Docker workers' directories -----------------------------------------------------


def test_a_container_runs_as_10001_under_root_else_as_the_gateways_user() -> None:
    assert container_user(0, 0) == f"{WORKER_UID}:{WORKER_UID}"
    assert container_user(1000, 1000) == "1000:1000"  # the only other user its 0700 directory lets in


@root_only
def test_a_docker_workers_directory_is_its_users_alone(tmp_path: Path) -> None:
    prepare_socket_dir(tmp_path / "w1")
    info = os.lstat(tmp_path / "w1")
    assert (info.st_uid, info.st_gid, mode(tmp_path / "w1")) == (WORKER_UID, WORKER_UID, 0o700)
    # A non-root gateway's: its own, 0700 (it was 0777 with the socket 0666).
    prepare_socket_dir(tmp_path / "w2", "1000:1000")
    info = os.lstat(tmp_path / "w2")
    assert (info.st_uid, info.st_gid, mode(tmp_path / "w2")) == (1000, 1000, 0o700)


def test_a_leftover_directory_is_replaced_not_reused(tmp_path: Path) -> None:
    (tmp_path / "w1").mkdir()
    (tmp_path / "w1").chmod(0o777)
    (tmp_path / "w1" / "worker.sock").write_text("stale")
    prepare_socket_dir(tmp_path / "w1", f"{os.geteuid()}:{os.getegid()}")
    assert mode(tmp_path / "w1") == 0o700 and list((tmp_path / "w1").iterdir()) == []


def test_the_container_runs_as_the_user_its_directory_was_given_to(tmp_path: Path) -> None:
    spec = WorkerSpec("img", "p", "m", "w1", tmp_path / "m", tmp_path / "w1", user="1000:1000")
    assert run_options(spec)["user"] == "1000:1000"
    assert WorkerSpec("img", "p", "m", "w1", tmp_path, tmp_path).user == container_user()


@root_only
def test_the_docker_backend_will_not_start_over_another_users_socket_directory(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir(mode=0o700)
    os.chown(tmp_path / "s", OTHER, OTHER)
    client = MagicMock()
    with pytest.raises(BackendUnavailable, match=rf"/s is owned by uid {OTHER}"):
        DockerBackend("img", "pool", tmp_path / "s", client=client).ping()
    client.ping.assert_not_called()


# -- what a worker's uid may reach -----------------------------------------------------


def test_a_closed_directory_on_the_way_is_named(tmp_path: Path, shared: Path) -> None:
    (shared / "bundle").mkdir(mode=0o755)
    assert access_problem(shared / "bundle", WORKER_UID, WORKER_UID) is None
    closed = shared / "closed"
    (closed / "bundle").mkdir(parents=True)
    closed.chmod(0o700)
    problem = access_problem(closed / "bundle", WORKER_UID, WORKER_UID)
    assert problem == f"{closed} (mode 0700, owner uid {os.geteuid()}) is not searchable by uid {WORKER_UID}"
    (shared / "secret").write_text("")
    (shared / "secret").chmod(0o600)
    assert "does not give uid 10001 r-x" in str(access_problem(shared / "secret", WORKER_UID, WORKER_UID))
    assert access_problem(closed / "bundle", 0, 0) is None  # root reads anything


def test_a_link_is_checked_where_it_leads(shared: Path) -> None:
    closed = shared / "closed"
    (closed / "python").mkdir(parents=True)
    closed.chmod(0o700)
    (shared / "python").symlink_to(closed / "python")
    assert f"{closed} (mode 0700" in str(access_problem(shared / "python", WORKER_UID, WORKER_UID))


@root_only
def test_what_a_worker_could_change_in_a_bundle_is_found(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir(mode=0o755)
    (bundle / "model.pt").write_text("")
    (bundle / "model.pt").chmod(0o644)
    (bundle / "link").symlink_to("/etc/passwd")  # a link's own mode means nothing
    assert writable_path(bundle, WORKER_UID, WORKER_UID) is None
    os.chown(bundle / "model.pt", WORKER_UID, WORKER_UID)  # its owner may write it
    assert writable_path(bundle, WORKER_UID, WORKER_UID) == bundle / "model.pt"
    os.chown(bundle / "model.pt", 0, 0)
    bundle.chmod(0o777)  # anyone may replace what is in it
    assert writable_path(bundle, WORKER_UID, WORKER_UID) == bundle
