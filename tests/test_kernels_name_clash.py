"""Hugging Face's `kernels` distribution shares the import name of TokenSpeed's `kernels/`."""

from __future__ import annotations

import importlib.metadata

from appliance import cli


def test_the_projects_environment_has_no_foreign_kernels_package():
    # pyproject keeps transformers below the release that requires that distribution.
    assert cli.kernels_name_clash() is None


def test_up_refuses_to_start_beside_it_and_says_why(monkeypatch, tmp_path, capsys):
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        return "0.19.1" if name == "kernels" else real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setenv(cli.RANK_LOG_LEVEL_ENV, "WARNING")  # `up` sets it; put back afterwards
    code = cli.main(["up", "--set", f"server.socket={tmp_path}/ts.sock"])
    err = capsys.readouterr().err
    assert code == 1
    assert "`kernels` distribution 0.19.1" in err and "pip uninstall kernels" in err
    assert not (tmp_path / "ts.sock").exists()
