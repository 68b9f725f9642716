"""The DHCP server (RFC 2131/2132), sans-I/O.

The gateway hands :meth:`DhcpServer.handle_untrusted` the UDP payload of a datagram to
port 67 and the Ethernet source MAC; it gets back the reply payload and where to send
it, or None. No sockets, no clock: ``now`` comes in with every call.

netkit is the only DHCP server on its virtual link, so it answers authoritatively: a
client in INIT-REBOOT, RENEWING or REBINDING that asks for an address the table has no
record of gets it if it is free (so guests keep their addresses across a netkit restart
without saved state), and a DHCPNAK otherwise. Relays are not supported: ``giaddr`` is
copied into replies but never used for addressing.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

import dpkt

from ..config import Config
from ..wire.errors import MalformedPacket
from . import options as o
from .leases import OFFERED, Lease, LeaseTable

__all__ = ["DhcpReply", "DhcpRequest", "DhcpServer", "BROADCAST_IP", "BROADCAST_MAC"]

BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHERNET = 1
#: The only bit of ``flags`` RFC 2131 defines; the rest must be zero.
FLAG_BROADCAST = 0x8000
#: BOOTP header (236 bytes) plus the magic cookie.
_MIN_MESSAGE_LEN = 240
#: RFC 1542 section 3.1.1: some relays and clients drop BOOTP messages shorter than this.
_MIN_REPLY_LEN = 300

BROADCAST_IP = IPv4Address("255.255.255.255")
BROADCAST_MAC = b"\xff" * 6
_ZERO_IP = IPv4Address(0)

#: What dpkt may raise on garbage besides its own errors: struct.error from a short
#: header, IndexError from an option code with no length byte after it.
_DPKT_PARSE_ERRORS = (dpkt.UnpackError, struct.error, IndexError, ValueError)


@dataclass(frozen=True, slots=True)
class DhcpReply:
    """A reply to send: UDP from gateway_ip:67 to ``dst_ip``:68, in a frame to ``dst_mac``."""

    payload: bytes
    dst_ip: IPv4Address
    dst_mac: bytes
    #: DHCPOFFER, DHCPACK or DHCPNAK (see ``netkit.dhcp.options``), for logs and tests.
    message_type: int = 0


@dataclass(frozen=True, slots=True)
class DhcpRequest:
    """The fields of a client message the server uses, validated.

    ``options`` maps each option code to its value, with repeated instances of one code
    concatenated (RFC 3396).
    """

    op: int
    xid: int
    flags: int
    ciaddr: IPv4Address
    giaddr: int
    chaddr: bytes
    message_type: int
    options: dict[int, bytes]

    @classmethod
    def parse_untrusted(cls, payload: bytes | memoryview) -> "DhcpRequest":
        """Parse a BOOTREQUEST carrying a DHCP message type; raise only MalformedPacket."""
        data = bytes(payload)
        if len(data) < _MIN_MESSAGE_LEN:
            raise MalformedPacket("DHCP message shorter than the BOOTP header and magic cookie")
        _check_option_lengths(memoryview(data)[_MIN_MESSAGE_LEN:])
        try:
            message = dpkt.dhcp.DHCP(data)
        except _DPKT_PARSE_ERRORS as e:
            raise MalformedPacket(f"DHCP options unparseable: {e.__class__.__name__}") from None
        if message.magic != o.MAGIC_COOKIE:
            raise MalformedPacket("no DHCP magic cookie (plain BOOTP is not served)")
        if message.op != BOOTREQUEST:
            raise MalformedPacket(f"op {message.op} is not BOOTREQUEST")
        if message.hrd != HTYPE_ETHERNET or message.hln != 6:
            raise MalformedPacket("hardware address is not Ethernet")
        option_values: dict[int, bytes] = {}
        for code, value in message.opts:
            option_values[code] = option_values.get(code, b"") + value
        message_type = option_values.get(o.OPT_MESSAGE_TYPE)
        if message_type is None or len(message_type) != 1:
            raise MalformedPacket("missing or malformed DHCP message type")
        return cls(op=message.op, xid=message.xid, flags=message.flags,
                   ciaddr=IPv4Address(message.ciaddr), giaddr=message.giaddr,
                   chaddr=bytes(message.chaddr[:6]), message_type=message_type[0],
                   options=option_values)

    def option_ip(self, code: int) -> IPv4Address | None:
        """An address-valued option, None if absent; MalformedPacket if not 4 bytes."""
        value = self.options.get(code)
        if value is None:
            return None
        if len(value) != 4:
            raise MalformedPacket(f"option {code} is {len(value)} bytes, not an IPv4 address")
        return IPv4Address(value)

    def hostname(self) -> str | None:
        """Option 12, if it is a plausible host name (else None: it is only informative)."""
        value = self.options.get(o.OPT_HOSTNAME, b"").rstrip(b"\0")
        if not value or len(value) > 253:
            return None
        try:
            text = value.decode("ascii")
        except UnicodeDecodeError:
            return None
        return text if text.isprintable() and " " not in text else None

    def client_id(self) -> bytes | None:
        """Option 61, kept for information (leases are keyed by MAC)."""
        value = self.options.get(o.OPT_CLIENT_ID)
        return value if value and len(value) <= 255 else None


def _check_option_lengths(region: memoryview) -> None:
    """Raise MalformedPacket if an option runs past the end of the message.

    dpkt silently shortens such an option to the bytes that are there, which would let
    a truncated message pass as a valid one.
    """
    position, end = 0, len(region)
    while position < end:
        code = region[position]
        if code == o.OPT_END:
            return
        if code == o.OPT_PAD:
            position += 1
            continue
        if position + 1 >= end or position + 2 + region[position + 1] > end:
            raise MalformedPacket(f"DHCP option {code} runs past the end of the message")
        position += 2 + region[position + 1]


class DhcpServer:
    """Answers DHCP for one subnet, allocating from a :class:`LeaseTable`.

    ``stats`` counts every message by type and every reason one was dropped or refused:
    received, discover, offer, pool_exhausted, request, request_selecting,
    request_init_reboot, request_renewing, request_other_server, ack, nak, decline,
    decline_ignored, release, release_ignored, inform, malformed, chaddr_mismatch,
    unexpected_type.
    """

    def __init__(self, config: Config, leases: LeaseTable) -> None:
        self.config = config
        self.leases = leases
        self.stats: collections.Counter[str] = collections.Counter()
        self._server_id = config.gateway_ip
        self._handlers = {
            o.DHCPDISCOVER: self._on_discover,
            o.DHCPREQUEST: self._on_request,
            o.DHCPDECLINE: self._on_decline,
            o.DHCPRELEASE: self._on_release,
            o.DHCPINFORM: self._on_inform,
        }
        self._network_options = self._build_network_options(config)

    # ----- timers (the gateway arms one for lease expiry) -----
    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should next run, or None."""
        return self.leases.next_expiry()

    def handle_timer(self, now: float) -> list[Lease]:
        """Expire leases; returns those that ended (see :meth:`LeaseTable.expire`)."""
        return self.leases.expire(now)

    # ----- input -----
    def handle_untrusted(self, payload: bytes | memoryview, *, src_mac: bytes,
                         now: float, client: object = None) -> DhcpReply | None:
        """Handle one message from a guest; return the reply to send, if any.

        Never raises on bad input: malformed messages, messages whose ``chaddr`` is not
        the Ethernet source (a guest must not take leases for other MACs) and server-only
        message types are counted in ``stats`` and dropped. ``client`` names the sender
        for per-client shares (the gateway passes the switch port's id).
        """
        self.stats["received"] += 1
        try:
            request = DhcpRequest.parse_untrusted(payload)
            # A multicast or all-zero chaddr could never receive a unicast reply, and
            # leasing to one would waste an address.
            if request.chaddr != bytes(src_mac) or request.chaddr[0] & 1 or not any(request.chaddr):
                self.stats["chaddr_mismatch"] += 1
                return None
            handler = self._handlers.get(request.message_type)
            if handler is None:
                self.stats["unexpected_type"] += 1
                return None
            self.stats[o.MESSAGE_TYPE_NAMES[request.message_type]] += 1
            if request.message_type == o.DHCPDECLINE:
                return self._on_decline(request, now, client)
            return handler(request, now)
        except MalformedPacket:
            self.stats["malformed"] += 1
            return None

    # ----- message handlers -----
    def _on_discover(self, request: DhcpRequest, now: float) -> DhcpReply | None:
        try:
            requested = request.option_ip(o.OPT_REQUESTED_IP)
        except MalformedPacket:
            requested = None  # only a hint in a DISCOVER; the exchange can go on without it
        lease = self.leases.offer(request.chaddr, now, requested_ip=requested,
                                  client_id=request.client_id())
        if lease is None:
            self.stats["pool_exhausted"] += 1
            return None
        self.stats["offer"] += 1
        return self._reply(request, o.DHCPOFFER, yiaddr=lease.ip, ciaddr=_ZERO_IP,
                           options=self._lease_options())

    def _on_request(self, request: DhcpRequest, now: float) -> DhcpReply | None:
        mac = request.chaddr
        server_id = request.option_ip(o.OPT_SERVER_ID)
        requested = request.option_ip(o.OPT_REQUESTED_IP)
        if server_id is not None:
            # SELECTING: the client broadcasts which server's offer it took.
            if server_id != self._server_id:
                self.stats["request_other_server"] += 1
                held = self.leases.lookup_mac(mac)
                if held is not None and held.state == OFFERED:
                    self.leases.release(mac, held.ip)
                return None
            self.stats["request_selecting"] += 1
            wanted = requested if requested is not None else request.ciaddr
            if wanted == _ZERO_IP:
                raise MalformedPacket("DHCPREQUEST (selecting) names no address")
        elif request.ciaddr != _ZERO_IP:
            # RENEWING (unicast) or REBINDING (broadcast): same answer either way.
            self.stats["request_renewing"] += 1
            wanted = request.ciaddr
        elif requested is not None:
            # INIT-REBOOT: a client that remembers its address asks to keep it.
            self.stats["request_init_reboot"] += 1
            wanted = requested
        else:
            raise MalformedPacket("DHCPREQUEST names no address")
        lease = self.leases.bind(mac, wanted, now, hostname=request.hostname(),
                                 client_id=request.client_id())
        if lease is None:
            self.stats["nak"] += 1
            return self._nak(request, f"{wanted} is not available to this client")
        self.stats["ack"] += 1
        return self._reply(request, o.DHCPACK, yiaddr=lease.ip, ciaddr=request.ciaddr,
                           options=self._lease_options())

    def _on_decline(self, request: DhcpRequest, now: float, client: object = None) -> None:
        server_id = request.option_ip(o.OPT_SERVER_ID)
        declined = request.option_ip(o.OPT_REQUESTED_IP)
        if declined is None:
            raise MalformedPacket("DHCPDECLINE names no address")
        if (server_id is not None and server_id != self._server_id) or \
                not self.leases.decline(request.chaddr, declined, now, client=client):
            self.stats["decline_ignored"] += 1
        return None

    def _on_release(self, request: DhcpRequest, now: float) -> None:
        server_id = request.option_ip(o.OPT_SERVER_ID)
        if request.ciaddr == _ZERO_IP:
            raise MalformedPacket("DHCPRELEASE names no address")
        if (server_id is not None and server_id != self._server_id) or \
                not self.leases.release(request.chaddr, request.ciaddr):
            self.stats["release_ignored"] += 1
        return None

    def _on_inform(self, request: DhcpRequest, now: float) -> DhcpReply:
        # The client has an address already and wants only the other parameters:
        # no yiaddr, no lease times (RFC 2131 section 3.4).
        self.stats["ack"] += 1
        return self._reply(request, o.DHCPACK, yiaddr=_ZERO_IP, ciaddr=request.ciaddr,
                           options=self._network_options)

    # ----- output -----
    def _nak(self, request: DhcpRequest, reason: str) -> DhcpReply:
        return self._reply(request, o.DHCPNAK, yiaddr=_ZERO_IP, ciaddr=_ZERO_IP,
                           options=[(o.OPT_MESSAGE, reason.encode("ascii", "replace"))])

    def _reply(self, request: DhcpRequest, message_type: int, *, yiaddr: IPv4Address,
               ciaddr: IPv4Address, options: list[tuple[int, bytes]]) -> DhcpReply:
        all_options = [(o.OPT_MESSAGE_TYPE, bytes([message_type])),
                       (o.OPT_SERVER_ID, self._server_id.packed), *options]
        message = dpkt.dhcp.DHCP(
            op=BOOTREPLY, hrd=HTYPE_ETHERNET, hln=6, hops=0, xid=request.xid, secs=0,
            flags=request.flags & FLAG_BROADCAST, ciaddr=int(ciaddr), yiaddr=int(yiaddr),
            siaddr=0, giaddr=request.giaddr, chaddr=request.chaddr + bytes(10),
            magic=o.MAGIC_COOKIE, opts=all_options)
        payload = bytes(message).ljust(_MIN_REPLY_LEN, b"\0")
        dst_ip, dst_mac = self._destination(request, message_type, yiaddr)
        return DhcpReply(payload, dst_ip, dst_mac, message_type)

    @staticmethod
    def _destination(request: DhcpRequest, message_type: int,
                     yiaddr: IPv4Address) -> tuple[IPv4Address, bytes]:
        """RFC 2131 section 4.1, for giaddr = 0 (no relays)."""
        if message_type == o.DHCPNAK:
            return BROADCAST_IP, BROADCAST_MAC
        if request.ciaddr != _ZERO_IP:
            return request.ciaddr, request.chaddr
        if request.flags & FLAG_BROADCAST or yiaddr == _ZERO_IP:
            return BROADCAST_IP, BROADCAST_MAC
        return yiaddr, request.chaddr

    def _lease_options(self) -> list[tuple[int, bytes]]:
        lease_seconds = self.config.lease_seconds
        return [
            (o.OPT_LEASE_TIME, o.encode_u32(lease_seconds)),
            (o.OPT_RENEWAL_TIME, o.encode_u32(lease_seconds // 2)),
            (o.OPT_REBINDING_TIME, o.encode_u32(lease_seconds * 7 // 8)),
            *self._network_options,
        ]

    @staticmethod
    def _build_network_options(config: Config) -> list[tuple[int, bytes]]:
        """The options every OFFER and ACK carries, computed once from the config."""
        gateway = config.gateway_ip.packed
        network_options = [
            (o.OPT_SUBNET_MASK, config.subnet.netmask.packed),
            (o.OPT_BROADCAST_ADDRESS, config.subnet.broadcast_address.packed),
            (o.OPT_ROUTER, gateway),
            (o.OPT_DNS_SERVERS, gateway),
        ]
        if config.domain_name:
            network_options.append((o.OPT_DOMAIN_NAME, config.domain_name.rstrip(".").encode("ascii")))
        if config.domain_search:
            network_options += o.split_long_option(o.OPT_DOMAIN_SEARCH,
                                                   o.encode_dns_names(config.domain_search))
        network_options += [
            (o.OPT_INTERFACE_MTU, o.encode_u16(config.mtu)),
            (o.OPT_NTP_SERVERS, gateway),
        ]
        return network_options
