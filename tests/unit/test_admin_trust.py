"""Trusting the admin path: the state file written durably, the CLI's token never in
argv, short tokens refused at start, token guessing slowed per client, the admin token
as a Docker secret in the swarm stack, and the worker network encrypted where the
kernel can."""

from __future__ import annotations

import gzip
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import docker.errors
import pytest
import yaml
from click.testing import CliRunner

from gateway.admin import Admin, AuthThrottle
from scheduler.backends.docker_swarm import SwarmBackend
from scheduler.backends.docker_swarm_network import IPSEC_KERNEL, ipsec_support, probe_ipsec
from scheduler.errors import ConfigError, WorkerStartError
from scheduler.files import _umask, write_text_whole
from scheduler.settings import Settings
from tests.unit.fakes import FakeBackend, FakeClock
from tests.unit.test_admin import AUTH, TOKEN, build

SWARM = Path(__file__).resolve().parents[2] / "deploy" / "swarm"
NO_TOKEN_ENV = {"WANWU_ADMIN_TOKEN": None, "WANWU_ADMIN_TOKEN_FILE": None}  # CliRunner: None unsets

# -- the state file ----------------------------------------------------------------


class RecordingFsync:
    """An fsync that records what it synced and what the file system looked like then."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.calls: list[tuple[str, str | None]] = []

    def __call__(self, fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        synced = Path(os.readlink(f"/proc/self/fd/{fd}"))
        seen = synced.read_text() if kind == "file" else (self.target.read_text() if self.target.exists() else None)
        self.calls.append((kind, seen))
        os.fsync(fd)


def test_the_state_file_is_synced_whole_before_the_rename_and_its_directory_after(tmp_path: Path) -> None:
    target = tmp_path / "pool.json"
    target.write_text("old\n")
    fsync = RecordingFsync(target)
    write_text_whole(target, '{"new": true}\n', fsync)
    # the data, whole, while the old file is still in place; then the directory, renamed
    assert fsync.calls == [("file", '{"new": true}\n'), ("dir", '{"new": true}\n')]
    assert target.read_text() == '{"new": true}\n' and [p.name for p in tmp_path.iterdir()] == ["pool.json"]


def test_a_persisted_change_goes_through_the_injected_fsync(tmp_path: Path) -> None:
    _, pool = build(tmp_path, FakeBackend())
    state = tmp_path / "state" / "pool.json"
    fsync = RecordingFsync(state)
    try:
        keeper = Admin(pool.settings, pool, fsync=fsync)
        keeper.change({"max_workers": 2, "persist": True}, "a test")
    finally:
        pool.shutdown(grace_s=0)
    assert [kind for kind, _ in fsync.calls] == ["file", "dir"]
    assert json.loads(fsync.calls[0][1] or "")["settings"]["max_workers"] == 2
    assert json.loads(state.read_text())["settings"]["max_workers"] == 2


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path: Path) -> None:
    target = tmp_path / "pool.json"
    target.write_text("old\n")

    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    with pytest.raises(OSError):
        write_text_whole(target, "new\n", failing)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["pool.json"]


# -- the CLI's token -----------------------------------------------------------------


@pytest.fixture
def gateway_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The CLI, talking to an app on a fake pool through the Flask test client."""
    from gateway import cli
    from gateway.cli import pool as pool_cli

    app, pool = build(tmp_path, FakeBackend())
    client = app.test_client()

    def request_json(method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        response = client.open(
            url.replace("http://gw", ""), method=method, json=kwargs.get("json"), headers=kwargs.get("headers")
        )
        return response.status_code, response.get_json()

    monkeypatch.setattr(pool_cli, "_request", request_json)
    yield cli, pool
    pool.shutdown(grace_s=0)


def test_the_cli_refuses_a_token_on_the_command_line_and_says_what_to_use(gateway_cli: Any) -> None:
    cli, pool = gateway_cli
    result = CliRunner().invoke(
        cli.cli, ["pool", "set", "--url", "http://gw", "--token", TOKEN, "--max-workers", "2"], env=NO_TOKEN_ENV
    )
    assert result.exit_code == 2, result.output
    assert "WANWU_ADMIN_TOKEN" in result.output and "--token-file" in result.output
    assert TOKEN not in result.output and pool.settings.max_workers == 3
    assert "--token " not in CliRunner().invoke(cli.cli, ["pool", "set", "--help"]).output  # hidden


def test_the_cli_reads_the_token_from_a_file_stripped(gateway_cli: Any, tmp_path: Path) -> None:
    cli, pool = gateway_cli
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    result = CliRunner().invoke(
        cli.cli,
        ["pool", "set", "--url", "http://gw", "--token-file", str(secret), "--max-workers", "2"],
        env={**NO_TOKEN_ENV, "WANWU_ADMIN_TOKEN": "not-this-one"},  # the file wins
    )
    assert result.exit_code == 0, result.output
    assert pool.settings.max_workers == 2


def test_the_cli_reads_the_token_file_named_in_the_environment(gateway_cli: Any, tmp_path: Path) -> None:
    cli, pool = gateway_cli
    secret = tmp_path / "token"
    secret.write_text(TOKEN)
    env = {**NO_TOKEN_ENV, "WANWU_ADMIN_TOKEN_FILE": str(secret)}
    result = CliRunner().invoke(cli.cli, ["pool", "set", "--url", "http://gw", "--max-workers", "1"], env=env)
    assert result.exit_code == 0, result.output
    assert pool.settings.max_workers == 1


@pytest.mark.parametrize(
    ("args", "content", "says"),
    [
        ([], None, "WANWU_ADMIN_TOKEN or in a file named by --token-file"),
        (["--token-file", "{dir}/missing"], None, "cannot read"),
        (["--token-file", "{dir}/token"], "\n", "is empty"),
    ],
)
def test_the_cli_without_a_usable_token_says_where_to_put_one(
    gateway_cli: Any, tmp_path: Path, args: list[str], content: str | None, says: str
) -> None:
    cli, pool = gateway_cli
    if content is not None:
        (tmp_path / "token").write_text(content)
    argv = ["pool", "set", "--url", "http://gw", "--max-workers", "2", *(a.format(dir=tmp_path) for a in args)]
    result = CliRunner().invoke(cli.cli, argv, env=NO_TOKEN_ENV)
    assert result.exit_code == 2 and says in result.output, result.output
    assert pool.settings.max_workers == 3


# -- short tokens ----------------------------------------------------------------------


@pytest.mark.parametrize("token", ["x" * 15, "万物识别万", "s3cret-t0ken"])  # 15, 15 and 12 bytes
def test_a_token_under_16_bytes_is_refused_at_start_by_key_and_length_never_value(token: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.load(environ={"WANWU_ADMIN_TOKEN": token})
    message = str(caught.value)
    size = len(token.encode())
    assert message.startswith("WANWU_ADMIN_TOKEN: ") and f"{size} bytes" in message and "16" in message
    assert token not in message


@pytest.mark.parametrize("token", ["", "x" * 16, "万物识别万物"])  # none (admin off), 16 and 18 bytes
def test_no_token_or_one_of_16_bytes_or_more_is_accepted(token: str) -> None:
    assert Settings.load(environ={"WANWU_ADMIN_TOKEN": token}).admin_token == token


def test_a_short_token_from_a_config_file_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "wanwu.toml"
    config.write_text('admin_token = "t1ny-t0k3n"\n')
    with pytest.raises(ConfigError, match=r"wanwu\.toml: admin_token: the admin token is 10 bytes") as caught:
        Settings.load(environ={}, config_file=config)
    assert "t1ny-t0k3n" not in str(caught.value)


# -- token guessing --------------------------------------------------------------------


def test_the_throttle_holds_a_client_off_after_free_failures_doubling_up_to_a_cap() -> None:
    clock = FakeClock()
    throttle = AuthThrottle(clock.now, free=3, first_delay_s=1, max_delay_s=8, forget_s=100)
    assert [throttle.failed("a") for _ in range(3)] == [0, 0, 1]  # the third is the first held off
    assert throttle.wait_s("a") == 1 and throttle.wait_s("b") == 0
    clock.advance(1)
    assert throttle.wait_s("a") == 0
    assert [throttle.failed("a") for _ in range(4)] == [2, 4, 8, 8]
    clock.advance(5)
    assert throttle.wait_s("a") == 3
    throttle.succeeded("a")
    assert throttle.wait_s("a") == 0 and throttle.failed("a") == 0  # counted from scratch


def test_the_throttle_forgets_a_client_and_remembers_a_bounded_number() -> None:
    clock = FakeClock()
    throttle = AuthThrottle(clock.now, free=1, first_delay_s=1, max_delay_s=10, forget_s=30, max_clients=3)
    throttle.failed("a")
    clock.advance(31)
    assert throttle.failed("a") == 1  # the first failure was forgotten: this one is the first again
    for client in ("b", "c", "d", "e"):
        throttle.failed(client)
    assert len(throttle._failed) == 3
    with pytest.raises(ValueError, match="forget_s"):
        AuthThrottle(clock.now, max_delay_s=60, forget_s=10)


def test_repeated_wrong_tokens_from_one_address_get_429_without_the_token_being_checked(tmp_path: Path) -> None:
    app, pool = build(tmp_path, FakeBackend())
    clock: FakeClock = pool.clock  # type: ignore[assignment]
    guesser = app.test_client()
    guesser.environ_base["REMOTE_ADDR"] = "192.0.2.7"
    operator = app.test_client()
    operator.environ_base["REMOTE_ADDR"] = "198.51.100.1"
    wrong = {"Authorization": "Bearer wrong-guess-0000000000"}
    try:
        codes = [guesser.patch("/v1/pool/settings", json={"max_workers": 1}, headers=wrong).status_code]
        codes += [guesser.patch("/v1/pool/settings", json={"max_workers": 1}, headers=wrong).status_code]
        assert codes == [401, 401]
        for _ in range(3):
            assert guesser.patch("/v1/pool/settings", json={"max_workers": 1}, headers=wrong).status_code == 401
        held = guesser.patch("/v1/pool/settings", json={"max_workers": 1}, headers=AUTH)  # right, but held off
        assert held.status_code == 429 and held.headers["Retry-After"] == "1"
        error = held.get_json()["error"]
        assert error["code"] == "too_many_requests" and "192.0.2.7" in error["message"]
        assert pool.settings.max_workers == 3
        # another address is not held off
        assert operator.patch("/v1/pool/settings", json={"max_workers": 2}, headers=AUTH).status_code == 200
        clock.advance(1)
        assert guesser.patch("/v1/pool/settings", json={"max_workers": 1}, headers=wrong).status_code == 401
        again = guesser.patch("/v1/pool/settings", json={"max_workers": 1}, headers=AUTH)
        assert again.status_code == 429 and again.headers["Retry-After"] == "2"  # doubled
        clock.advance(2)
        assert guesser.patch("/v1/pool/settings", json={"max_workers": 1}, headers=AUTH).status_code == 200
        assert guesser.patch("/v1/pool/settings", json={"max_workers": 1}, headers=wrong).status_code == 401
    finally:
        pool.shutdown(grace_s=0)


def test_an_untrusted_peer_cannot_escape_the_throttle_with_x_forwarded_for(tmp_path: Path) -> None:
    app, pool = build(tmp_path, FakeBackend())
    client = app.test_client()
    try:
        for n in range(6):
            headers = {"Authorization": "Bearer wrong-guess-0000000000", "X-Forwarded-For": f"203.0.113.{n}"}
            response = client.patch("/v1/pool/settings", json={"max_workers": 1}, headers=headers)
        assert response.status_code == 429  # all of them counted against the peer, 127.0.0.1
    finally:
        pool.shutdown(grace_s=0)


# -- the admin token as a Docker secret -------------------------------------------------------


def test_the_admin_token_is_read_from_a_file_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "admin-token"
    secret.write_text(TOKEN + "\n")
    settings = Settings.load(environ={"WANWU_ADMIN_TOKEN_FILE": str(secret)})
    assert settings.admin_token == TOKEN and TOKEN not in repr(settings)


@pytest.mark.parametrize(
    ("content", "env", "says"),
    [
        (TOKEN, {"WANWU_ADMIN_TOKEN": TOKEN}, "WANWU_ADMIN_TOKEN and WANWU_ADMIN_TOKEN_FILE are both set"),
        (None, {}, "WANWU_ADMIN_TOKEN_FILE='{path}': cannot read it"),
        ("\n", {}, "WANWU_ADMIN_TOKEN_FILE='{path}': the file is empty"),
        ("short-token\n", {}, "WANWU_ADMIN_TOKEN_FILE ({path}): the admin token is 11 bytes"),
    ],
)
def test_a_bad_admin_token_file_stops_start_naming_key_and_path_not_content(
    tmp_path: Path, content: str | None, env: dict[str, str], says: str
) -> None:
    secret = tmp_path / "admin-token"
    if content is not None:
        secret.write_text(content)
    with pytest.raises(ConfigError) as caught:
        Settings.load(environ={**env, "WANWU_ADMIN_TOKEN_FILE": str(secret)})
    message = str(caught.value)
    assert says.format(path=secret) in message
    assert TOKEN not in message and "short-token" not in message


def test_the_stack_gives_the_gateway_the_admin_token_as_a_docker_secret() -> None:
    stack = yaml.safe_load((SWARM / "stack.yml").read_text())
    gateway = stack["services"]["gateway"]
    assert "WANWU_ADMIN_TOKEN" not in gateway["environment"]  # it would show in `docker service inspect`
    (mount,) = [s for s in gateway["secrets"] if s["source"] == "admin_token"]
    assert gateway["environment"]["WANWU_ADMIN_TOKEN_FILE"] == f"/run/secrets/{mount['target']}"
    assert mount["mode"] == 0o400
    assert stack["secrets"]["admin_token"] == {
        "name": "${WANWU_ADMIN_TOKEN_SECRET:-wanwu-admin-token}",
        "external": True,
    }


# -- the worker network, encrypted where the kernel can -------------------------------------


def test_encrypted_yml_is_the_stacks_worker_network_with_the_encrypted_option() -> None:
    plain = yaml.safe_load((SWARM / "stack.yml").read_text())["networks"]["workers"]
    over = yaml.safe_load((SWARM / "encrypted.yml").read_text())["networks"]
    # `docker stack deploy -c stack.yml -c encrypted.yml` replaces a network as a whole
    assert set(over) == {"workers"}
    assert over["workers"] == {**plain, "driver_opts": {"encrypted": ""}}
    assert "driver_opts" not in plain  # where the kernel cannot, the stack alone stays unencrypted


CONFIG_ALL = "".join(f"{option}=y\n" for option in IPSEC_KERNEL)


@pytest.mark.parametrize(
    ("config", "modules", "able", "says"),
    [
        (CONFIG_ALL, (), True, "built with"),
        (CONFIG_ALL.replace("CONFIG_INET_ESP=y", "CONFIG_INET_ESP=m"), (), True, "built with"),
        (CONFIG_ALL.replace("CONFIG_INET_ESP=y", "# CONFIG_INET_ESP is not set"), (), False, "CONFIG_INET_ESP"),
        (None, set(IPSEC_KERNEL.values()), True, "esp4"),
        (None, {"xfrm_user"}, False, "esp4"),
        (None, (), False, "no kernel configuration"),
    ],
)
def test_ipsec_support_from_the_kernel_configuration_or_its_modules(
    config: str | None, modules: Any, able: bool, says: str
) -> None:
    found, why = ipsec_support(config, modules)
    assert found is able and says in why


def test_probe_ipsec_reads_proc_config_gz_then_boot_then_modules(tmp_path: Path) -> None:
    assert probe_ipsec(tmp_path, "6.1.0")[0] is False  # nothing to read
    lib = tmp_path / "lib" / "modules" / "6.1.0"
    lib.mkdir(parents=True)
    (lib / "modules.builtin").write_text("kernel/net/xfrm/xfrm_user.ko\nkernel/crypto/gcm.ko\n")
    (lib / "modules.dep").write_text("kernel/net/ipv4/esp4.ko: kernel/net/xfrm/xfrm_algo.ko\n")
    (tmp_path / "sys" / "module" / "xt_policy").mkdir(parents=True)
    assert probe_ipsec(tmp_path, "6.1.0")[0] is True
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "config-6.1.0").write_text("CONFIG_XFRM_USER=y\n")  # the configuration wins
    found, why = probe_ipsec(tmp_path, "6.1.0")
    assert found is False and "CONFIG_INET_ESP" in why
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "config.gz").write_bytes(gzip.compress(CONFIG_ALL.encode()))
    assert probe_ipsec(tmp_path, "6.1.0")[0] is True  # /proc/config.gz before /boot


def swarm_backend(network: dict[str, Any] | None, able: bool) -> tuple[SwarmBackend, MagicMock]:
    client = MagicMock()
    if network is None:
        client.api.inspect_network.side_effect = docker.errors.NotFound("no such network")
    else:
        client.api.inspect_network.return_value = network
    why = "the kernel is built with them" if able else "the kernel is built without CONFIG_INET_ESP"
    return SwarmBackend("img", "p", "wanwu-workers", client=client, ipsec=lambda: (able, why)), client


OVERLAY = {"Id": "n1", "Driver": "overlay", "Scope": "swarm", "Internal": True}


def test_an_unencrypted_worker_network_is_used_with_a_warning_saying_why(caplog: pytest.LogCaptureFixture) -> None:
    backend, client = swarm_backend(
        {**OVERLAY, "Options": {"com.docker.network.driver.overlay.vxlanid_list": "4097"}}, False
    )
    with caplog.at_level(logging.WARNING, "scheduler.backends.docker_swarm"):
        assert backend._network() == "n1"
    client.api.inspect_network.assert_called_once_with("wanwu-workers")
    assert "not encrypted" in caplog.text and "CONFIG_INET_ESP" in caplog.text


def test_an_unencrypted_network_where_the_kernel_could_says_how_to_encrypt(caplog: pytest.LogCaptureFixture) -> None:
    backend, _ = swarm_backend({**OVERLAY, "Options": None}, True)
    with caplog.at_level(logging.WARNING, "scheduler.backends.docker_swarm"):
        backend._network()
    assert "-c deploy/swarm/encrypted.yml" in caplog.text


def test_an_encrypted_worker_network_is_used_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    backend, _ = swarm_backend({**OVERLAY, "Options": {"encrypted": ""}}, True)
    with caplog.at_level(logging.WARNING, "scheduler.backends.docker_swarm"):
        assert backend._network() == "n1"
    assert "encrypted" not in caplog.text


@pytest.mark.parametrize(
    ("able", "command"), [(True, "--internal --opt encrypted wanwu-workers"), (False, "--internal wanwu-workers")]
)
def test_a_missing_worker_network_says_how_to_create_it_encrypted_where_the_kernel_can(
    able: bool, command: str
) -> None:
    backend, _ = swarm_backend(None, able)
    with pytest.raises(WorkerStartError, match=command):
        backend._network()


def test_writers_never_share_a_temporary_file_and_the_result_has_the_usual_mode(tmp_path: Path) -> None:
    import threading

    target = tmp_path / "state.json"
    texts = [str(i) * 200_000 for i in range(8)]
    errors: list[BaseException] = []

    def write(text: str) -> None:
        try:
            write_text_whole(target, text)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(text,)) for text in texts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and target.read_text() in texts  # one writer's text, whole
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary left
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # as open() makes it, not mkstemp's 0600
