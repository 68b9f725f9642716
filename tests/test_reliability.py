"""Reliability under load and faults: port scans, vanishing guests, attach/detach churn,
hostile frames into every NAT path. (The long soak is `make soak`.)"""

import os
import random
import socket
import struct
import subprocess
import sys
import uuid

import pytest
import trio
import trio.testing

import netkit
from netkit.links.qemu import QemuListener, qemu_connect
from netkit.links.vpnkit import VpnkitListener, vpnkit_connect
from netkit.testing import FakeGuest, require_privileged, require_tool
from netkit.testing.netns_guest import open_netns_guest
from netkit.wire import icmp_frame, tcp_frame, udp_frame, build_tcp_header

TOOLS = os.path.join(os.path.dirname(__file__), "tools")
HOST = "192.168.65.2"


def fd_count() -> int:
    import gc

    gc.collect()  # sockets an earlier test dropped must not be counted against this one
    return len(os.listdir("/proc/self/fd"))


async def wait_until(predicate, timeout=10.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.05)


@pytest.mark.privileged
async def test_full_port_scan_of_host_alias():
    require_privileged()
    require_tool("busybox")
    fds = fd_count()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    open_port = listener.getsockname()[1]
    # Ports the scan finds open belong to whatever listens on this host's loopback and
    # may never close their side: the half-close timeout bounds those flows.
    config = netkit.Config(tcp_half_close_timeout=3.0, dns_upstreams=("127.0.0.1:9",))
    async with netkit.open_switch(config) as netkit_switch, open_netns_guest(netkit_switch) as guest:
        await guest.udhcpc()
        out = await guest.run([sys.executable, os.path.join(TOOLS, "port_scan.py"), HOST, "10000"], timeout=300)
        counts = dict(kv.split("=") for kv in out.stdout.decode().split())
        assert int(counts["open"]) >= 1 and int(counts["other"]) == 0, counts
        assert int(counts["open"]) + int(counts["refused"]) == 65535
        # Right after: ping and a new connection work at once.
        ping = await guest.run(["ping", "-c", "1", "-W", "2", HOST])
        assert ping.returncode == 0
        conn = await guest.run([sys.executable, "-c", f"import socket; socket.create_connection(('{HOST}', {open_port}), timeout=3)"])
        assert conn.returncode == 0
        await wait_until(lambda: netkit_switch.tcp_nat.flow_count == 0, timeout=30)
        assert netkit_switch.tcp_nat.counters["connect-refused"] >= 65000
    listener.close()
    assert fd_count() <= fds


@pytest.mark.privileged
async def test_vanishing_guest_tears_down_its_flows(netkit_switch):
    require_privileged()
    require_tool("busybox")
    server = subprocess.Popen([sys.executable, os.path.join(TOOLS, "tcp_test_server.py")], stdout=subprocess.PIPE,
                              text=True)
    port = int(server.stdout.readline())
    fds = fd_count()
    try:
        async with open_netns_guest(netkit_switch) as guest:
            await guest.udhcpc()
            downloads = await trio.lowlevel.open_process(
                guest.netns.exec_args(["sh", "-c", f"for i in 1 2 3 4 5; do {sys.executable} "
                                       f"{TOOLS}/tcp_test_client.py download {HOST} {port} 2000000000 1 & done; wait"]),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # mid-transfer: every download has data flowing (each wants 2 GB)
            await wait_until(lambda: len(flows := netkit_switch.tcp_nat.flows()) == 5
                             and all(f.bytes_to_guest > 256 * 1024 for f in flows))
            await guest.link.aclose()  # the guest vanishes
            await wait_until(lambda: netkit_switch.tcp_nat.flow_count == 0, timeout=5)
            downloads.kill()
            with trio.CancelScope(shield=True):
                await downloads.wait()
        assert fd_count() <= fds
    finally:
        server.kill()
        server.wait()


async def test_50_guests_attach_lease_talk_detach_in_a_loop(netkit_switch, nursery, tmp_path):
    """vpnkit and qemu guests come and go: no leak of ports, leases, flows or tasks."""
    await netkit_switch.listen(VpnkitListener(str(tmp_path / "vpnkit.sock"), mtu=1500,
                                              allocate=netkit_switch.gateway.allocate_for_uuid))
    await netkit_switch.listen(QemuListener(str(tmp_path / "qemu.sock")))

    async def echo(stream, client):
        async with stream:
            while data := await stream.receive_some():
                await stream.send_all(data)

    netkit_switch.tcp_nat.register_service(7, echo)
    uuids = [str(uuid.UUID(int=i + 1)) for i in range(25)]
    macs = [bytes([2, 0, 0, 0, 1, i]) for i in range(25)]

    async def one_guest(i: int, loop: int) -> None:
        if i < 25:
            link, mac, _ = await vpnkit_connect(str(tmp_path / "vpnkit.sock"), uuids[i])
        else:
            link, mac = await qemu_connect(str(tmp_path / "qemu.sock")), macs[i - 25]
        guest = FakeGuest(link, mac)
        async with trio.open_nursery() as inner:
            await inner.start(guest.run)
            await guest.dhcp()
            stream = await guest.open_tcp_stream(netkit_switch.config.gateway_ip, 7)
            message = f"guest {i} loop {loop}".encode()
            await stream.send_all(message)
            assert await stream.receive_some() == message
            await stream.aclose()
            await link.aclose()

    baseline_tasks = None
    for loop in range(3):
        async with trio.open_nursery() as guests:
            for i in range(50):
                guests.start_soon(one_guest, i, loop)
        await wait_until(lambda: netkit_switch.statistics()["ports"] == 0)
        await wait_until(lambda: netkit_switch.tcp_nat.flow_count == 0)
        # Cancelled flow tasks need a scheduling round or two to finish.
        if baseline_tasks is None:
            with trio.fail_after(5):
                await trio.testing.wait_all_tasks_blocked(cushion=0.02)
            baseline_tasks = trio.lowlevel.current_statistics().tasks_living
        await wait_until(lambda: trio.lowlevel.current_statistics().tasks_living <= baseline_tasks, timeout=5)
    assert len(netkit_switch.leases()) == 50  # the same 50 guests kept their 50 leases


def _mutations(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        if choice < 0.5 and len(data) > 34:
            data[rng.randrange(34, len(data))] = rng.randrange(256)
        elif choice < 0.7:
            data = data[:rng.randrange(14, len(data) + 1)]
        elif choice < 0.85:
            data += rng.randbytes(rng.randrange(1, 64))
        elif len(data) > 40:
            struct.pack_into("!H", data, 16, rng.randrange(65536))  # IP total length
    return bytes(data)


# Mutations rewrite destination addresses too: an allow-list policy makes sure no mutated
# destination can become a real connect() beyond this machine's loopback.
@pytest.mark.parametrize("netkit_config", [
    pytest.param(netkit.Config(dns_upstreams=("127.0.0.1:9",), allow=("192.168.65.2/32", "127.0.0.0/8")),
                 id="allow-loopback-only")])
async def test_hostile_frames_into_every_nat_path(fake_guest, netkit_switch):
    """Mutated TCP/UDP/ICMP frames (fixed checksums are rare, so many get past none):
    nothing raises out of a handler, and the switch keeps working."""
    config = netkit_switch.config
    assert config.allow, "this test must run with an allow-list policy"
    gw_mac, me, host = config.gateway_mac, fake_guest.ip, config.host_ip.packed
    rng = random.Random(1234)
    frames_before = netkit_switch.frames_in
    bases = []
    for flags in (0x02, 0x10, 0x12, 0x04, 0x01, 0x18, 0x29):
        options = bytes([2, 4, 0, 1, 3, 3, 14, 4, 2, 5, 10] + [0] * 9 + [1])[:20]
        header = build_tcp_header(40000 + flags, 9, rng.getrandbits(32), rng.getrandbits(32), flags, 1000, options)
        bases.append(tcp_frame(gw_mac, fake_guest.mac, me, host, header, b"x" * 20))
    bases.append(udp_frame(gw_mac, fake_guest.mac, me, host, 5000, 9, b"payload"))
    bases.append(udp_frame(gw_mac, fake_guest.mac, me, config.gateway_ip.packed, 5000, 53, b"\0" * 30))
    bases.append(icmp_frame(gw_mac, fake_guest.mac, me, host, 8, 0, b"\0\1\0\1", b"ping"))
    for i in range(6000):
        base = bases[i % len(bases)]
        fake_guest.send_frame(_mutations(rng, base) if i % 3 else base)
        if i % 200 == 0:
            await trio.sleep(0)  # let the switch drain the link now and then
    # The switch has taken every frame in (each is handled synchronously on input, so
    # its handler errors are counted by then); the flows they started may keep
    # retransmitting to a guest that never answers, so "settled" is not waited for.
    await wait_until(lambda: netkit_switch.frames_in >= frames_before + 6000)
    assert netkit_switch.gateway.drops["handler-error"] == 0
    assert await fake_guest.ping(config.gateway_ip)
    assert netkit_switch.statistics()["flow-errors"] == 0
