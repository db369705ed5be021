"""Config loading: defaults, overrides, and errors that name the key."""

from pathlib import Path

import pytest

from appliance.config import ConfigError, load_config


def test_default_config_loads_and_resolves_socket(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENSPEED_CACHE", str(tmp_path))
    config = load_config()
    assert config.server.host == "127.0.0.1"
    assert config.model.preset == "smollm2-135m-instruct"
    assert config.server.socket == str(tmp_path / "run" / "tokenspeed-8000.sock")


def test_overrides_are_typed_and_nested():
    config = load_config(overrides=["server.port=9001", "scheduler.tps_floor=200",
                                    "kernels.override.rms_norm=torch"])
    assert config.server.port == 9001
    assert config.scheduler.tps_floor == 200.0
    assert config.kernels.override == {"rms_norm": "torch"}


def test_model_path_override_replaces_the_preset():
    config = load_config(overrides=["model.path=/some/checkpoint"])
    assert config.model.path == "/some/checkpoint" and config.model.preset is None


@pytest.mark.parametrize("override, key", [
    ("kv.page_sise=16", "kv.page_sise"),
    ("nonsense=1", "nonsense"),
    ("kv.page_size=12", "kv.page_size"),
    ("kv.page_size=0", "kv.page_size"),
    ("parallel.tp_size=3", "parallel.tp_size"),
    ("server.port=http", "server.port"),
    ("model.dtype=fp7", "model.dtype"),
    ("device=tpu", "device"),
    ("kv.memory_fraction=1.5", "kv.memory_fraction"),
    ("scheduler.max_batch_tokens=true", "scheduler.max_batch_tokens"),
    ("server=5", "server"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_set_needs_key_equals_value():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["server.port"])


def test_cli_reports_config_error(capsys):
    from appliance.cli import main

    assert main(["status", "--set", "kv.bogus=1"]) == 2
    assert "kv.bogus" in capsys.readouterr().err


def test_shipped_configs_load():
    for path in sorted(Path(__file__).parent.parent.glob("configs/*.yaml")):
        load_config(path)
