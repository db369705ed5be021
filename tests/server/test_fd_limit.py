"""server/fd_limit.py: the open-file limit raised at start, and the warning before it runs out."""
from __future__ import annotations

import resource
import subprocess
import sys

import pytest

from appliance.server import fd_limit


def test_the_soft_limit_is_raised_toward_the_hard_one():
    """In a child whose soft limit is 256 (hard 4096): raised to the hard limit, or to TARGET
    when the hard one is higher; a limit already there is left."""
    probe = ("import resource\n"
             "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))\n"
             "from appliance.server.fd_limit import raise_fd_limit\n"
             "print(raise_fd_limit(), raise_fd_limit(1024), raise_fd_limit(),\n"
             "      resource.getrlimit(resource.RLIMIT_NOFILE))\n")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard open-file limit here is {hard}, under the test's 4096")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "(256, 4096) (4096, 4096) (4096, 4096) (4096, 4096)"


def test_a_warning_when_the_open_descriptors_near_the_limit_once_an_episode():
    message, on = fd_limit.fd_warning(100, 1024, False)
    assert message is None and not on
    message, on = fd_limit.fd_warning(950, 1024, False)
    assert on and message.startswith("950 of 1024 file descriptors open") and "ulimit -n" in message
    assert fd_limit.fd_warning(1000, 1024, True) == (None, True)    # still the same episode
    assert fd_limit.fd_warning(850, 1024, True) == (None, True)     # above the clearing share
    assert fd_limit.fd_warning(700, 1024, True) == (None, False)    # over: the next one warns
    assert fd_limit.fd_warning(1024, 1024, False)[0] is not None
    assert fd_limit.open_fds() > 2
