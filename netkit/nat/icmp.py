"""ICMP echo NAT: guest pings become host pings.

Preferred: one unprivileged ping socket (``SOCK_DGRAM``/``IPPROTO_ICMP``) per guest
(address, identifier) flow; the kernel picks the identifier on the wire and we map it
back. When ``net.ipv4.ping_group_range`` forbids ping sockets, one shared raw socket
carries every flow, each with an identifier we allocate. When neither is allowed, a
clear log line says so once and echo requests are dropped (counted).

Destination unreachable and time exceeded errors the host receives for a flow are
translated back to the guest, quoting its echo request.
"""

from __future__ import annotations

import collections
import itertools
import logging
import socket
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

import trio

from ..config import Config
from ..supervise import Supervisor
from ..wire import IcmpView, Ipv4View, MalformedPacket, icmp_frame
from ..wire.checksum import checksum
from ..wire.icmpv4 import DEST_UNREACHABLE, ECHO_REPLY, ECHO_REQUEST, TIME_EXCEEDED, UNREACH_ADMIN
from ..wire.ipv4 import PROTO_ICMP
from .errqueue import error_frame_for_guest, read_errors
from .flowtable import IdleFlowTable
from .gate import DENIED, MAX_ROUTES_PER_FLOW, UNREACHABLE, HostGate
from .host import translate_source

if TYPE_CHECKING:
    from ..gateway import Gateway
    from ..switch import Port

__all__ = ["IcmpNat"]


def _flow_port(flow) -> "Port":
    """A flow's owner for the table's per-guest share: its guest's switch port."""
    return flow.port


log = logging.getLogger("netkit.nat.icmp")

#: Most messages read from one socket before yielding to other tasks.
_READ_BATCH = 64


@dataclass(eq=False)
class EchoFlow:
    port: "Port"
    guest_mac: bytes
    guest_ip: bytes
    guest_ident: int
    last_active: float
    #: Ping-socket mode: the flow's own socket. Raw mode: None (the shared socket).
    sock: socket.socket | None = None
    #: Raw mode: the identifier we put on the wire.
    wire_ident: int = 0
    requests: int = 0
    replies: int = 0
    closed: bool = False
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Destination (packed, as the guest addressed it) -> the gate's Route or Refusal,
    #: decided once per destination, not per echo request (bounded).
    routes: dict = field(default_factory=dict)


class IcmpNat:
    def __init__(self, config: Config, gateway: "Gateway", nursery: trio.Nursery, supervisor: Supervisor,
                 gate: HostGate) -> None:
        self.config = config
        self.gateway = gateway
        self.nursery = nursery
        #: Runs the socket readers: a failing flow is released alone (counted, logged).
        self.supervisor = supervisor
        #: The one way out: translation, policy, host sockets (shared by every path out).
        self.gate = gate
        self._by_wire_ident: dict[int, EchoFlow] = {}
        self._idents = itertools.cycle(range(1, 0x10000))
        self._raw: socket.socket | None = None
        self._mode: str | None = None  # "ping", "raw" or "none", decided on first use
        self.counters: collections.Counter[str] = collections.Counter()
        #: (guest IP, guest identifier) -> flow.
        self.flows: IdleFlowTable[tuple[bytes, int], EchoFlow] = IdleFlowTable(
            max_flows=config.icmp_max_flows, idle_timeout=config.icmp_idle_timeout, release=self._release,
            counters=self.counters, max_flows_per_owner=config.icmp_max_flows_per_guest, owner=_flow_port)
        nursery.start_soon(self.flows.run, name="icmp-expiry")

    # ----- guest -> host -----
    def input(self, port: "Port", src_mac: bytes, ip: Ipv4View, now: float) -> None:
        icmp = IcmpView(ip.payload)
        if not icmp.checksum_ok():
            self.counters["bad-checksum"] += 1
            return
        if icmp.type != ECHO_REQUEST:
            self.counters["not-echo"] += 1
            return
        key = (ip.src, icmp.ident)
        flow = self.flows.get(key)
        if flow is not None and flow.port is not port:
            self.counters["wrong-port"] += 1
            return
        route = flow.routes.get(ip.dst) if flow is not None else None
        if route is None:
            route = self.gate.route("icmp", IPv4Address(ip.src), IPv4Address(ip.dst), 0, switch_port=port.id)
        if route is UNREACHABLE:
            self.counters["no-destination"] += 1
            return
        if route is DENIED:
            self.counters["policy-denied"] += 1
            port.send(icmp_frame(src_mac, self.gateway.mac, self.gateway.ip, ip.src, DEST_UNREACHABLE, UNREACH_ADMIN,
                                 b"\0\0\0\0", bytes(ip.buf[:ip.header_len + 8])))
            if flow is not None:
                self._remember(flow, ip.dst, route)
            return
        real = route.address
        if flow is None:
            flow = self._open_flow(port, src_mac, ip.src, icmp.ident, now)
            if flow is None:
                return
        self._remember(flow, ip.dst, route)
        flow.last_active = now
        body = bytes(icmp.body)
        try:
            if flow.sock is not None:
                # The kernel sets identifier and checksum of ping-socket messages.
                flow.sock.sendto(struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, 0, icmp.sequence) + body,
                                 (str(real), 0))
            else:
                msg = bytearray(struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, flow.wire_ident, icmp.sequence) + body)
                struct.pack_into("!H", msg, 2, checksum(msg))
                self._raw.sendto(msg, (str(real), 0))
        except OSError as e:
            self.counters["host-send-errors"] += 1
            log.debug("echo to %s failed: %s", real, e)
            return
        except Exception as error:  # a broken flow ends alone
            self.supervisor.failed("icmp-nat", error)
            self.flows.remove(flow)
            return
        flow.requests += 1
        self.counters["echo-requests"] += 1

    @staticmethod
    def _remember(flow: EchoFlow, destination: bytes, route) -> None:
        routes = flow.routes
        if destination not in routes:
            if len(routes) >= MAX_ROUTES_PER_FLOW:
                routes.clear()
            routes[destination] = route

    def _open_flow(self, port: "Port", src_mac: bytes, guest_ip: bytes, ident: int, now: float) -> EchoFlow | None:
        if self._mode is None:
            self._choose_mode()
        if self._mode == "none":
            self.counters["no-icmp-socket"] += 1
            return None
        flow = EchoFlow(port, src_mac, guest_ip, ident, now)
        if self._mode == "ping":
            try:
                flow.sock, _raw = self.gate.icmp_echo_socket()
            except OSError as e:
                self.counters["socket-errors"] += 1
                log.warning("cannot create a ping socket: %s", e)
                return None
            self.supervisor.start_soon(self._read_ping_socket, flow, unit="icmp-nat",
                                       on_error=lambda: self.flows.remove(flow))
        else:
            for _ in range(0x10000):
                wire = next(self._idents)
                if wire not in self._by_wire_ident:
                    break
            else:
                self.counters["ident-exhausted"] += 1
                return None
            flow.wire_ident = wire
            self._by_wire_ident[wire] = flow
        self.flows.add((guest_ip, ident), flow, now)
        return flow

    def prepare(self) -> None:
        """Open the echo socket now (before a process drops root, which may forbid it)."""
        if self._mode is None:
            self._choose_mode()

    def _choose_mode(self) -> None:
        try:
            sock, raw = self.gate.icmp_echo_socket()
        except OSError as e:
            self._mode = "none"
            log.warning("ICMP echo is disabled: neither a ping socket (net.ipv4.ping_group_range) nor a raw "
                        "socket (CAP_NET_RAW) is permitted: %s", e)
            return
        if raw:
            self._mode = "raw"
            self._raw = sock
            self.supervisor.start_soon(self._read_raw_socket, sock, unit="icmp-nat-raw",
                                       on_error=self._raw_failed)
            log.info("ICMP echo through a raw socket (ping sockets are not permitted for this user)")
        else:
            self._mode = "ping"
            sock.close()

    # ----- host -> guest -----
    async def _read_ping_socket(self, flow: EchoFlow) -> None:
        # As for UDP flows: a released flow's socket is closed, so ``flow.closed`` is
        # checked before every use (the release may come before this task first runs, or
        # while it is scheduled to wake with data).
        sock = flow.sock
        with flow.cancel_scope:
            while not flow.closed:
                try:
                    await trio.lowlevel.wait_readable(sock)
                except trio.ClosedResourceError:
                    return
                for _ in range(_READ_BATCH):  # bounded: a socket that keeps failing still yields
                    if flow.closed:
                        return
                    try:
                        data, (addr, _port) = sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    except OSError:
                        for error in read_errors(sock):
                            self._error_to_guest(flow, error.type, error.code, error.destination[0], error.offender)
                        continue
                    try:
                        reply = IcmpView(memoryview(data))
                    except MalformedPacket:
                        continue
                    if reply.type == ECHO_REPLY:
                        self._reply_to_guest(flow, IPv4Address(addr), reply.sequence, reply.body)

    async def _read_raw_socket(self, sock: socket.socket) -> None:
        while self._raw is sock:
            try:
                await trio.lowlevel.wait_readable(sock)
            except trio.ClosedResourceError:
                return
            for _ in range(_READ_BATCH):
                if self._raw is not sock:
                    return
                try:
                    data, (addr, _port) = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                self._raw_input(data, IPv4Address(addr))

    def _raw_failed(self) -> None:
        """The shared raw socket's reader failed: every flow on it is gone. Close it; the
        next echo request chooses a socket afresh."""
        self.flows.clear()
        self._close_raw()
        self._mode = None

    def _raw_input(self, data: bytes, source: IPv4Address) -> None:
        try:
            ip = Ipv4View(memoryview(data))
            icmp = IcmpView(ip.payload)
            if icmp.type == ECHO_REPLY:
                flow = self._by_wire_ident.get(icmp.ident)
                if flow is not None:
                    self._reply_to_guest(flow, source, icmp.sequence, icmp.body)
            elif icmp.type in (DEST_UNREACHABLE, TIME_EXCEEDED):
                quoted_ip = Ipv4View(icmp.body)
                quoted = IcmpView(quoted_ip.payload) if len(quoted_ip.payload) >= 8 else None
                if quoted is not None and quoted.type == ECHO_REQUEST:
                    flow = self._by_wire_ident.get(quoted.ident)
                    if flow is not None:
                        self._error_to_guest(flow, icmp.type, icmp.code, IPv4Address(quoted_ip.dst), source,
                                             quoted.sequence)
        except MalformedPacket:
            self.counters["raw-malformed"] += 1

    def _reply_to_guest(self, flow: EchoFlow, real_src: IPv4Address, sequence: int, body) -> None:
        flow.last_active = trio.current_time()
        flow.replies += 1
        self.counters["echo-replies"] += 1
        src = translate_source(self.config, real_src).packed
        flow.port.send(icmp_frame(flow.guest_mac, self.gateway.mac, src, flow.guest_ip, ECHO_REPLY, 0,
                                       struct.pack("!HH", flow.guest_ident, sequence), body))

    def _error_to_guest(self, flow: EchoFlow, icmp_type: int, code: int, real_dst: IPv4Address,
                        offender: IPv4Address | None, sequence: int = 0) -> None:
        if icmp_type not in (DEST_UNREACHABLE, TIME_EXCEEDED):
            return
        echo_head = struct.pack("!BBHHH", ECHO_REQUEST, 0, 0, flow.guest_ident, sequence)
        flow.port.send(error_frame_for_guest(self.config, self.gateway.mac, flow.guest_mac, flow.guest_ip, icmp_type,
                                             code, b"\0\0\0\0", real_dst, offender, PROTO_ICMP, echo_head))
        self.counters[f"icmp-errors-{icmp_type}/{code}"] += 1

    # ----- lifetime -----
    def _release(self, flow: EchoFlow) -> None:
        flow.closed = True
        if flow.wire_ident:
            self._by_wire_ident.pop(flow.wire_ident, None)
        flow.cancel_scope.cancel()
        if flow.sock is not None:
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
        self._close_raw()

    def _close_raw(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            trio.lowlevel.notify_closing(raw)
            raw.close()

    def statistics(self) -> dict:
        return {"flows": len(self.flows), "mode": self._mode, **self.counters}
