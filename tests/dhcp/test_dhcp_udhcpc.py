"""busybox udhcpc, the real client, against DhcpServer (needs root).

A network namespace holds udhcpc on one end of a veth pair; this test reads the other
end with a packet socket, passes DHCP payloads to the server and frames the replies
itself (the gateway's job in the product), and answers ARP for the server address so
udhcpc's unicast RELEASE can leave. udhcpc's script dumps the environment it was
given, which shows how it decoded every option.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import socket
import subprocess
import time
from ipaddress import IPv4Address

import pytest

from netkit.config import Config
from netkit.dhcp import DhcpServer, LeaseTable
from netkit.testing.privileged import require_privileged, require_tool

pytestmark = pytest.mark.privileged

_CLONE_NEWNET = 0x40000000
_ETH_P_ALL = 0x0003


def _socket_in_netns(netns: str, ifname: str) -> socket.socket:
    """A packet socket on ``ifname`` inside ``netns``: a socket stays in the namespace
    it was created in, so enter it just long enough to create the socket."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/self/ns/net") as home, open(f"/run/netns/{netns}") as target:
        if libc.setns(target.fileno(), _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
            sock.bind((ifname, 0))
        finally:
            if libc.setns(home.fileno(), _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    return sock


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def veth_netns():
    """(client namespace, server namespace): a veth pair 'c0' <-> 's0' between them."""
    require_privileged()
    require_tool("busybox")
    tag = f"{os.getpid() % 100000}"
    client_ns, server_ns = f"nkdc{tag}", f"nkds{tag}"
    _ip("netns", "add", client_ns)
    try:
        _ip("netns", "add", server_ns)
        try:
            _ip("-n", client_ns, "link", "add", "c0", "type", "veth", "peer", "name", "s0",
                "netns", server_ns)
            _ip("-n", client_ns, "link", "set", "c0", "up")
            _ip("-n", server_ns, "link", "set", "s0", "up")
            yield client_ns, server_ns
        finally:
            _ip("netns", "del", server_ns)
    finally:
        _ip("netns", "del", client_ns)


def _serve(sock: socket.socket, server: DhcpServer, config: Config, done, deadline: float) -> None:
    """Play gateway until ``done()`` is true: DHCP through ``server``, ARP for the gateway.
    Then keep serving until the link is quiet for a moment, for frames still in flight."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import ARP, Ether

    gateway_mac = ":".join(f"{b:02x}" for b in config.gateway_mac)
    while True:
        if time.monotonic() > deadline:
            raise AssertionError("udhcpc did not get there in time")
        finished = done()
        readable, _, _ = select.select([sock], [], [], 0.1)
        if not readable:
            if finished:
                return
            continue
        frame = Ether(sock.recv(65535))
        if ARP in frame and frame[ARP].op == 1 and frame[ARP].pdst == str(config.gateway_ip):
            reply = Ether(dst=frame.src, src=gateway_mac) / ARP(
                op=2, hwsrc=gateway_mac, psrc=str(config.gateway_ip), hwdst=frame.src, pdst=frame[ARP].psrc)
            sock.send(bytes(reply))
        elif UDP in frame and frame[UDP].dport == 67:
            answer = server.handle_untrusted(bytes(frame[UDP].payload),
                                             src_mac=bytes.fromhex(frame.src.replace(":", "")),
                                             now=time.monotonic())
            if answer is not None:
                out = (Ether(dst=answer.dst_mac, src=config.gateway_mac)
                       / IP(src=str(config.gateway_ip), dst=str(answer.dst_ip))
                       / UDP(sport=67, dport=68) / answer.payload)
                sock.send(bytes(out))


def _read_env(path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@pytest.mark.parametrize("broadcast_flag", [False, True], ids=["unicast", "broadcast"])
def test_udhcpc_bound_renew_release(veth_netns, tmp_path, broadcast_flag):
    client_ns, server_ns = veth_netns
    config = Config(mtu=65520, domain_name="netkit.test",
                    domain_search=("a.netkit.test", "b.netkit.test", "example.org"))
    leases = LeaseTable(config)
    server = DhcpServer(config, leases)
    script = tmp_path / "script.sh"
    # The script configures the address, as a real one would: udhcpc renews and
    # releases from a UDP socket bound to the leased address.
    script.write_text(
        "#!/bin/sh\n"
        f'env > "{tmp_path}/env.$1"\n'
        'if [ "$1" = bound ]; then ip addr add "$ip/$mask" dev "$interface"; fi\n')
    script.chmod(0o755)
    bound, renewed = tmp_path / "env.bound", tmp_path / "env.renew"
    sock = _socket_in_netns(server_ns, "s0")
    argv = ["ip", "netns", "exec", client_ns, "busybox", "udhcpc", "-i", "c0", "-f", "-n", "-R",
            "-t", "3", "-T", "1", "-s", str(script), "-x", "hostname:guest1"]
    if broadcast_flag:
        argv.append("-B")
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 8
        _serve(sock, server, config, bound.exists, deadline)
        client.send_signal(signal.SIGUSR1)  # renew now: unicast DHCPREQUEST with ciaddr
        _serve(sock, server, config, renewed.exists, deadline)
        client.send_signal(signal.SIGTERM)  # -R: unicast DHCPRELEASE on the way out
        _serve(sock, server, config, lambda: client.poll() is not None, deadline)
    finally:
        sock.close()
        if client.poll() is None:
            client.kill()
        output = client.communicate()[0]
    env = _read_env(bound)
    ip = IPv4Address(env["ip"])
    assert int(config.lowest_ip) <= int(ip) <= int(config.highest_ip), output
    assert env["subnet"] == "255.255.255.0"
    assert env["mask"] == "24"
    assert env["broadcast"] == "192.168.65.255"
    assert env["router"].strip() == "192.168.65.1"
    assert env["dns"].strip() == "192.168.65.1"
    assert env["ntpsrv"].strip() == "192.168.65.1"
    assert env["serverid"] == "192.168.65.1"
    assert env["lease"] == str(config.lease_seconds)
    assert env["domain"] == "netkit.test"
    # Option 119, compressed (the second and third names end in pointers).
    assert env["search"].split() == ["a.netkit.test", "b.netkit.test", "example.org"]
    assert env["mtu"] == "65520"  # option 26: two bytes
    assert _read_env(renewed)["ip"] == str(ip)
    assert server.stats["request_selecting"] == 1, (output, server.stats)
    # udhcpc sends its unicast renew from a short-lived socket connected to the server;
    # an ACK that arrives before that socket closes (this server answers within
    # microseconds) is delivered to it and lost, and udhcpc rebinds by broadcast a
    # second later. Either way it must end with the same address and no NAK.
    renewals = server.stats["request_renewing"]
    assert renewals in (1, 2), (output, server.stats)
    assert server.stats["ack"] == 1 + renewals and server.stats["nak"] == 0
    assert server.stats["release"] == 1 and server.stats["release_ignored"] == 0, (output, server.stats)
    assert server.stats["malformed"] == 0
    assert leases.leases() == []
    assert leases.lookup_ip(ip) is None
