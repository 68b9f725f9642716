"""The gateway endpoint: the switch's own station, with the gateway's and the host alias's IPs.

It answers ARP for the addresses it owns, ICMP echo to the gateway, and DHCP, and hands
every other IPv4 packet to exactly one handler: a service bound to a gateway port, or a
NAT handler for the protocol. Every frame is classified synchronously; input from a guest
is untrusted, so a malformed frame is counted under ``drops`` and dropped, never raised.

The switch has already checked the sender's identity (see ``netkit.switch``): every
frame here comes from its port's MAC and bound address (or 0.0.0.0 for DHCP). The
gateway learns no neighbours from what guests send: it reaches a guest address through
the switch's binding table, which mirrors the lease table.

The virtual subnet is not the host's: a packet to an address inside ``config.subnet``
that is not the gateway, the host alias or a ``--nat`` virtual IP is never NAT'd. It is
answered with ICMP host unreachable -- whether the address is unassigned or leased to
another guest (guests reach each other directly on the link, never through the
gateway) -- and counted (``to-unassigned``, ``to-guest-via-gateway``).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import struct
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Callable, Protocol

from .config import Config, format_mac
from .dhcp.leases import LeaseTable
from .dhcp.server import DhcpServer
from .ipfrag import Reassembler
from .supervise import Supervisor
from .wire import (ARP_REPLY, ARP_REQUEST, ArpPacket, IcmpView, Ipv4View, MalformedPacket, UdpView,
                   icmp_frame, udp_frame)
from .wire.ethernet import ETH_HEADER_LEN
from .wire.icmpv4 import DEST_UNREACHABLE, ECHO_REPLY, ECHO_REQUEST, UNREACH_HOST
from .wire.ipv4 import PROTO_ICMP, PROTO_TCP, PROTO_UDP

if TYPE_CHECKING:
    from .switch import Port, Switch

__all__ = ["Gateway", "PacketHandler"]

log = logging.getLogger("netkit.gateway")

_ETH_IPV4 = b"\x08\x00"
_ETH_ARP = b"\x08\x06"
_LIMITED_BROADCAST = b"\xff\xff\xff\xff"
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68


def mac_for_uuid(uuid: str) -> bytes:
    """A stable, locally administered unicast MAC for a vpnkit client UUID."""
    digest = hashlib.sha256(uuid.encode()).digest()
    return bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]


class PacketHandler(Protocol):
    """Takes an IPv4 packet the gateway classified as its own; must not raise."""

    def __call__(self, port: "Port", src_mac: bytes, ip: Ipv4View, now: float) -> None: ...


class Gateway:
    """The gateway's station on the switch. See the module docstring."""

    def __init__(self, config: Config, switch: "Switch", clock: Callable[[], float],
                 supervisor: Supervisor | None = None) -> None:
        self.config = config
        self.switch = switch
        self.clock = clock
        #: Counts and logs what fails while handling one frame or one service datagram
        #: (``flow-errors``); None: the switch's own.
        self.supervisor = supervisor if supervisor is not None else switch.supervisor
        self.mac = config.gateway_mac
        self.ip = config.gateway_ip.packed
        self.host_ip = config.host_ip.packed
        self.subnet_broadcast = config.subnet.broadcast_address.packed
        self.leases = LeaseTable(config)
        #: Called after anything that may have changed the lease table (state file writer).
        self.lease_listeners: list[Callable[[], None]] = []
        self.reassembler = Reassembler(max_bytes=config.reassembly_max_bytes, timeout=config.reassembly_timeout,
                                       guest_bytes=config.reassembly_guest_bytes)
        self.dhcp = DhcpServer(config, self.leases)
        #: Addresses the gateway answers ARP for: its own, the host alias, and NAT'd IPs in the subnet.
        self.arp_owned: set[bytes] = {self.ip, self.host_ip}
        for virtual, _real in config.nat:
            if virtual in config.subnet:
                self.arp_owned.add(virtual.packed)
        # The subnet as integers, for the one check that keeps its addresses off the host.
        self._subnet_mask = int(config.subnet.netmask)
        self._subnet_network = int(config.subnet.network_address)
        #: (protocol, port) on the gateway IP -> handler; services register here.
        self.services: dict[tuple[int, int], PacketHandler] = {}
        #: protocol -> handler for packets to any other destination (NAT).
        self.nat: dict[int, PacketHandler] = {}
        #: protocol -> handler for the gateway IP when no service owns the port
        #: (e.g. TCP answers RST, UDP answers ICMP port unreachable).
        self.unclaimed: dict[int, PacketHandler] = {}
        self.frames_in = 0
        self.drops: collections.Counter[str] = collections.Counter()
        self.counters: collections.Counter[str] = collections.Counter()

    # ----- services -----
    def register_udp_service(self, port: int, handler) -> None:
        """Serve UDP datagrams to the gateway's ``port``: ``handler(payload, client, reply)``
        is called synchronously with the payload, ``(guest_ip, guest_port)`` and a
        ``reply(bytes)`` function that answers the client (any number of times, later
        too). The handler must not block; spawn a task for slow work."""

        counter = f"udp-service-{port}"
        unit = f"udp-service-{port}"

        def deliver(port_: "Port", src_mac: bytes, ip: Ipv4View, now: float) -> None:
            udp = UdpView(ip.payload)
            if not port_.link.checksums_trusted and not udp.checksum_ok(ip.src, ip.dst):
                self.drops["udp-checksum"] += 1
                return
            guest_ip, guest_port = ip.src, udp.src_port

            def reply(payload: bytes) -> None:
                self.switch.deliver(src_mac, udp_frame(src_mac, self.mac, self.ip, guest_ip, port, guest_port,
                                                       payload))

            self.counters[counter] += 1
            try:
                handler(udp.payload, (IPv4Address(guest_ip), guest_port), reply)
            except Exception as error:  # this datagram fails; the service and the guest go on
                self.supervisor.failed(unit, error)

        self.services[(PROTO_UDP, port)] = deliver

    # ----- sending -----
    def send_ipv4(self, dst_mac: bytes, frame: bytes, offload=None) -> bool:
        return self.switch.deliver(dst_mac, frame, offload)

    def mac_for_ip(self, ip: bytes) -> bytes | None:
        """The MAC a guest address (packed) is bound to, from the lease table's bindings."""
        return self.switch.mac_for_ip(ip)

    @property
    def neighbors(self) -> dict[bytes, bytes]:
        """The neighbour table (bound address -> MAC); a copy, for inspection."""
        return self.switch.bindings()

    # ----- the frame path -----
    def input(self, port: "Port", frame: bytes) -> None:
        """One frame addressed to the gateway (or broadcast). Never raises."""
        self.frames_in += 1
        ethertype = frame[12:14]
        try:
            if ethertype == _ETH_IPV4:
                self._input_ipv4(port, frame)
            elif ethertype == _ETH_ARP:
                self._input_arp(port, frame)
            else:
                self.drops["ethertype"] += 1
        except MalformedPacket:
            self.drops["malformed"] += 1
        except Exception as error:  # a handler bug must never take the switch down
            self.drops["handler-error"] += 1
            self.supervisor.failed("frame", error)

    def _input_arp(self, port: "Port", frame: bytes) -> None:
        arp = ArpPacket.parse_untrusted(memoryview(frame)[ETH_HEADER_LEN:])
        src_mac = frame[6:12]
        if arp.sender_mac != src_mac:
            self.drops["arp-sender-mismatch"] += 1
            return
        if arp.operation == ARP_REQUEST and arp.target_ip in self.arp_owned:
            reply = ArpPacket(ARP_REPLY, self.mac, arp.target_ip, arp.sender_mac, arp.sender_ip)
            self.switch.deliver(src_mac, src_mac + self.mac + _ETH_ARP + reply.emit())
            self.counters["arp-replies"] += 1
        else:
            # Neighbours come from bindings, never from ARP; requests for other guests
            # were flooded to them.
            self.counters["arp-other"] += 1

    def _input_ipv4(self, port: "Port", frame: bytes) -> None:
        ip = Ipv4View(memoryview(frame)[ETH_HEADER_LEN:])
        if not port.link.checksums_trusted and not ip.header_checksum_ok():
            self.drops["ipv4-checksum"] += 1
            return
        src_mac = frame[6:12]
        now = self.clock()
        if ip.is_fragment:
            packet = self.reassembler.add(ip, now, port)  # per-port shares of the limit
            if packet is None:
                return  # held (counted in reassembler.stats) until the rest arrives
            ip = Ipv4View(memoryview(packet))
        dst = ip.dst
        protocol = ip.protocol
        if dst == self.ip:
            if protocol == PROTO_UDP:
                udp = UdpView(ip.payload)
                if udp.dst_port == DHCP_SERVER_PORT:
                    self._input_dhcp(port, src_mac, ip, udp, now)
                    return
                handler = self.services.get((PROTO_UDP, udp.dst_port))
            elif protocol == PROTO_TCP:
                if len(ip.payload) < 4:
                    raise MalformedPacket("TCP header truncated")
                handler = self.services.get((PROTO_TCP, struct.unpack_from("!H", ip.payload, 2)[0]))
            elif protocol == PROTO_ICMP:
                self._input_icmp_to_gateway(src_mac, ip)
                return
            else:
                handler = None
            if handler is None:
                handler = self.unclaimed.get(protocol)
            if handler is None:
                self.drops["no-service"] += 1
                return
            handler(port, src_mac, ip, now)
            return
        if dst == _LIMITED_BROADCAST or dst == self.subnet_broadcast:
            if protocol == PROTO_UDP:
                udp = UdpView(ip.payload)
                if udp.dst_port == DHCP_SERVER_PORT:
                    self._input_dhcp(port, src_mac, ip, udp, now)
                    return
            self.drops["broadcast"] += 1
            return
        if dst[0] >= 224:  # multicast and class E: never forwarded
            self.drops["multicast"] += 1
            return
        if (int.from_bytes(dst, "big") & self._subnet_mask) == self._subnet_network and dst not in self.arp_owned:
            self._unreachable_in_subnet(src_mac, ip, dst)
            return
        handler = self.nat.get(protocol)
        if handler is None:
            self.drops["no-route"] += 1
            return
        handler(port, src_mac, ip, now)

    def _unreachable_in_subnet(self, src_mac: bytes, ip: Ipv4View, dst: bytes) -> None:
        """A packet to a virtual-subnet address the gateway does not own: never a host
        connect(); ICMP host unreachable, as a router whose ARP for it went unanswered."""
        self.drops["to-guest-via-gateway" if self.switch.mac_for_ip(dst) is not None else "to-unassigned"] += 1
        if ip.protocol == PROTO_ICMP:
            icmp = IcmpView(ip.payload)
            if icmp.type != ECHO_REQUEST:
                return  # never an ICMP error about an ICMP error (RFC 1122 3.2.2)
        # The original IP header and the first 8 bytes of its payload (RFC 792).
        quoted = bytes(ip.buf[:ip.header_len + 8])
        frame = icmp_frame(src_mac, self.mac, self.ip, ip.src, DEST_UNREACHABLE, UNREACH_HOST, b"\0\0\0\0",
                           quoted)
        self.switch.deliver(src_mac, frame)
        self.counters["icmp-host-unreachable"] += 1

    def _input_icmp_to_gateway(self, src_mac: bytes, ip: Ipv4View) -> None:
        icmp = IcmpView(ip.payload)
        if not icmp.checksum_ok():
            self.drops["icmp-checksum"] += 1
            return
        if icmp.type != ECHO_REQUEST:
            self.drops["icmp-type"] += 1
            return
        frame = icmp_frame(src_mac, self.mac, self.ip, ip.src, ECHO_REPLY, 0, icmp.rest, icmp.body,
                           ident=ip.ident)
        self.switch.deliver(src_mac, frame)
        self.counters["icmp-echo-replies"] += 1

    def _input_dhcp(self, port: "Port", src_mac: bytes, ip: Ipv4View, udp: UdpView, now: float) -> None:
        if not udp.checksum_ok(ip.src, ip.dst):  # always: DHCP is rare and a partial sum is never sent
            self.drops["udp-checksum"] += 1
            return
        reply = self.dhcp.handle_untrusted(udp.payload, src_mac=src_mac, now=now, client=port.id)
        self._sync_binding(src_mac)
        self._leases_changed()
        if reply is None:
            return
        frame = udp_frame(reply.dst_mac, self.mac, self.ip, reply.dst_ip.packed, DHCP_SERVER_PORT,
                          DHCP_CLIENT_PORT, reply.payload)
        self.switch.deliver(reply.dst_mac, frame)

    # ----- leases and port security -----
    def _sync_binding(self, mac: bytes) -> None:
        """Make the switch's binding for ``mac`` match its lease (bound leases only)."""
        lease = self.leases.lookup_mac(mac)
        if lease is not None and lease.state == "bound":
            self.switch.bind_ip(mac, lease.ip.packed)
        else:
            self.switch.bind_ip(mac, None)

    def mac_replaced(self, port: "Port", old_mac: bytes) -> None:
        """One port, one identity: a new MAC on ``port`` released ``old_mac``'s lease."""
        lease = self.leases.release_mac(old_mac)
        if lease is not None:
            log.info("port %d: released %s of replaced MAC %s", port.id, lease.ip, format_mac(old_mac))
            self.counters["leases-released-mac-replaced"] += 1
        self._sync_binding(old_mac)
        if lease is not None:
            self._leases_changed()

    def reserve(self, mac: bytes, ip: IPv4Address | None = None, uuid: str | None = None):
        """Bind an address to ``mac`` without a DHCP exchange (static guest config)."""
        lease = self.leases.reserve(mac, self.clock(), ip=ip, uuid=uuid)
        self._sync_binding(mac)
        self._leases_changed()
        return lease

    def use_lease_table(self, table: LeaseTable) -> None:
        """Adopt a restored lease table (from the state file) and its bindings."""
        self.leases = table
        self.dhcp = DhcpServer(self.config, table)
        for lease in table.leases():
            self._sync_binding(lease.mac)

    def _leases_changed(self) -> None:
        for listener in self.lease_listeners:
            listener()

    def allocate_for_uuid(self, uuid: str, preferred_ip: IPv4Address | None) -> bytes:
        """The MAC for a vpnkit client: derived from its UUID, so a reconnect (even after
        a restart) gets the same MAC and therefore the same lease. A preferred IP is
        reserved for it; a conflict raises ``AllocationError`` (sent as a Disconnect)."""
        from .links.vpnkit import AllocationError
        from .dhcp.leases import LeaseError

        mac = mac_for_uuid(uuid)
        self.leases.associate_uuid(uuid, mac)
        if preferred_ip is not None:
            try:
                self.reserve(mac, preferred_ip, uuid)
            except LeaseError as e:
                raise AllocationError(str(e)) from None
        return mac

    def expire_leases(self) -> None:
        expired = self.leases.expire(self.clock())
        for lease in expired:
            log.info("lease expired: %s %s", format_mac(lease.mac), lease.ip)
            self._sync_binding(lease.mac)
        if expired:
            self._leases_changed()

    def port_detached(self, port: "Port") -> None:
        """A port detached: its share of fragment reassembly goes with it."""
        self.reassembler.forget(port)

    def statistics(self) -> dict:
        return {
            "frames_in": self.frames_in,
            "drops": {k: v for k, v in self.drops.items() if v},
            "counters": dict(self.counters),
            "dhcp": {**self.dhcp.stats, "quarantine_evictions": self.leases.quarantine_evictions},
            "reassembly": dict(self.reassembler.stats),
        }
