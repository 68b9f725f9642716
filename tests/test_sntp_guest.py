"""SNTP on the gateway, queried by ntpdate from a real kernel guest."""

import re

import pytest

from netkit.testing import require_privileged, require_tool

pytestmark = pytest.mark.privileged


async def test_ntpdate_through_the_gateway(netkit_switch, netns_guest):
    require_privileged()
    require_tool("busybox")
    ntpdate = require_tool("ntpdate")
    await netns_guest.udhcpc()
    out = await netns_guest.run([ntpdate, "-q", "192.168.65.1"], timeout=30)
    text = out.stdout.decode() + out.stderr.decode()
    assert out.returncode == 0, text
    offset = float(re.search(r"([-+]?\d+\.\d+) \+/-", text).group(1))
    assert abs(offset) < 0.010, text
    assert netkit_switch.sntp.stats["answered"] >= 1
