"""YAML -> frozen dataclasses, validated, with errors that name the key.

The dataclasses below are the one source of every setting's default: shipped YAML files state
only what they change, and the C++ scheduler (appliance._core) takes every setting it needs
from here, with no defaults of its own.

Every CLI subcommand loads the same file plus `--set key=value` overrides, so `top`, `status` and
`down` find the daemon that `up` started with the same config.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A bad config: the message names the key."""


def cache_dir() -> Path:
    """Where generated checkpoints and runtime files live ($TOKENSPEED_CACHE; empty is unset, a
    relative path is taken from the current folder, so every subcommand finds the same one)."""
    configured = os.environ.get("TOKENSPEED_CACHE", "")
    return Path(configured).absolute() if configured else Path.home() / ".cache" / "tokenspeed"


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None
    preset: str | None = "smollm2-135m-instruct"  # the real default model (presets.PACKAGED)
    load_format: str = "auto"  # auto | safetensors | dummy
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_model_len: int = 4096
    served_name: str | None = None
    seed: int = 0
    # for the sampling fields a request leaves out: model (generation_config.json) | api
    sampling_defaults: str = "model"

    @property
    def model_name(self) -> str:
        if self.served_name:
            return self.served_name
        if self.path:
            return Path(self.path).name
        return str(self.preset)


@dataclass(frozen=True)
class ParallelConfig:
    tp_size: int = 1
    moe: str = "tp"  # tp: each expert split over the ranks | ep: whole experts per rank


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    socket: str = ""  # "" -> <cache>/run/tokenspeed-<port>.sock
    api_key: str | None = None
    max_body_bytes: int = 32 * 1024 * 1024  # a larger request body is refused with a 413
    tool_parser: str = "auto"  # tool-call markup: auto (from the chat template) or a format name


@dataclass(frozen=True)
class KVConfig:
    """YAML `kv:`: the paged KV cache."""

    page_size: int = 16  # tokens per page, a power of two
    memory_fraction: float = 0.85  # of the device's memory, when num_pages is not set
    num_pages: int | None = None  # a fixed pool size instead of memory_fraction
    # the cache's element type: auto (the model's dtype) | fp8_e4m3 (one byte, scaled per
    # layer; twice the pages in the same memory; not for MLA models)
    dtype: str = "auto"


@dataclass(frozen=True)
class SchedulerPolicyConfig:
    """YAML `scheduler:`: the batch policy of the C++ scheduler (the engine turns it into an
    `appliance._core.SchedulerConfig`, adding the KV pool's size and the context length)."""

    max_batch_tokens: int = 2048  # tokens per step, decodes + prefill chunks
    max_running: int = 256  # admitted (prefilling + decoding) requests
    tps_floor: float = 70.0  # decode tokens/s each running request keeps; 0 = off
    session_ttl_s: float = 60.0  # pin of a finished session turn's KV pages; 0 = no retention


@dataclass(frozen=True)
class SpeculativeConfig:
    """YAML `speculative:`: draft tokens verified by the target model in one step."""

    method: str = "off"  # off | suffix | ngram | mtp (where the drafts come from)
    max_draft: int = 8  # longest draft chain a request gets in one step (1..MAX_DRAFT)


MAX_DRAFT = 32  # a verify row needs logits at each of its tokens: keep the chains short


@dataclass(frozen=True)
class EngineConfig:
    """Supervision of the engine ranks (appliance/engine/client.py)."""

    restart: str = "on-failure"  # on-failure | never (a failure stops the daemon, exit code 1)
    max_restarts: int = 3  # restarts allowed within restart_window_s; the next failure stops
    restart_window_s: float = 600.0
    # rank 0 silent this long while running = hung; None: 10 s on GPUs, 60 s on the CPU (a
    # long prefill chunk's step takes seconds there: 2,048 tokens of SmolLM2 ~5 s on 2 cores)
    heartbeat_timeout_s: float | None = None


@dataclass(frozen=True)
class KernelsConfig:
    override: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AppConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    device: str = "auto"  # auto | cpu | cuda
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    scheduler: SchedulerPolicyConfig = field(default_factory=SchedulerPolicyConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    @property
    def run_dir(self) -> Path:
        """The daemon's run folder: its Unix socket, pid file and engine ipc folders."""
        return Path(self.server.socket).parent

    @property
    def pid_file(self) -> Path:
        """Holds the daemon's pid; `up` keeps an exclusive lock on it while it runs."""
        return Path(self.server.socket + ".pid")


_CHOICES = {
    "model.load_format": ("auto", "safetensors", "dummy"),
    "model.sampling_defaults": ("model", "api"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "device": ("auto", "cpu", "cuda"),
    "parallel.tp_size": (1, 2, 4, 8),
    "speculative.method": ("off", "suffix", "ngram", "mtp"),
    "parallel.moe": ("tp", "ep"),
    # appliance/server/tool_parsers FORMATS (a test keeps the two lists equal)
    "server.tool_parser": ("auto", "hermes", "qwen3_coder", "glm45", "kimi_k2", "deepseek_v3",
                           "deepseek_v31", "harmony"),
    "engine.restart": ("on-failure", "never"),
    "kv.dtype": ("auto", "fp8_e4m3"),   # appliance/model/runner.py KV_DTYPES
}
# Values the contract names that this build cannot serve yet: start-up refuses them clearly.
_NOT_YET: dict[tuple[str, str], str] = {}
_POSITIVE = {
    "model.max_model_len", "server.port", "server.max_body_bytes", "kv.page_size", "kv.num_pages",
    "scheduler.max_batch_tokens", "scheduler.max_running", "speculative.max_draft",
    "engine.restart_window_s", "engine.heartbeat_timeout_s",
}
# 0 has a meaning here: tps_floor 0 = no floor, session_ttl_s 0 = no retention.
_NON_NEGATIVE = {"scheduler.tps_floor", "scheduler.session_ttl_s"}
# Counts the C++ scheduler and the KV pool take as 32-bit ints.
_INT32 = {"kv.page_size", "kv.num_pages", "scheduler.max_batch_tokens", "scheduler.max_running"}
_INT32_MAX = 2**31 - 1


MAX_CONFIG_BYTES = 1 << 20   # a config is a few KB; a 50 MB one took YAML over 30 s to read


def _config_text(path: Path) -> str:
    """The config file's text: a regular file (opening a FIFO would block start-up for ever)
    of at most MAX_CONFIG_BYTES."""
    if path.exists() and not path.is_file():
        raise ConfigError(f"{path}: the config file is not a regular file")
    with path.open("rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: the config file is over {MAX_CONFIG_BYTES >> 20} MiB")
    return data.decode("utf-8")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AppConfig:
    """Read YAML (default: configs/default.yaml), apply `key=value` overrides, validate."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        raw = yaml.load(_config_text(path), Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, unreadable, not UTF-8
        raise ConfigError(f"{path}: cannot read the config file: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for item in overrides or []:
        _apply_override(raw, item)
    config = _build(AppConfig, raw, prefix="")
    _validate(config)
    return _resolve(config)


@dataclass(frozen=True)
class _Scalar:
    """A YAML number or boolean with the text it was written as. A string key takes the text:
    YAML 1.1 reads an API key written 0123 as the octal 83, 0x1F as 31 and 12:30 as 750."""
    value: int | float | bool
    text: str

    def __bool__(self) -> bool:
        return bool(self.value)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one, so a
    second `server:` section would silently drop the first), and keeps the text of numbers and
    booleans in values (`_Scalar`).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        mapping = super().construct_mapping(node, deep=deep)
        return {(k.value if isinstance(k, _Scalar) else k): v for k, v in mapping.items()}

    def _with_text(self, node: yaml.ScalarNode, construct: Callable) -> _Scalar:
        return _Scalar(construct(self, node), node.value)


for _tag, _construct in (("int", yaml.SafeLoader.construct_yaml_int),
                         ("float", yaml.SafeLoader.construct_yaml_float),
                         ("bool", yaml.SafeLoader.construct_yaml_bool)):
    _UniqueKeyLoader.add_constructor(
        f"tag:yaml.org,2002:{_tag}",
        lambda loader, node, construct=_construct: loader._with_text(node, construct))


def _parse_value(text: str) -> Any:
    """A --set value, read as YAML where it is YAML; else the text itself (`@secret`, `*x`)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, RecursionError):
        return text


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    node = raw
    *parents, leaf = key.strip().split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[leaf] = _parse_value(value) if value.strip() else None
    # model.path and model.preset are alternatives: setting one on the command line replaces
    # the other from the file, so `--set model.path=/ckpt` works with the default config.
    if parents == ["model"] and leaf in ("path", "preset") and node[leaf]:
        node["preset" if leaf == "path" else "path"] = None


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        known = ", ".join(prefix + name for name in fields)
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {known})")
    values = {name: _coerce(hints[name], value, prefix + name) for name, value in raw.items()}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(hint, value, key)
    if isinstance(value, _Scalar):
        value = value.text if hint is str else value.value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    if origin is dict:
        if isinstance(value, dict):
            value = {k: v.text if isinstance(v, _Scalar) else v for k, v in value.items()}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{key}: expected a mapping of names to strings, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def _validate(config: AppConfig) -> None:
    for key, choices in _CHOICES.items():
        value = _get(config, key)
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, choices))}, got {value!r}")
    for (key, value), why in _NOT_YET.items():
        if _get(config, key) == value:
            raise ConfigError(f"{key}: {value} is not available: {why}")
    for key in _POSITIVE:
        value = _get(config, key)
        if value is not None and not value > 0:  # also refuses NaN
            raise ConfigError(f"{key}: must be positive, got {value!r}")
    for key in _INT32:
        value = _get(config, key)
        if value is not None and value > _INT32_MAX:
            raise ConfigError(f"{key}: must be <= {_INT32_MAX}, got {value!r}")
    if not -2**63 <= config.model.seed < 2**63:  # torch's generator takes a 64-bit seed
        raise ConfigError(f"model.seed: must fit 64 bits, got {config.model.seed}")
    for key in _NON_NEGATIVE:
        value = _get(config, key)
        if not value >= 0:  # also refuses NaN
            raise ConfigError(f"{key}: must be >= 0, got {value!r}")
    if not 0.0 < config.kv.memory_fraction <= 1.0:
        raise ConfigError(f"kv.memory_fraction: must be in (0, 1], got {config.kv.memory_fraction}")
    if config.kv.page_size & (config.kv.page_size - 1):
        raise ConfigError(f"kv.page_size: must be a power of two, got {config.kv.page_size}")
    if bool(config.model.path) == bool(config.model.preset):
        raise ConfigError("model.path / model.preset: set exactly one of them")
    if config.model.path and config.model.load_format == "dummy":
        raise ConfigError("model.load_format: dummy needs model.preset, not model.path")
    if config.speculative.max_draft > MAX_DRAFT:
        raise ConfigError(f"speculative.max_draft: must be <= {MAX_DRAFT}, "
                          f"got {config.speculative.max_draft}")
    if config.engine.max_restarts < 0:
        raise ConfigError(f"engine.max_restarts: must be >= 0, got {config.engine.max_restarts}")
    if config.server.port > 65535:
        raise ConfigError(f"server.port: must be <= 65535, got {config.server.port}")


def _resolve(config: AppConfig) -> AppConfig:
    """Fill in derived defaults (the socket path) so every subcommand agrees on them."""
    if config.server.socket:
        socket = str(Path(config.server.socket).expanduser())
    else:
        socket = str(cache_dir() / "run" / f"tokenspeed-{config.server.port}.sock")
    return dataclasses.replace(config, server=dataclasses.replace(config.server, socket=socket))


def _get(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config
