"""The settings table (scheduler/settings.py): declared once, and every source of a value
(environment, TOML, `wanwu serve` flags, `wanwu pool set`, PATCH /v1/pool/settings,
`wanwu tune`'s grids) holds the same bounds; the README's table is its output."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from gateway.cli import cli
from gateway.cli.common import setting_list, setting_option
from scheduler.coreconfig import CoreConfig
from scheduler.errors import ConfigError
from scheduler.settings import DEFAULTS, RUNTIME, SPECS, TYPES, Settings, env_name, markdown_table

README = Path(__file__).resolve().parents[2] / "README.md"
NUMERIC = [name for name in SPECS if TYPES[name] in ("int", "float") and (SPECS[name].low is not None)]


def test_the_readme_table_is_the_settings_table() -> None:
    text = README.read_text(encoding="utf-8")
    table = markdown_table()
    assert table in text, (
        "README.md's settings table differs from scheduler/settings.py; paste the output of "
        "`python -c 'from scheduler.settings import markdown_table; print(markdown_table())'`"
    )
    documented = set(re.findall(r"^\| `(WANWU_[A-Z_]+)`", text, re.MULTILINE))
    assert {env_name(name) for name in SPECS} <= documented


def test_every_setting_is_declared_with_help_and_a_default_of_its_own_bounds() -> None:
    settings = Settings.load(environ={})
    for name, spec in SPECS.items():
        assert spec.help.strip(), name
        assert spec.problem(getattr(settings, name)) is None, name
    assert RUNTIME == ("max_workers", "idle_ttl_s", "keepalive", "stem_cells")


def _outside(name: str) -> list[Any]:
    spec, values = SPECS[name], []
    assert spec.low is not None
    values.append(spec.low if spec.low_open else spec.low - 1)
    if spec.high is not None:
        values.append(spec.high + 1)
    return [int(v) if TYPES[name] == "int" else v for v in values]


def _edges(name: str) -> list[Any]:
    spec = SPECS[name]
    assert spec.low is not None
    lowest = spec.low + 1 if spec.low_open and TYPES[name] == "int" else spec.low + (0.5 if spec.low_open else 0)
    values = [lowest] + ([spec.high] if spec.high is not None else [])
    return [int(v) if TYPES[name] == "int" else float(v) for v in values]


@pytest.mark.parametrize("name", NUMERIC)
def test_start_up_refuses_what_lies_outside_the_bounds_and_takes_the_edges(name: str) -> None:
    for value in _outside(name):
        with pytest.raises(ConfigError, match=rf"^{env_name(name)}="):
            Settings.load(environ={env_name(name): str(value)})
    # The watermarks must also stay in order: the other one out of the way.
    other = {"gpu_high_watermark": {"WANWU_GPU_LOW_WATERMARK": "0.01"}}.get(name, {})
    for value in _edges(name):
        if name == "gpu_low_watermark" and value >= DEFAULTS["gpu_high_watermark"]:
            continue
        assert getattr(Settings.load(environ={**other, env_name(name): str(value)}), name) == value


@pytest.mark.parametrize("name", [name for name in RUNTIME if name in NUMERIC])
def test_run_time_changes_and_their_flags_hold_the_same_bounds(name: str) -> None:
    settings = Settings.load(environ={})
    option = setting_option(name)(click.command()(lambda **_: None)).params[0]
    for value in _outside(name):
        with pytest.raises(ConfigError, match=rf"PATCH: {name}="):
            settings.changed("PATCH", strict=True, **{name: value})
        with pytest.raises(click.BadParameter):
            option.type.convert(value, option, None)
    for value in _edges(name):
        assert getattr(settings.changed("PATCH", strict=True, **{name: value}), name) == value
        assert option.type.convert(value, option, None) == value


def test_a_patch_takes_json_types_only() -> None:
    settings = Settings.load(environ={})
    with pytest.raises(ConfigError, match="expected an integer"):
        settings.changed("PATCH", strict=True, max_workers="3")
    with pytest.raises(ConfigError, match="expected a number"):
        settings.changed("PATCH", strict=True, idle_ttl_s=True)
    assert settings.changed("PATCH", strict=True, max_workers=3.0).max_workers == 3  # 3.0 is an integer in JSON
    assert settings.changed("WANWU", max_workers="3").max_workers == 3  # text, as the environment gives it
    with pytest.raises(ConfigError, match="must be one of"):
        settings.changed("PATCH", strict=True, keepalive=" fixed ")  # JSON is taken at its word


def test_tune_grids_hold_the_settings_bounds() -> None:
    parse = setting_list("max_workers")
    param = click.Option(["--max-workers"])
    assert parse(None, param, "1, 2,1024") == [1, 2, 1024]  # type: ignore[arg-type]
    for raw in ("0", "1,1025", "two"):
        with pytest.raises(click.BadParameter, match="--max-workers="):
            parse(None, param, raw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("args", "says"), [(["--max-workers", "0"], "must be > 0"), (["--ttl", "1e9"], "at most")])
def test_tune_refuses_grid_points_no_pool_could_run(tmp_path: Path, args: list[str], says: str) -> None:
    result = CliRunner().invoke(cli, ["tune", str(tmp_path), *args])
    assert result.exit_code == 2 and says in result.output


def test_one_core_config_from_settings() -> None:
    settings = Settings.load(environ={"WANWU_MAX_WORKERS": "5", "WANWU_IDLE_TTL_S": "12", "WANWU_QUEUE_TIMEOUT_S": "3"})
    config = CoreConfig.from_settings(settings, ttl_overrides={"a": 7.0}, batching={"a": (4, 0.01)})
    assert (config.capacity, config.default_ttl_s, config.model_ttl_s, config.batching) == (
        5,
        12.0,
        {"a": 7.0},
        {"a": (4, 0.01)},
    )
    assert (config.keepalive, config.stem_cells, config.retry_after_s) == ("adaptive", 1, 3.0)
    assert config.stem_models is None  # no catalog: a stem cell may load anything
    assert CoreConfig.from_settings(settings, []).stem_models == frozenset()  # an empty one: nothing


def test_the_api_description_states_the_same_bounds_for_what_changes_at_run_time() -> None:
    import json

    document = json.loads((README.parent / "gateway" / "openapi.json").read_text(encoding="utf-8"))
    patch = document["components"]["schemas"]["SettingsPatch"]["properties"]
    for name in RUNTIME:
        spec, schema = SPECS[name], patch[name]
        if spec.choices:
            keepalive = document["components"]["schemas"]["KeepAlive"]
            assert tuple(keepalive["enum"]) == spec.choices, name
            continue
        low_key = "exclusiveMinimum" if spec.low_open and TYPES[name] == "float" else "minimum"
        low = spec.low + 1 if spec.low_open and TYPES[name] == "int" else spec.low
        assert (schema.get(low_key), schema.get("maximum")) == (low, spec.high), name
    per_model = patch["model_ttl_s"]["additionalProperties"]  # a model's TTL: the default's bounds
    assert (per_model["exclusiveMinimum"], per_model["maximum"]) == (SPECS["idle_ttl_s"].low, SPECS["idle_ttl_s"].high)


def test_a_bundles_own_ttl_has_the_default_ttls_upper_bound() -> None:
    from wanwu_worker.bundle import MAX_IDLE_TTL_S

    assert SPECS["idle_ttl_s"].high == MAX_IDLE_TTL_S
