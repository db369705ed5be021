"""The module-wide daemon fixture for end-to-end tests."""

import pytest
from daemon_process import Daemon, start_daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Daemon:
    d = start_daemon(tmp_path_factory.mktemp("daemon"))
    yield d
    code = d.stop()
    assert code == 0, d.log.read_text()
    assert not d.socket.exists()
