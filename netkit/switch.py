"""The virtual switch: one port per guest link, MAC learning, port security.

Each attached link gets a reader task that takes frames in batches and feeds them to
``Switch.input`` synchronously (no task or channel hop per frame), and a sender task
that drains the link's queue. Frames for the gateway's MAC go to the gateway endpoint;
broadcast and unknown unicast are flooded; known unicast goes to its port.

Port security (identity comes from bindings):

- One port is one guest identity. A port sends from at most ``max_macs_per_port`` MACs,
  learned from what it sends, never from a MAC another port or the gateway owns. A new
  MAC beyond the limit replaces the port's oldest one, and that MAC's lease is released
  (a guest that changes its MAC, or a VM restarted on the same socket, gets a fresh
  lease instead of being locked out until the old one expires).
- The lease table is authoritative for addresses. A MAC may source IPv4 only from the
  address bound to it (a DHCP lease, an operator static lease or a reservation: see
  ``bind_ip``), or from 0.0.0.0 for DHCP (client port 68 to server port 67) -- also
  before it has any lease. ARP must carry the Ethernet source as sender MAC and the
  bound address as sender IP (0.0.0.0 only in a request: a probe, RFC 5227). Anything
  else -- claiming the gateway, the host alias, a NAT virtual IP, another guest's
  address or an address nobody holds -- is dropped and counted (``spoofed-ip-*``,
  ``spoofed-arp-*``), never delivered to the gateway nor forwarded or flooded to guests.
- Guests do not act as DHCP servers (UDP from port 67 is dropped: ``rogue-dhcp-server``),
  and only IPv4, ARP and IPv6 frames are switched.

The binding table (address -> MAC) is the gateway's only neighbour table, so it is
bounded by the lease table (the DHCP pool plus static leases). Violations are dropped
and counted, never raised.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import trio

from .config import Config, format_mac
from .links.base import Link, LinkClosed
from .policy import Policy
from .supervise import Supervisor

if TYPE_CHECKING:
    from .gateway import Gateway

__all__ = ["Switch", "Port", "SwitchError"]

log = logging.getLogger("netkit.switch")

_ETH_IPV4 = b"\x08\x00"
_ETH_ARP = b"\x08\x06"
_ETH_IPV6 = b"\x86\xdd"
_UNSPECIFIED_IP = b"\0\0\0\0"
#: ARP header for Ethernet/IPv4 (htype 1, ptype 0x0800, hlen 6, plen 4): the only kind
#: whose sender fields sit where the checks read them.
_ARP_ETH_IPV4 = b"\x00\x01\x08\x00\x06\x04"
_ARP_OP_REQUEST = b"\x00\x01"
_UDP = 17
#: IPv6 extension headers a guest's frame may carry before its upper-layer header
#: (hop-by-hop, routing, destination options; the fragment header is handled apart).
_IPV6_EXTENSIONS = frozenset((0, 43, 60))
_IPV6_FRAGMENT = 44
_ICMPV6 = 58
#: The most extension headers walked before a frame is refused (RFC 7112: the whole
#: header chain must come first; no guest needs a long one).
_IPV6_MAX_EXTENSIONS = 8
#: ICMPv6 messages only a router sends: Router Advertisement and Redirect.
_ICMPV6_ROUTER_ONLY = {134: "rogue-router-advert", 137: "rogue-redirect"}
_DHCPV6_SERVER_PORT = 547
_DHCP_SERVER_PORT = b"\x00\x43"
_DHCP_CLIENT_TO_SERVER = b"\x00\x44\x00\x43"


class SwitchError(Exception):
    """The switch refused an operation (for example: too many ports)."""


@dataclass(eq=False)
class Port:
    """One guest attachment: a link and what the switch knows about its sender."""

    id: int
    link: Link
    #: MACs this port sends from, oldest first (at most ``Config.max_macs_per_port``).
    macs: dict[bytes, None] = field(default_factory=dict)
    #: Set when the port's link is gone; frames for it are no longer delivered.
    detached: bool = False
    _done: trio.Event = field(default_factory=trio.Event, repr=False)

    #: A live capture (``netkit.links.middleware.PcapWriter``) taking every frame, or None.
    capture: object = None
    #: The switch's counters (``frames_out`` and ``drops``), so every send is counted.
    switch: "Switch | None" = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.link.name

    def send(self, frame, offload=None) -> bool:
        """Send a frame to this port's guest: the one way every component does it, so
        the live capture and the switch's ``frames_out`` / ``link-queue-full`` counters
        see every frame (NAT, services and flooding alike)."""
        if self.capture is not None:
            self.capture.write_frame(frame)
        accepted = self.link.send(frame, offload)
        switch = self.switch
        if switch is not None:
            if accepted:
                switch.frames_out += 1
            else:
                switch.drops["link-queue-full"] += 1
        return accepted

    async def wait_detached(self) -> None:
        await self._done.wait()

    def describe(self) -> dict:
        return {"id": self.id, "link": self.link.name, "macs": [format_mac(m) for m in sorted(self.macs)],
                "stats": dataclasses.asdict(self.link.statistics())}


class Switch:
    """MAC-learning switch; create it with ``netkit.open_switch`` rather than directly."""

    def __init__(self, config: Config, nursery: trio.Nursery, supervisor: Supervisor | None = None) -> None:
        self.config = config
        self._nursery = nursery
        #: Runs each port's reader (and is shared with every component by ``open_switch``):
        #: a link that fails ends its own port only. Its ``flow-errors`` show in statistics().
        self.supervisor = supervisor if supervisor is not None else Supervisor(nursery)
        self._ports: dict[int, Port] = {}
        self._port_ids = itertools.count(1)
        #: MAC -> port that owns it (learned from source addresses).
        self._mac_table: dict[bytes, Port] = {}
        #: MAC -> the only IPv4 address (packed) that MAC may send from, and the reverse
        #: (address -> MAC): the neighbour table. Both mirror the lease table's bound
        #: leases (set through ``bind_ip``), so they are bounded by it.
        self._ip_bindings: dict[bytes, bytes] = {}
        self._ip_owners: dict[bytes, bytes] = {}
        self.frames_in = 0
        self.frames_out = 0
        self.macs_relearned = 0
        self.drops: collections.Counter[str] = collections.Counter()
        #: The gateway endpoint frames to its MAC go to (wired by ``open_switch``).
        self.gateway: Gateway | None = None
        # The run-time handles ``open_switch`` built, set by it once (read by the API and
        # library users; no component finds another through these).
        self.tcp_nat = None  # netkit.nat.tcp.TcpNat
        self.udp_nat = None  # netkit.nat.udp.UdpNat
        self.icmp_nat = None  # netkit.nat.icmp.IcmpNat
        self.forwarder = None  # netkit.forward.PortForwarder
        self.dns = None  # netkit.dns.server.DnsService
        self.sntp = None  # netkit.ntp.SntpServer
        self.files = None  # netkit.runtime.FileService (9P), when shares are configured
        self.http_proxy = None  # netkit.http_proxy.HttpProxy
        self._detach_hooks: list[Callable[[Port], None]] = []
        self._mac_replaced_hooks: list[Callable[[Port, bytes], None]] = []
        self._unbound_hooks: list[Callable[[bytes], None]] = []
        self._batch_hooks: list[Callable[[], None]] = []
        self._capture = None
        #: Which destinations guests may reach (netkit.policy); install ``policy.hook`` to decide in Python.
        self.policy = Policy(config.allow, config.deny, config.default_deny)
        self._capture_path: str | None = None

    # ----- ports -----
    def attach(self, link: Link) -> Port:
        """Plug a link into the switch; its reader and sender run until it closes."""
        if len(self._ports) >= self.config.max_ports:
            self.drops["port-limit"] += 1
            raise SwitchError(f"switch has max_ports={self.config.max_ports} ports already")
        port = Port(next(self._port_ids), link, switch=self)
        port.capture = self._capture
        self._ports[port.id] = port
        log.info("port %d attached: %s", port.id, link.name)
        self.supervisor.start_soon(self._run_port, port, unit="port", name=f"port-{port.id}")
        return port

    async def attach_and_wait(self, link: Link) -> None:
        """Attach ``link`` and return when it has detached (for listeners' per-connection tasks)."""
        port = self.attach(link)
        await port.wait_detached()

    def on_detach(self, hook: Callable[[Port], None]) -> None:
        """Call ``hook(port)`` when a port goes away (flows it owned are torn down there)."""
        self._detach_hooks.append(hook)

    def on_mac_replaced(self, hook: Callable[[Port, bytes], None]) -> None:
        """Call ``hook(port, old_mac)`` when a new MAC on ``port`` displaces ``old_mac``
        (the gateway releases ``old_mac``'s lease there: one port, one identity)."""
        self._mac_replaced_hooks.append(hook)

    def on_address_unbound(self, hook: Callable[[bytes], None]) -> None:
        """Call ``hook(ip)`` when an address (packed) stops belonging to the MAC that held
        it (lease released or expired, MAC replaced, address moved to another MAC): flows
        opened under that identity are stale and are torn down there, so they can never
        be taken over, or block, whoever holds the address next."""
        self._unbound_hooks.append(hook)

    def on_batch_done(self, hook: Callable[[], None]) -> None:
        """Call ``hook()`` after each batch of frames from a link has been input, so
        protocol machines can coalesce their output (one ACK for many segments)."""
        self._batch_hooks.append(hook)

    def ports(self) -> list[Port]:
        return list(self._ports.values())

    async def _run_port(self, port: Port) -> None:
        link = port.link
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link.run_sender)
                try:
                    while True:
                        batch = await link.receive_batch()
                        for frame in batch:
                            self.input(port, frame)
                        for hook in self._batch_hooks:
                            hook()
                except LinkClosed:
                    pass
                nursery.cancel_scope.cancel()
        finally:
            self._detach(port)
            with trio.CancelScope(shield=True):
                await link.aclose()
            port._done.set()

    def _detach(self, port: Port) -> None:
        if port.detached:
            return
        port.detached = True
        self._ports.pop(port.id, None)
        for mac in port.macs:
            if self._mac_table.get(mac) is port:
                del self._mac_table[mac]
        self._call_hooks(self._detach_hooks, "port-detached", port)
        log.info("port %d detached: %s", port.id, port.link.name)

    # ----- IP port security -----
    def bind_ip(self, mac: bytes, ip: bytes | None) -> None:
        """Bind ``ip`` (packed) to ``mac``: the only IPv4 source ``mac`` may use, and the
        MAC the gateway sends ``ip``'s traffic to. None removes ``mac``'s binding (it
        may then send only DHCP from 0.0.0.0). One address has one MAC: binding it to
        ``mac`` unbinds whichever MAC held it before."""
        mac = bytes(mac)
        ip = None if ip is None else bytes(ip)
        old_ip = self._ip_bindings.pop(mac, None)
        if old_ip is not None and self._ip_owners.get(old_ip) == mac:
            del self._ip_owners[old_ip]
        if old_ip is not None and old_ip != ip:
            self._address_unbound(old_ip)
        if ip is None:
            return
        previous = self._ip_owners.get(ip)
        if previous is not None and previous != mac:
            self._ip_bindings.pop(previous, None)
            self._address_unbound(ip)
        self._ip_bindings[mac] = ip
        self._ip_owners[ip] = mac

    def _address_unbound(self, ip: bytes) -> None:
        self._call_hooks(self._unbound_hooks, "address-unbound", ip)

    def _call_hooks(self, hooks: list, unit: str, *args) -> None:
        """Tell every component of an event; one whose hook raises is counted and logged
        as a flow error, and the others are still told (a bug must not wedge the switch)."""
        for hook in hooks:
            try:
                hook(*args)
            except Exception as error:
                self.supervisor.failed(unit, error)

    def bound_ip(self, mac: bytes) -> bytes | None:
        """The address bound to ``mac`` (packed), or None."""
        return self._ip_bindings.get(mac)

    def mac_for_ip(self, ip: bytes) -> bytes | None:
        """The MAC an address is bound to (the neighbour table), or None."""
        return self._ip_owners.get(ip)

    def bindings(self) -> dict[bytes, bytes]:
        """A copy of the neighbour table: bound address (packed) -> MAC."""
        return dict(self._ip_owners)

    def port_for_mac(self, mac: bytes) -> Port | None:
        return self._mac_table.get(mac)

    # ----- the frame path -----
    def input(self, port: Port, frame: bytes) -> None:
        """Handle one frame a guest sent on ``port``. Never raises."""
        self.frames_in += 1
        if port.capture is not None:
            port.capture.write_frame(frame)
        if len(frame) < 14:
            self.drops["runt"] += 1
            return
        src = frame[6:12]
        if src not in port.macs and not self._learn(port, src):
            return
        ethertype = frame[12:14]
        if ethertype == _ETH_IPV4:
            # The hot path: one lookup and one compare for a guest sending from its address.
            if frame[26:30] != self._ip_bindings.get(src):
                if not self._unbound_ipv4_allowed(src, frame):
                    return
            elif frame[23] == _UDP and self._from_dhcp_server_port(frame):
                self.drops["rogue-dhcp-server"] += 1
                return
        elif ethertype == _ETH_ARP:
            if not self._arp_allowed(src, frame):
                return
        elif ethertype == _ETH_IPV6:
            if not self._ipv6_allowed(frame):
                return
        else:
            self.drops["ethertype"] += 1
            return
        dst = frame[0:6]
        gateway = self.gateway
        if gateway is not None and dst == gateway.mac:
            gateway.input(port, frame)
            return
        if dst[0] & 1:  # broadcast / multicast: every other port and the gateway
            for other in self._ports.values():
                if other is not port:
                    self._send(other, frame)
            if gateway is not None:
                gateway.input(port, frame)
            return
        target = self._mac_table.get(dst)
        if target is None:
            # Unknown unicast: flood to the other guests (the gateway only takes its own MAC).
            flooded = False
            for other in self._ports.values():
                if other is not port:
                    self._send(other, frame)
                    flooded = True
            if not flooded:
                self.drops["no-destination"] += 1
        elif target is port:
            self.drops["hairpin"] += 1
        else:
            self._send(target, frame)

    def _learn(self, port: Port, src: bytes) -> bool:
        if src[0] & 1:
            self.drops["multicast-source"] += 1
            return False
        gateway = self.gateway
        if gateway is not None and src == gateway.mac:
            self.drops["spoofed-mac"] += 1
            return False
        owner = self._mac_table.get(src)
        if owner is not None and owner is not port:
            self.drops["spoofed-mac"] += 1
            return False
        macs = port.macs
        while len(macs) >= self.config.max_macs_per_port:
            # One port is one guest: a new MAC (``ip link set address``, a VM restarted
            # on the same socket) replaces the oldest, whose lease is released, so a port
            # never holds more than max_macs_per_port identities (or leases).
            self._replace_mac(port, next(iter(macs)))
        macs[src] = None
        self._mac_table[src] = port
        log.debug("port %d learned %s", port.id, format_mac(src))
        return True

    def _replace_mac(self, port: Port, old: bytes) -> None:
        del port.macs[old]
        if self._mac_table.get(old) is port:
            del self._mac_table[old]
        self.macs_relearned += 1
        log.info("port %d: %s replaced by a new MAC", port.id, format_mac(old))
        self._call_hooks(self._mac_replaced_hooks, "mac-replaced", port, old)
        # Whatever the hooks did, the old MAC keeps no address.
        self.bind_ip(old, None)

    # ----- identity checks (the slow path: frames that are not from the bound address) -----
    def _unbound_ipv4_allowed(self, src: bytes, frame) -> bool:
        """IPv4 whose source is not ``src``'s bound address: only DHCP from 0.0.0.0."""
        if len(frame) < 34 or frame[14] >> 4 != 4:
            self.drops["malformed-ipv4"] += 1
            return False
        sip = frame[26:30]
        if sip == _UNSPECIFIED_IP:
            if self._is_dhcp_client_request(frame):
                return True
            self.drops["unspecified-source"] += 1
            return False
        self.drops[self._claim("spoofed-ip", src, sip)] += 1
        return False

    def _arp_allowed(self, src: bytes, frame) -> bool:
        if len(frame) < 42 or frame[14:20] != _ARP_ETH_IPV4:
            self.drops["arp-malformed"] += 1
            return False
        if frame[22:28] != src:
            self.drops["spoofed-arp-mac"] += 1
            return False
        sip = frame[28:32]
        if sip == self._ip_bindings.get(src):
            return True
        if sip == _UNSPECIFIED_IP and frame[20:22] == _ARP_OP_REQUEST:
            return True  # a probe (RFC 5227): asks, claims nothing
        self.drops[self._claim("spoofed-arp", src, sip)] += 1
        return False

    def _ipv6_allowed(self, frame) -> bool:
        """Guests are hosts, never routers (RFC 6105's RA guard): IPv6 between guests is
        switched, but a Router Advertisement or Redirect (which would make the sender
        another guest's router and DNS server, RDNSS) and a DHCPv6 server's reply are
        dropped and counted, wherever they hide behind extension headers. A chain that
        cannot be read to its upper-layer header in this frame (truncated, too long, or
        a first fragment without it: the RA-guard evasion of RFC 7113) is dropped too."""
        if len(frame) < 54 or frame[14] >> 4 != 6:
            self.drops["malformed-ipv6"] += 1
            return False
        header = frame[20]
        offset = 54
        for _ in range(_IPV6_MAX_EXTENSIONS):
            if header in _IPV6_EXTENSIONS:
                if len(frame) < offset + 2:
                    break
                header, offset = frame[offset], offset + (frame[offset + 1] + 1) * 8
            elif header == _IPV6_FRAGMENT:
                if len(frame) < offset + 8:
                    break
                if (frame[offset + 2] << 8 | frame[offset + 3]) & 0xFFF8:
                    return True  # a later fragment: useless without its first, checked here
                header, offset = frame[offset], offset + 8
            else:
                return self._ipv6_upper_layer_allowed(header, frame, offset)
        self.drops["malformed-ipv6"] += 1
        return False

    def _ipv6_upper_layer_allowed(self, header: int, frame, offset: int) -> bool:
        if header == _ICMPV6:
            if len(frame) < offset + 1:
                self.drops["malformed-ipv6"] += 1
                return False
            reason = _ICMPV6_ROUTER_ONLY.get(frame[offset])
            if reason is not None:
                self.drops[reason] += 1
                return False
        elif header == _UDP:
            if len(frame) < offset + 2:
                self.drops["malformed-ipv6"] += 1
                return False
            if frame[offset] << 8 | frame[offset + 1] == _DHCPV6_SERVER_PORT:
                self.drops["rogue-dhcpv6-server"] += 1
                return False
        return True

    def _claim(self, kind: str, src: bytes, sip: bytes) -> str:
        """The drop reason for ``src`` claiming address ``sip`` it is not bound to."""
        gateway = self.gateway
        if gateway is not None and sip in gateway.arp_owned:
            return kind + "-gateway"  # the gateway, the host alias or a NAT virtual IP
        owner = self._ip_owners.get(sip)
        if owner is not None and owner != src:
            return kind + "-guest"
        return kind + "-unassigned"

    @staticmethod
    def _udp_ports(frame) -> bytes | None:
        """Source and destination port of an unfragmented (or first-fragment) UDP datagram."""
        if frame[23] != _UDP or (frame[20] & 0x1F) or frame[21]:
            return None
        offset = 14 + (frame[14] & 0x0F) * 4
        ports = frame[offset:offset + 4]
        return ports if len(ports) == 4 else None

    def _is_dhcp_client_request(self, frame) -> bool:
        return self._udp_ports(frame) == _DHCP_CLIENT_TO_SERVER

    def _from_dhcp_server_port(self, frame) -> bool:
        ports = self._udp_ports(frame)
        return ports is not None and ports[:2] == _DHCP_SERVER_PORT

    def _send(self, port: Port, frame, offload=None) -> None:
        port.send(frame, offload)

    def deliver(self, dst_mac: bytes, frame, offload=None) -> bool:
        """Send a frame from the gateway towards a guest MAC (or flood a broadcast)."""
        if dst_mac[0] & 1:
            for p in self._ports.values():
                self._send(p, frame)
            return True
        port = self._mac_table.get(dst_mac)
        if port is None:
            self.drops["no-port-for-mac"] += 1
            return False
        self._send(port, frame, offload)
        return True

    # ----- live capture -----
    def start_capture(self, path: str, *, max_bytes: int | None = None) -> None:
        """Record every frame of every port (present and future) to a pcap file."""
        from .links.middleware import PcapWriter

        if self._capture is not None:
            raise SwitchError("a capture is already running; stop it first")
        self._capture = PcapWriter(path, max_bytes=max_bytes)
        self._capture_path = path
        for port in self._ports.values():
            port.capture = self._capture

    def stop_capture(self) -> str | None:
        """Stop the live capture; returns the file's path (None if none was running)."""
        writer = self._capture
        if writer is None:
            return None
        self._capture = None
        for port in self._ports.values():
            port.capture = None
        writer.close()
        return self._capture_path

    @property
    def capturing(self) -> bool:
        return self._capture is not None

    async def listen(self, listener) -> None:
        """Serve ``listener`` (anything with ``serve(on_link, task_status=...)``) in the
        switch's nursery; returns once it is listening. Each connection becomes a port."""
        await self._nursery.start(listener.serve, self.attach_and_wait)

    def leases(self) -> list:
        """Current DHCP leases (``netkit.dhcp.leases.Lease``)."""
        return self.gateway.leases.leases() if self.gateway else []

    def statistics(self) -> dict:
        return {
            "gateway": self.gateway.statistics() if self.gateway else None,
            "port_stats": [p.describe() for p in self._ports.values()],
            "ports": len(self._ports),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "macs_relearned": self.macs_relearned,
            "bindings": len(self._ip_owners),
            "drops": {k: v for k, v in self.drops.items() if v},
            **self.supervisor.statistics(),
        }
