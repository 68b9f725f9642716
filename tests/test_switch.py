"""The switch and gateway through fake guests on in-memory links."""

import struct
from ipaddress import IPv4Address, IPv4Network

import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from netkit import Config
from netkit.gateway import Gateway
from netkit.links.base import Link
from netkit.switch import Port, Switch
from netkit.wire import ArpPacket, icmp_frame, udp_frame
from netkit.wire.ethernet import BROADCAST_MAC, ETHERTYPE_ARP, ETHERTYPE_IPV4, ethernet_header


async def test_dhcp_lease_options(fake_guest_factory, netkit_switch):
    guest = await fake_guest_factory(lease=False)
    result = await guest.dhcp()
    config = netkit_switch.config
    assert result.ip in config.subnet
    assert config.lowest_ip <= result.ip <= config.highest_ip
    assert result.netmask == IPv4Address("255.255.255.0")
    assert result.router == config.gateway_ip
    assert result.dns == [config.gateway_ip]
    assert result.mtu == 1500
    assert result.lease_seconds == config.lease_seconds
    leases = netkit_switch.leases()
    assert [(l.mac, l.ip, l.state) for l in leases] == [(guest.mac, result.ip, "bound")]


async def test_same_mac_gets_same_address(fake_guest_factory):
    first = await fake_guest_factory()
    again = await fake_guest_factory(lease=False, mac=bytes.fromhex("02aabbccddee"))
    ip1 = (await again.dhcp()).ip
    assert ip1 != IPv4Address(first.ip)
    ip2 = (await again.dhcp()).ip
    assert ip1 == ip2


async def test_ping_gateway_and_arp(fake_guest, netkit_switch):
    rtts = await fake_guest.ping(netkit_switch.config.gateway_ip, count=3)
    assert len(rtts) == 3
    assert await fake_guest.arp_resolve(netkit_switch.config.host_ip) == netkit_switch.config.gateway_mac
    stats = netkit_switch.statistics()["gateway"]["counters"]
    assert stats["icmp-echo-replies"] == 3


async def test_two_guests_reach_each_other(fake_guest_factory):
    a = await fake_guest_factory()
    b = await fake_guest_factory()
    assert a.ip != b.ip
    assert len(await a.ping(IPv4Address(b.ip), count=2)) == 2
    assert len(await b.ping(IPv4Address(a.ip))) == 1


async def test_spoofed_mac_dropped(fake_guest_factory, netkit_switch):
    a = await fake_guest_factory()
    b = await fake_guest_factory()
    # a pretends to be b
    a.send_frame(icmp_frame(netkit_switch.config.gateway_mac, b.mac, b.ip, netkit_switch.config.gateway_ip.packed,
                            8, 0, b"\0\1\0\1", b"x"))
    # and pretends to be the gateway
    a.send_frame(ethernet_header(BROADCAST_MAC, netkit_switch.config.gateway_mac, ETHERTYPE_ARP) + b"\0" * 28)
    await trio.sleep(0.05)
    assert netkit_switch.statistics()["drops"]["spoofed-mac"] == 2


async def test_spoofed_ip_dropped_after_lease(fake_guest, netkit_switch):
    gw = netkit_switch.config.gateway_ip.packed
    fake_guest.send_frame(icmp_frame(netkit_switch.config.gateway_mac, fake_guest.mac, bytes([192, 168, 65, 99]),
                                     gw, 8, 0, b"\0\1\0\1", b"x"))
    bogus_arp = ArpPacket(1, fake_guest.mac, bytes([192, 168, 65, 99]), b"\0" * 6, gw)
    fake_guest.send_frame(ethernet_header(BROADCAST_MAC, fake_guest.mac, ETHERTYPE_ARP) + bogus_arp.emit())
    with trio.fail_after(2):
        while sum(netkit_switch.drops[k] for k in ("spoofed-ip-unassigned", "spoofed-arp-unassigned")) < 2:
            await trio.sleep(0.01)
    assert netkit_switch.drops["spoofed-ip-unassigned"] == 1
    assert netkit_switch.drops["spoofed-arp-unassigned"] == 1
    # its real address still works
    assert await fake_guest.ping(netkit_switch.config.gateway_ip)


async def test_pool_exhaustion_is_silent_and_counted(nursery):
    from netkit import open_switch
    from netkit.links.memory import memory_link_pair
    from netkit.testing import FakeGuest

    config = Config(lowest_ip=IPv4Address("192.168.65.10"), highest_ip=IPv4Address("192.168.65.11"))
    async with open_switch(config) as switch:
        guests = []
        for _ in range(3):
            guest_end, switch_end = memory_link_pair()
            switch.attach(switch_end)
            g = FakeGuest(guest_end)
            await nursery.start(g.run)
            guests.append(g)
        await guests[0].dhcp()
        await guests[1].dhcp()
        with pytest.raises(trio.TooSlowError):
            await guests[2].dhcp(timeout=0.5)
        assert switch.statistics()["gateway"]["dhcp"]["pool_exhausted"] >= 1


async def test_detach_forgets_port(fake_guest_factory, netkit_switch):
    guest = await fake_guest_factory()
    assert netkit_switch.statistics()["ports"] == 1
    await guest.link.aclose()
    with trio.fail_after(2):
        while netkit_switch.statistics()["ports"]:
            await trio.sleep(0.01)
    assert netkit_switch.port_for_mac(guest.mac) is None


# ----------------------------------------------------------------------------- fuzzing
class RecordingLink(Link):
    """A link that records what the switch sends and never receives anything."""

    name = "recording"

    def __init__(self):
        super().__init__()
        self.sent = []

    async def _receive_batch(self):
        await trio.sleep_forever()

    def _try_send(self, frame, offload):
        self.sent.append(bytes(frame))
        return True

    async def _wait_send_ready(self):
        pass


class _NoNursery:
    def start_soon(self, *a, **k):
        pass


def _bare_switch():
    config = Config()
    switch = Switch(config, _NoNursery())
    switch.gateway = Gateway(config, switch, lambda: 1000.0)
    switch.gateway.reserve(GUEST_MAC, IPv4Address("192.168.65.42"))  # the address the frames come from
    victim = Port(1, RecordingLink(), switch=switch)
    other = Port(2, RecordingLink(), switch=switch)
    switch._ports = {1: victim, 2: other}
    return switch, victim


def _accounted(switch) -> int:
    gw = switch.gateway
    return (sum(switch.drops.values()) + switch.frames_out + sum(gw.drops.values()) + sum(gw.counters.values())
            + sum(gw.dhcp.stats.values()) + sum(gw.reassembler.stats.values()))


GUEST_MAC = bytes.fromhex("020000000042")
GW_MAC = Config().gateway_mac


def _valid_frames():
    gw = Config().gateway_ip.packed
    me = bytes([192, 168, 65, 42])
    dhcp = b"\x01\x01\x06\x00" + b"\0" * 24 + GUEST_MAC + b"\0" * 202 + b"\x63\x82\x53\x63\x35\x01\x01\xff"
    return [
        icmp_frame(GW_MAC, GUEST_MAC, me, gw, 8, 0, b"\0\1\0\1", b"ping"),
        udp_frame(BROADCAST_MAC, GUEST_MAC, b"\0\0\0\0", b"\xff\xff\xff\xff", 68, 67, dhcp),
        udp_frame(GW_MAC, GUEST_MAC, me, gw, 1234, 53, b"\0" * 12),
        udp_frame(GW_MAC, GUEST_MAC, me, bytes([8, 8, 8, 8]), 1234, 53, b"\0" * 12),
        ethernet_header(BROADCAST_MAC, GUEST_MAC, ETHERTYPE_ARP) + ArpPacket(1, GUEST_MAC, me, b"\0" * 6, gw).emit(),
    ]


@st.composite
def mutated_frames(draw):
    base = bytearray(draw(st.sampled_from(_valid_frames())))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "truncate", "extend", "ihl", "len"]))
        if kind == "flip" and len(base) > 12:
            i = draw(st.integers(12, len(base) - 1))
            base[i] = draw(st.integers(0, 255))
        elif kind == "truncate":
            base = base[:draw(st.integers(0, len(base)))]
        elif kind == "extend":
            base += draw(st.binary(max_size=100))
        elif kind == "ihl" and len(base) > 14:
            base[14] = 0x40 | draw(st.integers(0, 15))
        elif kind == "len" and len(base) > 17:
            struct.pack_into("!H", base, 16, draw(st.integers(0, 0xFFFF)))
    if len(base) >= 12:
        base[6:12] = GUEST_MAC  # keep the source MAC so frames get past port security
    return bytes(base)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.one_of(mutated_frames(), st.binary(max_size=300),
                 st.binary(min_size=60000, max_size=70000).map(lambda b: GW_MAC + GUEST_MAC + b"\x08\x00" + b)))
def test_fuzzed_frames_never_raise_and_are_accounted(frame):
    switch, port = _bare_switch()
    before = _accounted(switch)
    switch.input(port, frame)  # must not raise
    assert _accounted(switch) > before, "a frame went through without being counted anywhere"
    assert switch.gateway.drops["handler-error"] == 0


async def test_live_capture_start_stop(fake_guest, netkit_switch, tmp_path):
    import dpkt

    path = str(tmp_path / "live.pcap")
    netkit_switch.start_capture(path)
    await fake_guest.ping(netkit_switch.config.gateway_ip, count=2)
    netkit_switch.stop_capture()
    with open(path, "rb") as f:
        frames = [raw for _ts, raw in dpkt.pcap.Reader(f)]
    icmp_types = [dpkt.ethernet.Ethernet(raw).data.data.type for raw in frames
                  if isinstance(dpkt.ethernet.Ethernet(raw).data, dpkt.ip.IP)]
    assert icmp_types == [8, 0, 8, 0]
    await fake_guest.ping(netkit_switch.config.gateway_ip)  # nothing more is written
    assert len(list(dpkt.pcap.Reader(open(path, "rb")))) == len(frames)


async def test_every_frame_to_a_guest_is_counted_once(fake_guest, netkit_switch):
    """NAT and services send through ``Port.send`` too: frames_out matches what the guest got."""
    import trio

    from netkit.wire import udp_frame

    await fake_guest.ping(netkit_switch.config.gateway_ip)
    # A UDP datagram to a closed gateway port: the UDP NAT answers port unreachable itself.
    fake_guest.send_frame(udp_frame(netkit_switch.config.gateway_mac, fake_guest.mac, fake_guest.ip,
                                    netkit_switch.config.gateway_ip.packed, 4000, 9, b"x"))
    await fake_guest.wait_frame(lambda f: f[23:24] == b"\x01" and f[34:35] == b"\x03")
    with trio.fail_after(2):
        while netkit_switch.frames_out != fake_guest.link.statistics().frames_received:
            await trio.sleep(0.01)
    assert netkit_switch.frames_out >= 4  # DHCP offer + ack, echo reply, port unreachable
