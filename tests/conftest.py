"""Suite-wide settings for netkit's own tests."""

import pytest

from netkit import Config


@pytest.fixture
def netkit_config() -> Config:
    # Tests may only talk to this machine: DNS upstreams are servers a test starts on
    # loopback. By default, point upstream DNS at a closed loopback port rather than the
    # machine's real resolver from /etc/resolv.conf.
    return Config(dns_upstreams=("127.0.0.1:9",))
