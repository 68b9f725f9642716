"""UDP NAT: one host UDP socket per guest (address, port) flow.

Mapping is endpoint-independent (RFC 4787): a flow's one host socket sends to every
destination the guest addresses from that port, and datagrams from *any* remote peer
that reach the socket go back to the guest, so hole punching works. Replies appear to
come from the peer's virtual address (host loopback as the host alias, NAT'd IPs as
their virtual IPs).

Flows close after ``udp_idle_timeout`` without traffic either way. Each guest may hold
``udp_max_flows_per_guest`` (beyond, its own least recently used flow is evicted) and
all together ``udp_max_flows`` (beyond, the guest holding the most gives up its least
recently used): one guest's flood never moves another guest's flows. Each flow's reader
runs under the switch's supervisor, so a failing flow is released alone. ICMP errors the host
receives for a flow (port unreachable, time exceeded, ...) come back to the guest as
ICMP errors quoting its datagram. Datagrams larger than the guest's MTU are fragmented.
"""

from __future__ import annotations

import collections
import logging
import socket
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

import trio

from ..config import Config
from ..supervise import Supervisor
from ..wire import Ipv4View, UdpView, icmp_frame, udp_frame
from ..wire.frames import fragment_frames
from ..wire.icmpv4 import DEST_UNREACHABLE, UNREACH_ADMIN, UNREACH_PORT
from ..wire.ipv4 import PROTO_UDP
from .errqueue import error_frame_for_guest, read_errors
from .flowtable import IdleFlowTable
from .gate import MAX_ROUTES_PER_FLOW, UNREACHABLE, HostGate, Refusal
from .host import translate_source

if TYPE_CHECKING:
    from ..gateway import Gateway
    from ..switch import Port

__all__ = ["UdpNat", "UdpFlow"]


def _flow_port(flow) -> "Port":
    """A flow's owner for the table's per-guest share: its guest's switch port."""
    return flow.port


log = logging.getLogger("netkit.nat.udp")

#: Mark destinations the gate refused: by policy (ICMP admin-prohibited), or because
#: nothing is there (the gateway, a disabled host alias: ICMP port unreachable).
_DENIED = object()
_UNREACHABLE = object()
#: Most datagrams read from one flow socket before yielding to other tasks.
_READ_BATCH = 64


@dataclass(eq=False)
class UdpFlow:
    port: "Port"
    guest_mac: bytes
    guest_ip: bytes
    guest_port: int
    sock: socket.socket
    created: float
    last_active: float
    datagrams_to_host: int = 0
    datagrams_to_guest: int = 0
    bytes_to_host: int = 0
    bytes_to_guest: int = 0
    closed: bool = False
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: (virtual IP, port) -> where datagrams really go (or a refusal mark), decided once by the gate.
    targets: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "protocol": "udp",
            "guest": f"{IPv4Address(self.guest_ip)}:{self.guest_port}",
            "destination": "*",
            "state": "open",
            "bytes_to_host": self.bytes_to_host,
            "bytes_to_guest": self.bytes_to_guest,
        }


class UdpNat:
    """The UDP handler of a gateway (packets to destinations other than the gateway)."""

    def __init__(self, config: Config, gateway: "Gateway", nursery: trio.Nursery, supervisor: Supervisor,
                 gate: HostGate) -> None:
        self.config = config
        self.gateway = gateway
        self.nursery = nursery
        #: Runs each flow's reader: one that fails is released alone (counted, logged).
        self.supervisor = supervisor
        #: The one way out: translation, policy, host sockets (shared by every path out).
        self.gate = gate
        self.counters: collections.Counter[str] = collections.Counter()
        #: (guest IP, guest port) -> flow.
        self.flows: IdleFlowTable[tuple[bytes, int], UdpFlow] = IdleFlowTable(
            max_flows=config.udp_max_flows, idle_timeout=config.udp_idle_timeout, release=self._release,
            counters=self.counters, max_flows_per_owner=config.udp_max_flows_per_guest, owner=_flow_port)
        #: (virtual IP, port) -> ``handler(ip, udp)`` for datagrams that answer a port
        #: forward rather than open a flow of their own (see netkit.forward).
        self.reverse: dict[tuple[bytes, int], object] = {}
        nursery.start_soon(self.flows.run, name="udp-expiry")

    # ----- guest -> host -----
    def input(self, port: "Port", src_mac: bytes, ip: Ipv4View, now: float) -> None:
        udp = UdpView(ip.payload)
        if not port.link.checksums_trusted and not udp.checksum_ok(ip.src, ip.dst):
            self.counters["bad-checksum"] += 1
            return
        if self.reverse:
            handler = self.reverse.get((ip.dst, udp.dst_port))
            if handler is not None:
                handler(ip, udp)
                return
        key = (ip.src, udp.src_port)
        flow = self.flows.get(key)
        if flow is not None and flow.port is not port:
            self.counters["wrong-port"] += 1
            return
        destination = (ip.dst, udp.dst_port)
        # The gate decides once per flow and destination; later datagrams use its answer.
        target = flow.targets.get(destination) if flow is not None else None
        if target is None:
            target = self._decide(port, ip, udp)
        if target is _UNREACHABLE:  # the gateway or a disabled host alias: nobody serves it
            self.port_unreachable(port, src_mac, ip, now)
            return
        if target is _DENIED:
            self._prohibited(port, src_mac, ip)
            return
        if flow is None:
            flow = self._open_flow(port, src_mac, ip.src, udp.src_port, now)
            if flow is None:
                return
        targets = flow.targets
        if destination not in targets:
            if len(targets) >= MAX_ROUTES_PER_FLOW:
                targets.clear()
            targets[destination] = target
        flow.last_active = now
        payload = udp.payload
        try:
            flow.sock.sendto(payload, target)
        except BlockingIOError:
            self.counters["host-send-dropped"] += 1
            return
        except OSError as e:
            self.counters["host-send-errors"] += 1
            log.debug("udp sendto %s failed: %s", target, e)
            return
        except Exception as error:  # a broken flow ends alone
            self.supervisor.failed("udp-nat", error)
            self.flows.remove(flow)
            return
        flow.datagrams_to_host += 1
        flow.bytes_to_host += len(payload)

    def _decide(self, port: "Port", ip: Ipv4View, udp: UdpView):
        """The gate's answer for one destination: a sendto() address, or a refusal marker."""
        route = self.gate.route("udp", IPv4Address(ip.src), IPv4Address(ip.dst), udp.dst_port,
                                switch_port=port.id)
        if route is UNREACHABLE:
            return _UNREACHABLE
        return _DENIED if type(route) is Refusal else (str(route.address), route.port)

    def _prohibited(self, port: "Port", src_mac: bytes, ip: Ipv4View) -> None:
        self.counters["policy-denied"] += 1
        port.send(icmp_frame(src_mac, self.gateway.mac, self.gateway.ip, ip.src, DEST_UNREACHABLE, UNREACH_ADMIN,
                             b"\0\0\0\0", bytes(ip.buf[:ip.header_len + 8])))

    def _open_flow(self, port: "Port", src_mac: bytes, guest_ip: bytes, guest_port: int,
                   now: float) -> UdpFlow | None:
        try:
            sock = self.gate.udp_socket()
        except OSError as e:
            self.counters["socket-errors"] += 1
            log.warning("cannot create a UDP socket for a guest flow: %s", e)
            return None
        flow = UdpFlow(port, src_mac, guest_ip, guest_port, sock, now, now)
        self.flows.add((guest_ip, guest_port), flow, now)
        self.supervisor.start_soon(self._read_host, flow, unit="udp-nat", on_error=lambda: self.flows.remove(flow))
        return flow

    # ----- host -> guest -----
    async def _read_host(self, flow: UdpFlow) -> None:
        # A released flow's socket is closed (its fd number may already belong to another
        # socket): check ``flow.closed`` before every use, since a release can happen
        # before this task first runs, or while it is already scheduled to wake with data.
        sock = flow.sock
        with flow.cancel_scope:
            while not flow.closed:
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    return
                for _ in range(_READ_BATCH):
                    if flow.closed:
                        return
                    try:
                        data, (addr, peer_port) = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    except OSError:
                        # IP_RECVERR: an ICMP error arrived for something we sent.
                        self._icmp_errors(flow)
                        continue
                    self._to_guest(flow, IPv4Address(addr), peer_port, data)

    def _to_guest(self, flow: UdpFlow, real_src: IPv4Address, src_port: int, data: bytes) -> None:
        virtual = translate_source(self.config, real_src).packed
        flow.last_active = trio.current_time()
        flow.datagrams_to_guest += 1
        flow.bytes_to_guest += len(data)
        frame = udp_frame(flow.guest_mac, self.gateway.mac, virtual, flow.guest_ip, src_port, flow.guest_port, data,
                          ident=flow.datagrams_to_guest)
        for piece in fragment_frames(frame, self.config.mtu):
            flow.port.send(piece)

    def _icmp_errors(self, flow: UdpFlow) -> None:
        for error in read_errors(flow.sock):
            real_dst, dst_port = error.destination
            rest = struct.pack("!I", error.info & 0xFFFF if error.type == DEST_UNREACHABLE else 0)  # next-hop MTU
            flow.port.send(error_frame_for_guest(
                self.config, self.gateway.mac, flow.guest_mac, flow.guest_ip, error.type, error.code, rest, real_dst,
                error.offender, PROTO_UDP, struct.pack("!HHHH", flow.guest_port, dst_port, 8, 0)))
            self.counters[f"icmp-errors-{error.type}/{error.code}"] += 1

    def port_unreachable(self, port: "Port", src_mac: bytes, ip: Ipv4View, now: float) -> None:
        """No one serves this UDP port (on the gateway, or a disabled host alias)."""
        self.counters["port-unreachable"] += 1
        quoted = bytes(ip.buf[:ip.header_len + 8])
        port.send(icmp_frame(src_mac, self.gateway.mac, ip.dst, ip.src, DEST_UNREACHABLE, UNREACH_PORT,
                                  b"\0\0\0\0", quoted))

    # ----- lifetime -----
    def _release(self, flow: UdpFlow) -> None:
        flow.closed = True
        flow.cancel_scope.cancel()
        trio.lowlevel.notify_closing(flow.sock)
        flow.sock.close()

    def port_detached(self, port: "Port") -> None:
        self.flows.remove_owner(port)

    def address_unbound(self, ip: bytes) -> None:
        """``ip`` no longer belongs to the guest that opened flows from it: release them
        (rare: a lease ended or moved), so the next holder starts clean."""
        self.flows.remove_if(lambda flow: flow.guest_ip == ip)

    def close(self) -> None:
        self.flows.clear()

    def statistics(self) -> dict:
        return {"flows": len(self.flows), **self.counters}
