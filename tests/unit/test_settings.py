"""Settings: defaults < TOML file < environment < flags, validated with names."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.errors import ConfigError
from scheduler.settings import Settings


def test_defaults_match_the_design() -> None:
    s = Settings.load(environ={})
    assert (s.max_workers, s.idle_ttl_s, s.gpu_high_watermark, s.gpu_low_watermark) == (2, 30.0, 0.90, 0.80)
    assert (s.max_upload_mb, s.default_model, s.gpus, s.worker_image) == (20.0, "general", (), "wanwu-worker:cpu")
    assert s.keepalive == "adaptive"  # it beat fixed TTLs on both traces we have (README, Tuning)


def test_sources_apply_in_order(tmp_path: Path) -> None:
    config = tmp_path / "wanwu.toml"
    config.write_text('[wanwu]\nmax_workers = 3\nidle_ttl_s = 12.5\npool_id = "from-file"\n')
    env = {"WANWU_CONFIG": str(config), "WANWU_IDLE_TTL_S": "7", "WANWU_GPUS": "0, 1"}
    s = Settings.load(environ=env, flags={"pool_id": "from-flag", "max_workers": None})
    assert s.max_workers == 3  # file (flag unset)
    assert s.idle_ttl_s == 7.0  # environment beats file
    assert s.pool_id == "from-flag"  # flag beats both
    assert s.gpus == ("0", "1")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WANWU_IDLE_TTL_S": "-5"}, "WANWU_IDLE_TTL_S='-5': must be > 0"),
        ({"WANWU_MAX_WORKERS": "two"}, "WANWU_MAX_WORKERS='two': expected an integer"),
        ({"WANWU_MAX_WORKERS": "0"}, "WANWU_MAX_WORKERS='0': must be > 0"),
        ({"WANWU_GPU_HIGH_WATERMARK": "1.5"}, "WANWU_GPU_HIGH_WATERMARK='1.5': must be at most 1"),
        ({"WANWU_GPU_LOW_WATERMARK": "0.95"}, "WANWU_GPU_LOW_WATERMARK='0.95': must be below gpu_high_watermark (0.9)"),
        ({"WANWU_GPUS": "first"}, "WANWU_GPUS='first': expected device indexes or UUIDs"),
        ({"WANWU_POOL_ID": "a b"}, "WANWU_POOL_ID='a b': must be 1-32 letters"),
        ({"WANWU_CACHE_ENABLED": "maybe"}, "WANWU_CACHE_ENABLED='maybe': expected true or false"),
        ({"WANWU_QUEUE_TIMEOUT_S": "inf"}, "WANWU_QUEUE_TIMEOUT_S='inf': expected a finite number"),
        ({"WANWU_KEEPALIVE": "lru"}, "WANWU_KEEPALIVE='lru': must be one of fixed, adaptive"),
    ],
)
def test_bad_values_name_key_and_value(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.load(environ=env)
    assert str(caught.value).startswith(message)


def test_bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--idle-ttl-s=-1: must be > 0"):
        Settings.load(environ={}, flags={"idle_ttl_s": -1})


def test_file_errors_name_the_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("max_workers = -1\n")
    with pytest.raises(ConfigError, match=r"c\.toml: max_workers=-1: must be > 0"):
        Settings.load(environ={}, config_file=config)
    config.write_text("max_wrokers = 3\n")
    with pytest.raises(ConfigError, match="unknown settings max_wrokers"):
        Settings.load(environ={}, config_file=config)
    config.write_text("max_workers = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Settings.load(environ={}, config_file=config)
    with pytest.raises(ConfigError, match="config file not found"):
        Settings.load(environ={}, config_file=tmp_path / "missing.toml")


def test_settings_are_frozen() -> None:
    s = Settings.load(environ={})
    with pytest.raises(AttributeError):
        s.max_workers = 5  # type: ignore[misc]
    assert s.replace(max_workers=5).max_workers == 5 and s.max_workers == 2


def test_nothing_is_read_at_import_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANWU_MAX_WORKERS", "7")
    assert Settings().max_workers == 2  # only load() reads the environment
    assert Settings.load().max_workers == 7


def test_swarm_gpus_are_node_slash_gpu_or_auto() -> None:
    s = Settings.load(environ={"WANWU_BACKEND": "swarm", "WANWU_GPUS": "gpu-1/GPU-0, gpu-2/0"})
    assert s.gpus == ("gpu-1/GPU-0", "gpu-2/0")
    assert Settings.load(environ={"WANWU_BACKEND": "swarm", "WANWU_GPUS": "auto"}).gpus == ("auto",)
    with pytest.raises(ConfigError, match="NODE/GPU"):
        Settings.load(environ={"WANWU_BACKEND": "swarm", "WANWU_GPUS": "0"})
    with pytest.raises(ConfigError, match="WANWU_GPUS='auto': auto finds the GPUs of swarm nodes"):
        Settings.load(environ={"WANWU_GPUS": "auto"})
    with pytest.raises(ConfigError, match="NODE/GPU"):
        Settings.load(environ={"WANWU_BACKEND": "swarm", "WANWU_GPUS": "gpu-1/"})
    with pytest.raises(ConfigError, match="WANWU_BACKEND is not swarm"):
        Settings.load(environ={"WANWU_GPUS": "gpu-1/GPU-0"})


def test_swarm_settings_from_the_environment() -> None:
    s = Settings.load(
        environ={
            "WANWU_BACKEND": "swarm",
            "WANWU_SWARM_NETWORK": "wanwu-net",
            "WANWU_SWARM_CONSTRAINTS": "node.role==worker; node.labels.zone==a",
        }
    )
    assert (s.backend, s.swarm_network, s.swarm_gpu_resource) == ("swarm", "wanwu-net", "NVIDIA-GPU")
    with pytest.raises(ConfigError, match="WANWU_SWARM_NETWORK=''"):
        Settings.load(environ={"WANWU_SWARM_NETWORK": ""})
