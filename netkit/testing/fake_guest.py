"""A fake guest: an in-process station that talks to a netkit switch over any link.

It answers ARP for its own address and ICMP echo sent to it, and offers coroutines a
test can await: ``dhcp()``, ``arp_resolve()``, ``ping()``, and ``wait_frame()`` for
anything else. Frames are built with netkit's own wire layer and DHCP with dpkt, so the
fake guest needs nothing beyond netkit's runtime dependencies.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Callable

import dpkt
import trio

from ..links.base import Link, LinkClosed
from ..wire import (ARP_REPLY, ARP_REQUEST, ArpPacket, EthernetView, IcmpView, Ipv4View, MalformedPacket,
                    UdpView, icmp_frame, udp_frame)
from ..wire.ethernet import BROADCAST_MAC, ETHERTYPE_ARP, ETHERTYPE_IPV4, ethernet_header
from ..wire.icmpv4 import ECHO_REPLY, ECHO_REQUEST
from ..wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP

__all__ = ["FakeGuest", "DhcpResult", "random_mac", "attach_fake_guest"]

_ZERO_IP = b"\0\0\0\0"


def random_mac() -> bytes:
    """A random locally administered unicast MAC."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return bytes(raw)


@dataclass
class DhcpResult:
    """What a DHCP exchange gave the guest."""

    ip: IPv4Address
    server: IPv4Address
    netmask: IPv4Address | None = None
    router: IPv4Address | None = None
    dns: list[IPv4Address] = field(default_factory=list)
    mtu: int | None = None
    lease_seconds: int | None = None
    domain: str | None = None
    options: dict[int, bytes] = field(default_factory=dict)


class FakeGuest:
    """An in-process guest on ``link``. Run ``await nursery.start(guest.run)`` first."""

    def __init__(self, link: Link, mac: bytes | None = None) -> None:
        self.link = link
        self.mac = mac or random_mac()
        self.ip: bytes = _ZERO_IP
        self.gateway_ip: bytes | None = None
        self.subnet: IPv4Network | None = None
        self.arp_cache: dict[bytes, bytes] = {}
        self._waiters: list[tuple[Callable[[bytes], bool], trio.MemorySendChannel]] = []
        self.unclaimed_frames = 0
        from .fake_tcp import GuestTcpStack

        self.tcp = GuestTcpStack(self, mtu=getattr(link, "mtu", 1500) or 1500)

    # ----- running -----
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Read frames until the link closes, answering ARP/echo and feeding waiters."""
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.link.run_sender)
            nursery.start_soon(self.tcp.run)
            try:
                while True:
                    for frame in await self.link.receive_batch():
                        self._input(bytes(frame))
            except LinkClosed:
                pass
            nursery.cancel_scope.cancel()

    def _input(self, frame: bytes) -> None:
        try:
            eth = EthernetView(memoryview(frame))
            if eth.dst != self.mac and eth.dst != BROADCAST_MAC:
                return
            if eth.ethertype == ETHERTYPE_ARP:
                arp = ArpPacket.parse_untrusted(eth.payload)
                if arp.sender_ip != _ZERO_IP:
                    self.arp_cache[arp.sender_ip] = arp.sender_mac
                if arp.operation == ARP_REQUEST and arp.target_ip == self.ip and self.ip != _ZERO_IP:
                    reply = ArpPacket(ARP_REPLY, self.mac, self.ip, arp.sender_mac, arp.sender_ip)
                    self.send_frame(ethernet_header(arp.sender_mac, self.mac, ETHERTYPE_ARP) + reply.emit())
            elif eth.ethertype == ETHERTYPE_IPV4:
                ip = Ipv4View(eth.payload)
                if ip.protocol == PROTO_TCP and ip.dst == self.ip and not ip.is_fragment:
                    self.tcp.input(ip)
                    return
                if ip.protocol == PROTO_ICMP and ip.dst == self.ip:
                    icmp = IcmpView(ip.payload)
                    if icmp.type == ECHO_REQUEST:
                        self.send_frame(icmp_frame(eth.src, self.mac, self.ip, ip.src, ECHO_REPLY, 0, icmp.rest,
                                                   icmp.body))
        except MalformedPacket:
            return
        for predicate, channel in list(self._waiters):
            if predicate(frame):
                try:
                    channel.send_nowait(frame)
                except trio.WouldBlock:
                    pass
                return
        self.unclaimed_frames += 1

    def send_frame(self, frame: bytes) -> None:
        self.link.send(frame)

    async def wait_frame(self, predicate: Callable[[bytes], bool], timeout: float = 5.0) -> bytes:
        """Wait for the next frame matching ``predicate``; raises ``trio.TooSlowError``."""
        send, receive = trio.open_memory_channel(16)
        entry = (predicate, send)
        self._waiters.append(entry)
        try:
            with trio.fail_after(timeout):
                return await receive.receive()
        finally:
            self._waiters.remove(entry)

    # ----- TCP -----
    async def open_tcp_stream(self, host: IPv4Address | str, port: int, *, timeout: float = 10.0):
        """A TCP connection from this guest (netkit's engine as the guest's kernel),
        as a trio ``HalfCloseableStream``. Raises ``ConnectionRefusedError`` on RST."""
        return await self.tcp.open_tcp_stream(host, port, timeout=timeout)

    # ----- DHCP -----
    def _dhcp_message(self, msg_type: int, xid: int, extra: list[tuple[int, bytes]]) -> bytes:
        msg = dpkt.dhcp.DHCP(op=dpkt.dhcp.DHCP_OP_REQUEST, xid=xid, chaddr=self.mac + b"\0" * 10,
                             flags=0, opts=[(dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes([msg_type])), *extra,
                                            (dpkt.dhcp.DHCP_OPT_PARAM_REQ, bytes([1, 3, 6, 15, 26, 42, 51, 119]))])
        return bytes(msg)

    def _send_dhcp(self, payload: bytes) -> None:
        self.send_frame(udp_frame(BROADCAST_MAC, self.mac, _ZERO_IP, b"\xff\xff\xff\xff", 68, 67, payload))

    def _is_dhcp_reply(self, xid: int) -> Callable[[bytes], bool]:
        def match(frame: bytes) -> bool:
            try:
                eth = EthernetView(memoryview(frame))
                if eth.ethertype != ETHERTYPE_IPV4:
                    return False
                ip = Ipv4View(eth.payload)
                if ip.protocol != PROTO_UDP:
                    return False
                udp = UdpView(ip.payload)
                return udp.dst_port == 68 and struct.unpack_from("!I", udp.payload, 4)[0] == xid
            except (MalformedPacket, struct.error):
                return False
        return match

    async def _dhcp_exchange(self, payload: bytes, xid: int, timeout: float) -> dpkt.dhcp.DHCP:
        send, receive = trio.open_memory_channel(16)
        entry = (self._is_dhcp_reply(xid), send)
        self._waiters.append(entry)
        try:
            with trio.fail_after(timeout):
                self._send_dhcp(payload)
                frame = await receive.receive()
        finally:
            self._waiters.remove(entry)
        ip = Ipv4View(EthernetView(memoryview(frame)).payload)
        return dpkt.dhcp.DHCP(bytes(UdpView(ip.payload).payload))

    async def dhcp(self, timeout: float = 5.0) -> DhcpResult:
        """DISCOVER, OFFER, REQUEST, ACK; sets ``self.ip``. Raises on NAK or timeout."""
        xid = int.from_bytes(os.urandom(4), "big")
        offer = await self._dhcp_exchange(self._dhcp_message(dpkt.dhcp.DHCPDISCOVER, xid, []), xid, timeout)
        opts = dict(offer.opts)
        if opts.get(dpkt.dhcp.DHCP_OPT_MSGTYPE) != bytes([dpkt.dhcp.DHCPOFFER]):
            raise RuntimeError(f"expected DHCPOFFER, got {opts.get(dpkt.dhcp.DHCP_OPT_MSGTYPE)!r}")
        offered = struct.pack("!I", offer.yiaddr)
        server_id = opts[dpkt.dhcp.DHCP_OPT_SERVER_ID]
        ack = await self._dhcp_exchange(
            self._dhcp_message(dpkt.dhcp.DHCPREQUEST, xid, [(dpkt.dhcp.DHCP_OPT_REQ_IP, offered),
                                                            (dpkt.dhcp.DHCP_OPT_SERVER_ID, server_id)]),
            xid, timeout)
        opts = dict(ack.opts)
        if opts.get(dpkt.dhcp.DHCP_OPT_MSGTYPE) != bytes([dpkt.dhcp.DHCPACK]):
            raise RuntimeError("DHCP request was not acknowledged")
        self.ip = struct.pack("!I", ack.yiaddr)
        result = DhcpResult(ip=IPv4Address(self.ip), server=IPv4Address(server_id), options=dict(opts))
        if 1 in opts:
            result.netmask = IPv4Address(opts[1])
            self.subnet = IPv4Network(f"{result.ip}/{result.netmask}", strict=False)
        if 3 in opts:
            result.router = IPv4Address(opts[3][:4])
            self.gateway_ip = opts[3][:4]
        if 6 in opts:
            result.dns = [IPv4Address(opts[6][i:i + 4]) for i in range(0, len(opts[6]) - 3, 4)]
        if 26 in opts:
            result.mtu = struct.unpack("!H", opts[26])[0]
        if 51 in opts:
            result.lease_seconds = struct.unpack("!I", opts[51])[0]
        if 15 in opts:
            result.domain = opts[15].decode(errors="replace")
        return result

    # ----- ARP and ping -----
    async def arp_resolve(self, ip: IPv4Address | str, timeout: float = 2.0) -> bytes:
        target = IPv4Address(ip).packed
        if target in self.arp_cache:
            return self.arp_cache[target]

        def is_reply(frame: bytes) -> bool:
            if frame[12:14] != b"\x08\x06":
                return False
            try:
                arp = ArpPacket.parse_untrusted(memoryview(frame)[14:])
            except MalformedPacket:
                return False
            return arp.operation == ARP_REPLY and arp.sender_ip == target

        request = ArpPacket(ARP_REQUEST, self.mac, self.ip, b"\0" * 6, target)
        send, receive = trio.open_memory_channel(4)
        entry = (is_reply, send)
        self._waiters.append(entry)
        try:
            with trio.fail_after(timeout):
                self.send_frame(ethernet_header(BROADCAST_MAC, self.mac, ETHERTYPE_ARP) + request.emit())
                frame = await receive.receive()
        finally:
            self._waiters.remove(entry)
        mac = ArpPacket.parse_untrusted(memoryview(frame)[14:]).sender_mac
        self.arp_cache[target] = mac
        return mac

    def next_hop(self, ip: bytes) -> bytes:
        """The address to ARP for: ``ip`` itself on the local subnet, else the router."""
        if self.subnet is None or self.gateway_ip is None or IPv4Address(ip) in self.subnet:
            return ip
        return self.gateway_ip

    async def ping(self, ip: IPv4Address | str, *, count: int = 1, timeout: float = 2.0,
                   payload: bytes = b"netkit-fake-guest") -> list[float]:
        """ICMP echo; returns round-trip times in seconds. Raises TooSlowError on loss."""
        target = IPv4Address(ip).packed
        mac = await self.arp_resolve(IPv4Address(self.next_hop(target)))
        ident = int.from_bytes(os.urandom(2), "big")
        rtts = []
        for seq in range(count):
            def is_reply(frame: bytes, seq=seq) -> bool:
                try:
                    ipv = Ipv4View(EthernetView(memoryview(frame)).payload)
                    if ipv.protocol != PROTO_ICMP or ipv.src != target:
                        return False
                    icmp = IcmpView(ipv.payload)
                    return icmp.type == ECHO_REPLY and icmp.ident == ident and icmp.sequence == seq
                except MalformedPacket:
                    return False

            send, receive = trio.open_memory_channel(4)
            entry = (is_reply, send)
            self._waiters.append(entry)
            try:
                start = trio.current_time()
                with trio.fail_after(timeout):
                    self.send_frame(icmp_frame(mac, self.mac, self.ip, target, ECHO_REQUEST, 0,
                                               struct.pack("!HH", ident, seq), payload))
                    await receive.receive()
                rtts.append(trio.current_time() - start)
            finally:
                self._waiters.remove(entry)
        return rtts


async def attach_fake_guest(switch, nursery: trio.Nursery, *, lease: bool = True, mac: bytes | None = None,
                            wrap=None, guest_class: type[FakeGuest] = FakeGuest) -> FakeGuest:
    """Plug a new fake guest into ``switch`` over an in-memory link, run it in
    ``nursery`` and (by default) lease it an address by DHCP. ``wrap(link)`` may wrap
    the switch's end in link middleware (fault injection, capture)."""
    from ..links.memory import memory_link_pair

    guest_end, switch_end = memory_link_pair(mtu=switch.config.mtu)
    switch.attach(wrap(switch_end) if wrap is not None else switch_end)
    guest = guest_class(guest_end, mac)
    await nursery.start(guest.run)
    if lease:
        await guest.dhcp()
    return guest
