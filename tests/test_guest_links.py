"""A guest's DHCP + ping flow over each socket link kind, driven by a test peer."""

import socket
import uuid

import dpkt
import trio

from netkit.links.middleware import PcapCapture, PcapWriter
from netkit.links.qemu import QemuListener, qemu_connect
from netkit.links.vfkit import VfkitLink
from netkit.links.vpnkit import VpnkitHandshakeError, VpnkitListener, vpnkit_connect
from netkit.links.vsock import VsockListener
from netkit.testing import FakeGuest

import pytest


async def _lease_and_ping(nursery, link, switch, mac=None):
    guest = FakeGuest(link, mac)
    await nursery.start(guest.run)
    result = await guest.dhcp()
    assert result.ip in switch.config.subnet and result.router == switch.config.gateway_ip
    assert len(await guest.ping(switch.config.gateway_ip, count=2)) == 2
    return guest, result


async def test_qemu_stream_guest(netkit_switch, nursery, tmp_path):
    path = str(tmp_path / "qemu.sock")
    await netkit_switch.listen(QemuListener(path))
    link = await qemu_connect(path)
    await _lease_and_ping(nursery, link, netkit_switch)
    assert netkit_switch.statistics()["ports"] == 1


async def test_vfkit_guest(netkit_switch, nursery, tmp_path):
    server_path = str(tmp_path / "vfkit.sock")
    netkit_switch.attach(VfkitLink.bind(server_path))
    # The test peer is vfkit: a datagram socket of its own that talks to the server path.
    client = VfkitLink.bind(str(tmp_path / "vfkit-client.sock"))
    client.peer = server_path
    client.send(b"VFKT")  # vfkit's optional magic must not reach the switch as a frame
    await _lease_and_ping(nursery, client, netkit_switch)
    assert netkit_switch.statistics()["drops"].get("runt", 0) == 0


async def test_vpnkit_guest_reconnect_keeps_mac_and_ip(netkit_switch, nursery, tmp_path):
    path = str(tmp_path / "vpnkit.sock")
    await netkit_switch.listen(VpnkitListener(path, mtu=netkit_switch.config.mtu,
                                              allocate=netkit_switch.gateway.allocate_for_uuid))
    client_uuid = str(uuid.uuid4())
    link, mac, mtu = await vpnkit_connect(path, client_uuid)
    assert mtu == netkit_switch.config.mtu
    guest, first = await _lease_and_ping(nursery, link, netkit_switch, mac)
    await link.aclose()
    with trio.fail_after(2):
        while netkit_switch.statistics()["ports"]:
            await trio.sleep(0.01)
    link2, mac2, _ = await vpnkit_connect(path, client_uuid)
    assert mac2 == mac
    _, second = await _lease_and_ping(nursery, link2, netkit_switch, mac2)
    assert second.ip == first.ip
    # Another UUID gets another MAC and address.
    link3, mac3, _ = await vpnkit_connect(path, str(uuid.uuid4()))
    assert mac3 != mac
    _, third = await _lease_and_ping(nursery, link3, netkit_switch, mac3)
    assert third.ip != first.ip


async def test_vpnkit_preferred_ip_and_conflict(netkit_switch, nursery, tmp_path):
    path = str(tmp_path / "vpnkit.sock")
    await netkit_switch.listen(VpnkitListener(path, mtu=netkit_switch.config.mtu,
                                              allocate=netkit_switch.gateway.allocate_for_uuid))
    link, mac, _ = await vpnkit_connect(path, str(uuid.uuid4()), "192.168.65.77")
    _, result = await _lease_and_ping(nursery, link, netkit_switch, mac)
    assert str(result.ip) == "192.168.65.77"
    with pytest.raises(VpnkitHandshakeError) as info:
        await vpnkit_connect(path, str(uuid.uuid4()), "192.168.65.77")
    assert info.value.reason


async def test_vsock_code_path_over_unix_socket(netkit_switch, nursery, tmp_path):
    path = str(tmp_path / "vsock-standin.sock")

    def unix_listener(port, cid):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(16)
        return sock

    listener = VsockListener(1234, mtu=netkit_switch.config.mtu, allocate=netkit_switch.gateway.allocate_for_uuid,
                             socket_factory=unix_listener)
    await netkit_switch.listen(listener)
    link, mac, _ = await vpnkit_connect(path, str(uuid.uuid4()))
    await _lease_and_ping(nursery, link, netkit_switch, mac)


async def test_pcap_shows_dhcp_exchange(netkit_switch, nursery, tmp_path):
    from netkit.links.memory import memory_link_pair

    capture = tmp_path / "guest.pcap"
    writer = PcapWriter(str(capture))
    guest_end, switch_end = memory_link_pair()
    netkit_switch.attach(PcapCapture(switch_end, writer))
    await _lease_and_ping(nursery, guest_end, netkit_switch)
    writer.flush()
    message_types = []
    with open(capture, "rb") as f:
        for _ts, raw in dpkt.pcap.Reader(f):
            eth = dpkt.ethernet.Ethernet(raw)
            if isinstance(eth.data, dpkt.ip.IP) and isinstance(eth.data.data, dpkt.udp.UDP):
                udp = eth.data.data
                if {udp.sport, udp.dport} == {67, 68}:
                    message_types.append(dict(dpkt.dhcp.DHCP(udp.data).opts)[53][0])
    writer.close()
    assert message_types == [dpkt.dhcp.DHCPDISCOVER, dpkt.dhcp.DHCPOFFER, dpkt.dhcp.DHCPREQUEST, dpkt.dhcp.DHCPACK]
