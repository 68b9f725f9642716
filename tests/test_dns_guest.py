"""DNS on the gateway, queried by a real kernel guest (dig, glibc) with a loopback upstream."""

import os
import subprocess
import sys

import pytest
import trio

import netkit
from netkit.testing import require_privileged, require_tool
from netkit.testing.netns_guest import open_netns_guest

pytestmark = pytest.mark.privileged

TOOLS = os.path.join(os.path.dirname(__file__), "tools")
GW = "192.168.65.1"


@pytest.fixture(autouse=True)
def _privileged():
    require_privileged()
    require_tool("busybox")
    require_tool("dig")


@pytest.fixture
def upstream():
    proc = subprocess.Popen([sys.executable, os.path.join(TOOLS, "dns_upstream.py")], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    yield port
    proc.kill()
    proc.wait()


@pytest.fixture
async def dns_guest(upstream, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("10.99.0.1 pinned.example.test\n")
    config = netkit.Config(dns_upstreams=(f"127.0.0.1:{upstream}",), dns_hosts_file=str(hosts))
    async with netkit.open_switch(config) as switch:
        async with open_netns_guest(switch) as guest:
            await guest.udhcpc()
            yield switch, guest, hosts


async def dig(guest, *args):
    out = await guest.run(["dig", f"@{GW}", "+short", "+time=3", "+tries=1", *args], timeout=30)
    return out.stdout.decode().split("\n")


async def test_record_types_through_upstream(dns_guest):
    _, guest, _ = dns_guest
    assert (await dig(guest, "www.example.test", "A"))[0] == "10.11.12.13"
    assert (await dig(guest, "www.example.test", "AAAA"))[0] == "fd00::1213"
    assert (await dig(guest, "example.test", "MX"))[0] == "10 mail.example.test."
    assert (await dig(guest, "example.test", "TXT"))[0] == '"hello netkit"'
    assert (await dig(guest, "_http._tcp.example.test", "SRV"))[0] == "0 5 80 www.example.test."
    assert (await dig(guest, "-x", "10.11.12.13"))[0] == "www.example.test."
    assert (await dig(guest, "alias.example.test", "A"))[:2] == ["www.example.test.", "10.11.12.13"]
    assert (await dig(guest, "+tcp", "www.example.test", "A"))[0] == "10.11.12.13"


async def test_large_answer_truncates_over_udp_then_tcp(dns_guest):
    switch, guest, _ = dns_guest
    udp = await guest.run(["dig", f"@{GW}", "+ignore", "+notcp", "+bufsize=512", "big.example.test", "TXT"], timeout=30)
    assert b" tc" in udp.stdout or b"tc " in udp.stdout, udp.stdout
    tcp = await dig(guest, "big.example.test", "TXT")  # dig retries over TCP on TC
    assert len([line for line in tcp if line]) == 12


async def test_builtin_names_and_glibc(dns_guest):
    switch, guest, _ = dns_guest
    assert (await dig(guest, "host.docker.internal"))[0] == "192.168.65.2"
    assert (await dig(guest, "gateway.docker.internal"))[0] == GW
    getent = await guest.run(["getent", "hosts", "host.docker.internal"])
    assert getent.stdout.decode().split()[0] == "192.168.65.2", getent


async def test_hosts_file_wins_and_reloads(dns_guest):
    switch, guest, hosts = dns_guest
    assert (await dig(guest, "pinned.example.test"))[0] == "10.99.0.1"
    hosts.write_text("10.99.0.2 pinned.example.test\n")
    os.utime(hosts, (1e9, 1e9 + 10))  # make sure the mtime differs even within one second
    with trio.fail_after(10):
        while (await dig(guest, "pinned.example.test"))[0] != "10.99.0.2":
            await trio.sleep(0.3)


async def test_upstream_down_gives_prompt_servfail():
    with_dead = netkit.Config(dns_upstreams=("127.0.0.1:9",), dns_timeout=1.0)
    async with netkit.open_switch(with_dead) as switch:
        async with open_netns_guest(switch) as guest:
            await guest.udhcpc()
            start = trio.current_time()
            out = await guest.run(["dig", f"@{GW}", "+time=5", "+tries=1", "nowhere.example.test"], timeout=30)
            assert b"SERVFAIL" in out.stdout, out.stdout
            assert trio.current_time() - start < 3
            # Local names keep working meanwhile.
            assert (await dig(guest, "host.docker.internal"))[0] == "192.168.65.2"
