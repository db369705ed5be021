"""Generated cache folders: a build that cannot write names the folder (a full or read-only
disk gave a 40-line traceback ending in the writer's "No space left on device"), and temporary
siblings that killed builds left are cleared by a later build."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_config
from appliance.engine.model_files import resolve_model_files
from appliance.model.atomic_folder import STALE_TMP_S, CacheWriteError, ensure_folder
from appliance.model.load_error import LoadError


def _write(folder: Path) -> None:
    (folder / "a.txt").write_text("a")


def test_a_failing_writer_is_a_cache_write_error_naming_the_folder(tmp_path):
    def disk_full(folder: Path) -> None:
        raise Exception("No space left on device (os error 28)")  # as tokenizers raises it

    with pytest.raises(CacheWriteError, match=f"cannot write {tmp_path / 'tok'}: No space left"):
        ensure_folder(tmp_path / "tok", ("a.txt",), disk_full)
    assert list(tmp_path.iterdir()) == []  # its temporary sibling removed


def test_a_refused_source_stays_a_load_error(tmp_path):
    def refuse(folder: Path) -> None:
        raise LoadError("x.gguf: architecture 'phi3' is not one TokenSpeed reads")

    with pytest.raises(LoadError, match="phi3"):
        ensure_folder(tmp_path / "tok", ("a.txt",), refuse)


def test_stale_temporary_siblings_go_and_fresh_ones_stay(tmp_path):
    stale, fresh = tmp_path / ".tok.tmp-killed", tmp_path / ".tok.tmp-building"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - STALE_TMP_S - 60
    os.utime(stale, (old, old))
    assert ensure_folder(tmp_path / "tok", ("a.txt",), _write) == tmp_path / "tok"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tok.tmp-building", "tok"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_read_only_cache_is_a_config_error_at_start(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o500)
    monkeypatch.setenv("TOKENSPEED_CACHE", str(cache))
    with pytest.raises(ConfigError, match=f"cannot write {cache}/models/tiny-llama: .*TOKENSPEED_CACHE"):
        resolve_model_files(load_config(None, ["model.preset=tiny-llama"]))


def test_a_cache_that_cannot_take_the_model_is_a_config_error_at_start(tmp_path, monkeypatch):
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("TOKENSPEED_CACHE", str(blocked))
    with pytest.raises(ConfigError, match=f"cannot write {blocked}/models/tiny-llama: .*TOKENSPEED_CACHE"):
        resolve_model_files(load_config(None, ["model.preset=tiny-llama"]))
