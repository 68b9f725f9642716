"""UDP and ICMP NAT from a real kernel guest to servers on host loopback."""

import gc
import os
import subprocess
import sys

import pytest
import trio

import netkit
from netkit.testing import require_privileged, require_tool
from netkit.testing.netns_guest import open_netns_guest

pytestmark = pytest.mark.privileged

HOST = "192.168.65.2"
TOOLS = os.path.join(os.path.dirname(__file__), "tools")


@pytest.fixture(autouse=True)
def _privileged():
    require_privileged()
    require_tool("busybox")


@pytest.fixture
def udp_echo():
    proc = subprocess.Popen([sys.executable, os.path.join(TOOLS, "udp_echo_server.py")], stdout=subprocess.PIPE,
                            text=True)
    port = int(proc.stdout.readline())
    yield port
    proc.kill()
    proc.wait()


async def _python(guest, code: str, timeout=60):
    out = await guest.run([sys.executable, "-c", code], timeout=timeout)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode().strip()


async def test_ping_host_alias_and_gateway(netkit_switch, netns_guest):
    require_tool("ping")
    await netns_guest.udhcpc()
    for target in (HOST, "192.168.65.1"):
        out = await netns_guest.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", target])
        assert out.returncode == 0, out.stdout
        assert b"3 received" in out.stdout
    assert netkit_switch.icmp_nat.counters["echo-replies"] == 3


async def test_udp_echo_through_host_alias(netkit_switch, netns_guest, udp_echo):
    await netns_guest.udhcpc()
    got = await _python(netns_guest, f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
for i in range(5):
    s.sendto(b"hello %d" % i, ("{HOST}", {udp_echo}))
    data, addr = s.recvfrom(65535)
    assert data == b"hello %d" % i and addr == ("{HOST}", {udp_echo}), (data, addr)
print("ok")
""")
    assert got == "ok"


async def test_udp_port_unreachable(netkit_switch, netns_guest):
    await netns_guest.udhcpc()
    got = await _python(netns_guest, f"""
import socket
for target in (("{HOST}", 9), ("192.168.65.1", 9)):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); s.connect(target)
    s.send(b"anyone?")
    try:
        s.recv(100)
        print("no error")
    except ConnectionRefusedError:
        print("refused")
""")
    assert got.split() == ["refused", "refused"]


async def test_20kb_datagram_fragmented_both_ways(netkit_switch, netns_guest, udp_echo):
    await netns_guest.udhcpc()
    got = await _python(netns_guest, f"""
import os, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
payload = os.urandom(20000)
s.sendto(payload, ("{HOST}", {udp_echo}))
data, _ = s.recvfrom(65535)
print("ok" if data == payload else "mismatch %d" % len(data))
""")
    assert got == "ok"
    assert netkit_switch.gateway.reassembler.stats["reassembled"] >= 1


async def test_2000_flows_then_idle_expiry(udp_echo):
    # Idle long enough that the first flows outlive opening the last ones on a busy
    # machine (the assertion below counts all 2000 at once).
    config = netkit.Config(udp_idle_timeout=3.0)
    gc.collect()  # sockets an earlier test dropped must not close in the middle of this one
    fds_before = len(os.listdir("/proc/self/fd"))
    async with netkit.open_switch(config) as switch:
        async with open_netns_guest(switch) as guest:
            await guest.udhcpc()
            got = await _python(guest, f"""
import resource, socket
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
socks = []
ok = 0
# Batches of 100: a burst of 2000 replies would overflow the guest kernel's own input
# backlog (netdev_max_backlog), which is ordinary UDP loss, not what this test is about.
for batch in range(20):
    mine = []
    for i in range(batch * 100, batch * 100 + 100):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
        s.sendto(b"x%d" % i, ("{HOST}", {udp_echo}))
        mine.append((i, s))
    for i, s in mine:
        if s.recv(100) == b"x%d" % i:
            ok += 1
    socks += mine
print(ok)
""")
            assert got == "2000"
            assert switch.udp_nat.statistics()["flows"] == 2000
            with trio.fail_after(15):
                while switch.udp_nat.flows:
                    await trio.sleep(0.1)
            assert switch.udp_nat.counters["flows-expired"] == 2000
            assert len(os.listdir("/proc/self/fd")) <= fds_before + 2  # the tap and the raw socket at most
    assert len(os.listdir("/proc/self/fd")) == fds_before


async def test_udp_flow_cap_evicts_least_recently_used(udp_echo):
    config = netkit.Config(udp_max_flows=10)
    async with netkit.open_switch(config) as switch:
        async with open_netns_guest(switch) as guest:
            await guest.udhcpc()
            # Keep every socket open: a closed one's ephemeral port may be handed out again
            # to the next socket (about 1 run in 200), which then reuses a live flow
            # instead of opening a 25th.
            await _python(guest, f"""
import socket
socks = []
for i in range(25):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
    s.sendto(b"x", ("{HOST}", {udp_echo})); s.recv(10)
    socks.append(s)
assert len({{s.getsockname()[1] for s in socks}}) == 25
""")
            assert len(switch.udp_nat.flows) == 10
            assert switch.udp_nat.counters["flows-evicted"] == 15
