"""The module-wide daemon fixture for end-to-end tests."""

import pytest
from daemon_process import Daemon, start_daemon


def pytest_configure(config) -> None:
    # Also registered in pyproject's pytest section; here so these files never warn without it.
    config.addinivalue_line("markers", "slow: starts daemons or other processes "
                                       "(deselect: -m 'not slow')")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Daemon:
    d = start_daemon(tmp_path_factory.mktemp("daemon"))
    yield d
    code = d.stop()
    assert code == 0, d.log.read_text()
    assert not d.socket.exists()
