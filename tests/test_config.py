"""Config loading: defaults, overrides, and errors that name the key."""

import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from appliance.config import MAX_CONFIG_BYTES, REPO_ROOT, AppConfig, ConfigError, load_config

SHIPPED_CONFIGS = sorted(REPO_ROOT.glob("configs/*.yaml"))


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


def test_parallel_moe_reaches_the_runner_layout():
    """parallel.moe: ep puts each rank in one expert-parallel group of tp_size ranks."""
    from appliance.model.runner import moe_layout

    config = load_config(overrides=["parallel.tp_size=4", "parallel.moe=ep"])
    assert (config.parallel.moe, load_config().parallel.moe) == ("ep", "tp")
    layout = moe_layout(1, config.parallel.tp_size, config.parallel.moe)
    assert layout.ranks("moe_ep") == (0, 1, 2, 3) and layout.ranks("moe_tp") == (1,)
    assert moe_layout(1, 4, "tp").ranks("moe_tp") == (0, 1, 2, 3)


def test_model_path_override_replaces_the_preset():
    config = load_config(overrides=["model.path=/some/checkpoint"])
    assert config.model.path == "/some/checkpoint" and config.model.preset is None


@pytest.mark.parametrize("override, key", [
    ("kv.page_sise=16", "kv.page_sise"),
    ("nonsense=1", "nonsense"),
    ("kv.page_size=12", "kv.page_size"),
    ("kv.page_size=0", "kv.page_size"),
    ("parallel.tp_size=3", "parallel.tp_size"),
    ("parallel.moe=dp", "parallel.moe"),
    ("server.port=http", "server.port"),
    ("model.dtype=fp7", "model.dtype"),
    ("model.sampling_defaults=vllm", "model.sampling_defaults"),
    ("device=tpu", "device"),
    ("kv.memory_fraction=1.5", "kv.memory_fraction"),
    ("scheduler.max_batch_tokens=true", "scheduler.max_batch_tokens"),
    ("scheduler.max_running=0", "scheduler.max_running"),
    ("scheduler.tps_floor=-1", "scheduler.tps_floor"),
    ("scheduler.tps_floor=.nan", "scheduler.tps_floor"),
    ("scheduler.session_ttl_s=-5", "scheduler.session_ttl_s"),
    ("server=5", "server"),
    ("speculative.method=eagle", "speculative.method"),
    ("speculative.max_draft=0", "speculative.max_draft"),
    ("speculative.max_draft=33", "speculative.max_draft"),
    ("engine.heartbeat_timeout_s=.nan", "engine.heartbeat_timeout_s"),  # NaN disabled the watchdog
    ("engine.restart_window_s=.nan", "engine.restart_window_s"),
    ("kv.num_pages=99999999999999", "kv.num_pages"),  # past what the C++ core takes
    ("scheduler.max_running=99999999999999", "scheduler.max_running"),
    ("kv.page_size=1099511627776", "kv.page_size"),
    ("model.seed=99999999999999999999999", "model.seed"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[override])


@pytest.mark.parametrize("method", ["off", "ngram", "suffix", "mtp"])
def test_speculative_methods_of_this_build_load(method):
    assert load_config(overrides=[f"speculative.method={method}"]).speculative.method == method


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("text", ["0123", "0x1F", "12:30", "1_000", "no", "off", "true", "1e3",
                                  "@secret", "%x", "*x", "`x", "["])
def test_a_string_setting_keeps_the_text_it_was_given(text, tmp_path):
    """YAML 1.1 reads 0123 as the octal 83, 0x1F as 31 and 12:30 as 750: an API key given so was
    silently another one (QA: `--set server.api_key=0123` refused `Bearer 0123` and let `Bearer
    83` in), and `@secret` was a traceback. From --set and from a file alike."""
    assert load_config(overrides=[f"server.api_key={text}"]).server.api_key == text
    in_file = tmp_path / "key.yaml"  # YAML itself needs the last five quoted
    in_file.write_text(f"server:\n  api_key: {text}\n" if text[0] not in "@%*`[" else
                       f"server:\n  api_key: '{text}'\n")
    assert load_config(in_file).server.api_key == text


def test_numbers_still_read_as_numbers_and_a_deep_config_is_a_config_error(tmp_path):
    config = load_config(overrides=["kv.num_pages=0x10", "scheduler.tps_floor=12.5"])
    assert (config.kv.num_pages, config.scheduler.tps_floor) == (16, 12.5)
    with pytest.raises(ConfigError, match="kv.num_pages: expected int, got '\\['"):
        load_config(overrides=["kv.num_pages=["])
    with pytest.raises(ConfigError, match="model.seed: expected int, got False"):
        load_config(overrides=["model.seed=no"])
    deep = tmp_path / "deep.yaml"
    deep.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(deep)


def test_unreadable_config_files_and_duplicate_keys_are_config_errors(tmp_path):
    not_utf8 = tmp_path / "latin1.yaml"
    not_utf8.write_bytes(b"server:\n  host: caf\xe9\n")
    with pytest.raises(ConfigError, match="latin1.yaml: cannot read the config file"):
        load_config(not_utf8)
    with pytest.raises(ConfigError, match="the config file is not a regular file"):
        load_config(tmp_path)  # a folder
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)                                    # reading it would block for ever
    with pytest.raises(ConfigError, match="fifo.yaml: the config file is not a regular file"):
        load_config(fifo)
    huge = tmp_path / "huge.yaml"
    huge.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match="huge.yaml: the config file is over 1 MiB"):
        load_config(huge)
    twice = tmp_path / "twice.yaml"
    twice.write_text("server:\n  port: 9000\nkv:\n  num_pages: 64\nserver:\n  host: 127.0.0.1\n")
    with pytest.raises(ConfigError, match="duplicate key 'server'"):  # the port was dropped
        load_config(twice)


@pytest.mark.parametrize("value", ["", "relative/cache"])
def test_the_cache_folder_is_absolute_and_empty_means_unset(value, monkeypatch, tmp_path):
    from appliance.config import cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENSPEED_CACHE", value)
    want = tmp_path / value if value else Path.home() / ".cache" / "tokenspeed"
    assert cache_dir() == want and load_config().server.socket.startswith(str(want))


def test_set_needs_key_equals_value():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["server.port"])


def test_cli_reports_config_error(capsys):
    from appliance.cli import main

    assert main(["status", "--set", "kv.bogus=1"]) == 2
    assert "kv.bogus" in capsys.readouterr().err


def test_an_uncreatable_run_folder_is_a_config_error_naming_its_setting(tmp_path, capsys):
    from appliance.cli import main

    (tmp_path / "file").write_text("")  # a file where the socket's folder should be
    assert main(["up", "--set", f"server.socket={tmp_path}/file/run/d.sock"]) == 2
    err = capsys.readouterr().err
    assert "config error: server.socket: cannot use the run folder" in err and "file/run" in err


def test_zero_means_off_for_the_floor_and_retention():
    config = load_config(overrides=["scheduler.tps_floor=0", "scheduler.session_ttl_s=0"])
    assert config.scheduler.tps_floor == 0.0 and config.scheduler.session_ttl_s == 0.0


def test_scheduler_section_reaches_the_core_config():
    """The engine's one conversion passes every `scheduler:` setting to the C++ scheduler, and
    the C++ side accepts what config.py accepts (0 = off)."""
    from appliance.engine.engine import core_scheduler_config

    policy = load_config(overrides=["scheduler.tps_floor=0", "scheduler.session_ttl_s=0",
                                    "scheduler.max_running=3"]).scheduler
    core = core_scheduler_config(policy, num_pages=100, page_size=16, max_seq_len=4096)
    for key, value in dataclasses.asdict(policy).items():
        assert getattr(core, key) == value, key
    assert (core.num_pages, core.page_size, core.max_seq_len) == (100, 16, 4096)


def test_shipped_configs_load():
    assert SHIPPED_CONFIGS, f"no configs/*.yaml under {REPO_ROOT}"
    for path in SHIPPED_CONFIGS:
        load_config(path)


def _leaves(raw: dict, prefix: str = ""):
    for key, value in raw.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_state_only_what_they_change(path):
    """appliance/config.py holds every default; a config file restating one would be a second
    source that silently disagrees once the default moves."""
    defaults = AppConfig()
    for key, value in _leaves(yaml.safe_load(path.read_text()) or {}):
        default = defaults
        for part in key.split("."):
            default = getattr(default, part) if dataclasses.is_dataclass(default) \
                else default.get(part)
        assert value != default, f"{path.name}: {key}: {value!r} is the default"


def test_a_tokenizer_past_the_models_vocabulary_is_warned_at_start(caplog):
    """Every prompt holding such an id is refused as the client's fault; the operator hears
    why once, at start-up."""
    from appliance import cli

    with caplog.at_level("WARNING", logger="tokenspeed"):
        cli._warn_tokenizer_past_vocabulary(1000, 1000, "/m")
        assert not caplog.records
        cli._warn_tokenizer_past_vocabulary(1000, 500, "/m")
    assert "the tokenizer in /m has 1000 ids, the model's vocab_size is 500" in caplog.text
