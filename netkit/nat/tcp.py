"""TCP NAT: guest connections become host socket connections.

A guest SYN to D:p becomes a non-blocking host ``connect()`` to D:p (after address
translation) in a task of its own, so a slow or silent destination never delays any
other flow. Only when it succeeds does the guest get a SYN-ACK; a refusal gets RST,
EHOSTUNREACH/ENETUNREACH an ICMP unreachable, a timeout RST.

As in vpnkit, flows are grouped into one ``DestinationStack`` per remote IP. Each flow
holds a sans-I/O ``TcpConnection`` (the engine) and a host socket:

- guest -> host: the packet path feeds segments to the engine; at the end of each batch
  of frames the engine's in-order data is written straight to the host socket
  (non-blocking). Whatever the socket does not take stays in the engine, whose
  advertised window shrinks, so a slow host slows the guest instead of growing a buffer.
  A flow task waits for writability only while data is pending.
- host -> guest: the flow task reads the host socket only while the engine has send
  space (the guest's window and our send buffer), so a slow guest slows the host.
- budgets: every engine charges its buffers (send, receive, out-of-order) to its
  guest's account in one ``BufferBudget`` (``Config.guest_buffer_bytes`` per guest,
  ``total_buffer_bytes`` in all). At the limit the engine stops opening its window,
  leaves the host side unread and drops out-of-order data, and new flows get RST; all
  counted (``budget-*`` in ``statistics()``). A guest is a switch port, so per-guest
  limits (``max_connections_per_guest`` too) count per port, not per source address.
- guest FIN -> ``shutdown(SHUT_WR)``; host EOF -> FIN; host reset -> RST; guest RST ->
  host socket closed with RST (SO_LINGER 0). Idle flows are never timed out.

All engine timers share one task and one heap.
"""

from __future__ import annotations

import errno
import itertools
import logging
import socket
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

import trio

from ..budget import BufferAccount, BufferBudget, return_freed_memory
from ..config import Config
from ..engine_stream import EngineStream
from ..links.base import TxOffload
from ..supervise import Supervisor
from ..tcp import TcpConnection, TcpSettings
from ..tcp.events import Closed, Connected, DataReceived, PeerFinished, Reset, SendSpace, TimedOut
from ..tcp.segment import Segment, is_connection_request, rst_for
from ..tcp.state import TcpState
from ..wire import Ipv4View, TcpView, build_tcp_header, icmp_frame, tcp_frame
from ..wire.frames import TCP_CSUM_OFFSET, TCP_CSUM_START
from ..wire.icmpv4 import DEST_UNREACHABLE, UNREACH_HOST, UNREACH_NET
from ..wire.ipv4 import PROTO_TCP
from ..timers import TimerHeap
from .gate import DENIED, HostGate, Refusal, Route

if TYPE_CHECKING:
    from ..gateway import Gateway
    from ..switch import Port

__all__ = ["TcpNat", "TcpFlow", "DestinationStack"]

log = logging.getLogger("netkit.nat.tcp")

_VIRTIO_NET_HDR_GSO_TCPV4 = 1
#: Largest IPv4 packet a GSO frame may describe.
_GSO_MAX_PACKET = 65535
#: Most bytes read from a host socket at once.
_READ_CHUNK = 256 * 1024
_LINGER_RST = struct.pack("ii", 1, 0)
#: Source ports on the host alias for connections port forwards open into guests.
_FORWARD_PORTS = range(32768, 61000)


@dataclass(eq=False)
class TcpFlow:
    """One guest connection and its host socket."""

    nat: "TcpNat"
    port: "Port"
    guest_mac: bytes
    guest_ip: bytes
    guest_port: int
    dst_ip: bytes
    dst_port: int
    conn: TcpConnection
    #: The first 28 bytes of the guest's SYN (IP header + 8), quoted in ICMP errors.
    syn_quote: bytes = b""
    sock: socket.socket | None = None
    created: float = 0.0
    bytes_to_host: int = 0
    bytes_to_guest: int = 0
    #: Set when the guest's FIN has been passed on (host socket write side shut).
    host_write_shut: bool = False
    #: Last time the host side sent anything (for the half-close timeout).
    host_active: float = 0.0
    #: For connections to a service on the gateway: the stream the service reads.
    stream: EngineStream | None = None
    #: The guest's (port's) buffer budget account, which the engine charges.
    account: BufferAccount | None = None
    closed: bool = False
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Woken when the engine has room for more host data, or data waits for the host.
    wake_reader: trio.Event = field(default_factory=trio.Event)
    wake_writer: trio.Event = field(default_factory=trio.Event)

    @property
    def key(self) -> tuple[bytes, int, int]:
        return (self.guest_ip, self.guest_port, self.dst_port)

    def describe(self) -> dict:
        return {
            "protocol": "tcp",
            "guest": f"{IPv4Address(self.guest_ip)}:{self.guest_port}",
            "destination": f"{IPv4Address(self.dst_ip)}:{self.dst_port}",
            "state": self.conn.state.name,
            "bytes_to_host": self.bytes_to_host,
            "bytes_to_guest": self.bytes_to_guest,
            "buffered": self.conn.buffered_bytes,
        }


@dataclass(eq=False)
class DestinationStack:
    """The flows towards one remote IP (vpnkit's per-destination stack)."""

    dst_ip: bytes
    real_ip: IPv4Address
    flows: dict[tuple[bytes, int, int], TcpFlow] = field(default_factory=dict)


class TcpNat:
    """The TCP handler of a gateway: NAT for guest connections, RST for closed ports."""

    def __init__(self, config: Config, gateway: "Gateway", nursery: trio.Nursery, supervisor: Supervisor,
                 gate: HostGate) -> None:
        self.config = config
        self.gateway = gateway
        self.nursery = nursery
        #: Runs every flow's task: one that fails is reset (the guest gets RST), counted
        #: as a flow error, and nothing else is touched.
        self.supervisor = supervisor
        #: The one way out: translation, policy, host sockets (shared by every path out).
        self.gate = gate
        mss = config.mtu - 40
        self.settings = TcpSettings(mss=mss)
        # With offloads the guest's kernel cuts our large segments at its MSS; a GSO packet
        # can describe at most 64 KiB, so at MTUs near that there is nothing to gain.
        gso_payload = (_GSO_MAX_PACKET - 20 - 60) // mss * mss
        self.offload_settings = TcpSettings(mss=mss, tso_size=gso_payload) if gso_payload > mss else self.settings
        self.stacks: dict[bytes, DestinationStack] = {}
        self.flow_count = 0
        #: Buffered bytes per guest (switch port) and in total; each account also counts
        #: its guest's flows for ``max_connections_per_guest``.
        self.budget = BufferBudget(config.guest_buffer_bytes, config.total_buffer_bytes)
        self.counters: dict[str, int] = {}
        self._dirty: dict[TcpFlow, None] = {}
        self._timers: TimerHeap[TcpFlow] = TimerHeap()
        self._half_closed: TimerHeap[TcpFlow] = TimerHeap()
        self._options_cache: tuple[object, bytes] = (None, b"")
        #: Gateway port -> ``async handler(stream, (guest_ip, guest_port))`` for services.
        self.services: dict[int, object] = {}
        self._forward_ports = itertools.cycle(_FORWARD_PORTS)
        #: ``intercept(destination, port)`` -> a service handler that takes this guest
        #: connection instead of plain NAT (the transparent HTTP proxy), or None.
        self.intercept = None
        nursery.start_soon(self._timers.run, self._fire_timer, name="tcp-timers")
        nursery.start_soon(self._half_closed.run, self._half_close_expired, name="tcp-half-close")

    def register_service(self, port: int, handler) -> None:
        """Serve guest connections to the gateway's ``port`` with ``await handler(stream,
        client)``: the connection is terminated here and the handler gets a trio stream."""
        self.services[port] = handler
        self.gateway.services[(PROTO_TCP, port)] = self.input

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # ------------------------------------------------------------------ packet path
    def input(self, port: "Port", src_mac: bytes, ip: Ipv4View, now: float) -> None:
        """One TCP segment from a guest (called by the gateway; must not raise)."""
        if ip.is_fragment:
            self._count("fragment-dropped")
            return
        tcp = TcpView(ip.payload)
        if not port.link.checksums_trusted and not tcp.checksum_ok(ip.src, ip.dst):
            self._count("bad-checksum")
            return
        stack = self.stacks.get(ip.dst)
        flow = stack.flows.get((ip.src, tcp.src_port, tcp.dst_port)) if stack is not None else None
        seg = Segment(tcp.seq, tcp.ack, tcp.flags, tcp.window, tcp.options(), tcp.payload)
        if flow is not None:
            if flow.port is not port:
                self._count("wrong-port")
                return
            conn = flow.conn
            if conn.state is TcpState.TIME_WAIT and is_connection_request(seg) and conn.can_reuse_for(seg):
                self._close_flow(flow)
            else:
                conn.receive_segment(seg, now)
                self._dirty[flow] = None
                return
        if not is_connection_request(seg):
            self._reply_rst(port, src_mac, ip, tcp, seg)
            return
        self._open_flow(port, src_mac, ip, tcp, seg, now)

    def _reply_rst(self, port: "Port", src_mac: bytes, ip: Ipv4View, tcp: TcpView, seg: Segment) -> None:
        rst = rst_for(seg)
        if rst is None:
            self._count("rst-ignored")
            return
        header = build_tcp_header(tcp.dst_port, tcp.src_port, rst.seq, rst.ack, rst.flags, 0)
        port.send(tcp_frame(src_mac, self.gateway.mac, ip.dst, ip.src, header, b""))
        self._count("rst-sent")

    def _open_flow(self, port: "Port", src_mac: bytes, ip: Ipv4View, tcp: TcpView, seg: Segment,
                   now: float) -> None:
        service = self.services.get(tcp.dst_port) if ip.dst == self.gateway.ip else None
        route = None
        if service is None:
            route = self.gate.route("tcp", IPv4Address(ip.src), IPv4Address(ip.dst), tcp.dst_port,
                                    switch_port=port.id)
            if type(route) is Refusal:
                # UNREACHABLE: the gateway (no service on this port), a disabled host alias.
                self._count("policy-denied" if route is DENIED else "closed-port")
                self._reply_rst(port, src_mac, ip, tcp, seg)
                return
            if self.intercept is not None and not route.redirected:
                service = self.intercept(IPv4Address(ip.dst), tcp.dst_port)
        if self.flow_count >= self.config.max_connections:
            self._count("connection-limit")
            self._reply_rst(port, src_mac, ip, tcp, seg)
            return
        account = self._admit(port)
        if account is None:
            self._reply_rst(port, src_mac, ip, tcp, seg)
            return
        settings = self.offload_settings if port.link.offload else self.settings
        conn = TcpConnection.from_syn(seg, now, settings, account=account)
        stack = self.stacks.get(ip.dst)
        if stack is None:
            real = route.address if route is not None else IPv4Address(ip.dst)
            stack = self.stacks[ip.dst] = DestinationStack(ip.dst, real)
        flow = TcpFlow(self, port, src_mac, ip.src, tcp.src_port, ip.dst, tcp.dst_port, conn,
                       syn_quote=bytes(ip.buf[:ip.header_len + 8]), created=now, account=account)
        stack.flows[flow.key] = flow
        self.flow_count += 1
        account.flows += 1
        self._count("connections-opened")
        if service is not None:
            self.supervisor.start_soon(self._run_service, flow, service, unit="tcp-service",
                                       on_error=lambda: self.flow_failed(flow))
        else:
            self.supervisor.start_soon(self._run_flow, flow, route, unit="tcp-nat",
                                       on_error=lambda: self.flow_failed(flow))

    def _admit(self, port: "Port") -> BufferAccount | None:
        """The port's budget account if it may open one more flow; None (counted) if not."""
        budget = self.budget
        account = budget.account(port)
        if account.flows >= self.config.max_connections_per_guest:
            self._count("guest-connection-limit")
        elif not budget.admits(account):
            budget.refused += 1
        else:
            return account
        budget.forget(port)
        return None

    def flush(self) -> None:
        """End of a batch of frames: act on every flow the batch touched."""
        if not self._dirty:
            return
        dirty = self._dirty
        self._dirty = {}
        now = trio.current_time()
        for flow in dirty:
            try:
                self._service(flow, now)
            except Exception as error:  # this flow fails alone; the batch goes on
                self._flow_raised(flow, "tcp-flush", error)

    # ------------------------------------------------------------------ engine output
    def _service(self, flow: TcpFlow, now: float) -> None:
        """Move data between engine and host socket, send segments, handle events."""
        if flow.closed:
            return
        conn = flow.conn
        if flow.stream is not None:
            events = conn.take_events()
            flow.stream.notify(events)
            self._transmit(flow)
            if conn.is_closed:
                self._close_flow(flow)
            else:
                self._timers.schedule(flow, conn.get_timer())
            return
        if conn.received_size and flow.sock is not None and not flow.host_write_shut:
            self._write_to_host(flow, now)
        for event in conn.take_events():
            kind = type(event)
            if kind is DataReceived:
                pass  # written above, or by the writer task once the socket has room
            elif kind is SendSpace:
                flow.wake_reader.set()
            elif kind is PeerFinished:
                pass  # handled below once every byte before the FIN reached the host
            elif kind is Connected:
                flow.wake_reader.set()
            elif kind is Reset:
                self._count("guest-resets")
                self._abort_host(flow)
            elif kind is TimedOut:
                self._count("timeouts")
                self._abort_host(flow)
            elif kind is Closed:
                self._transmit(flow)
                self._close_flow(flow)
                return
        if conn.peer_finished and not conn.received_size and not flow.host_write_shut and flow.sock is not None:
            flow.host_write_shut = True
            flow.host_active = now
            self._half_closed.schedule(flow, now + self.config.tcp_half_close_timeout)
            try:
                flow.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._transmit(flow)
        self._timers.schedule(flow, conn.get_timer())

    def _write_to_host(self, flow: TcpFlow, now: float) -> None:
        conn = flow.conn
        sock = flow.sock
        total = 0
        try:
            while conn.received_size:
                data = conn.received()
                n = sock.send(data)
                conn.consume(n, now)
                total += n
                if n < len(data):
                    flow.wake_writer.set()
                    break
        except BlockingIOError:
            flow.wake_writer.set()
        except OSError:
            self._count("host-write-errors")
            conn.abort(now)
        flow.bytes_to_host += total

    def _transmit(self, flow: TcpFlow) -> None:
        out = flow.conn.take_outgoing()
        if not out:
            return
        link = flow.port  # Port.send: the link, plus the live capture when one runs
        gw_mac = self.gateway.mac
        offload = link.link.offload
        mss = flow.conn.send_mss
        cache_key, cache_bytes = self._options_cache
        for seg in out:
            opts = seg.options
            if opts is cache_key:
                opt_bytes = cache_bytes
            else:
                opt_bytes = opts.emit()
                cache_key, cache_bytes = opts, opt_bytes
            header = build_tcp_header(flow.dst_port, flow.guest_port, seg.seq, seg.ack, seg.flags, seg.window,
                                      opt_bytes)
            payload = seg.payload
            if offload:
                frame = tcp_frame(flow.guest_mac, gw_mac, flow.dst_ip, flow.guest_ip, header, payload,
                                  partial_checksum=True)
                if len(payload) > mss:
                    tx = TxOffload(TCP_CSUM_START, TCP_CSUM_OFFSET, _VIRTIO_NET_HDR_GSO_TCPV4, mss,
                                   TCP_CSUM_START + len(header))
                else:
                    tx = TxOffload(TCP_CSUM_START, TCP_CSUM_OFFSET)
                link.send(frame, tx)
            else:
                link.send(tcp_frame(flow.guest_mac, gw_mac, flow.dst_ip, flow.guest_ip, header, payload))
            flow.bytes_to_guest += len(payload)
        self._options_cache = (cache_key, cache_bytes)

    # ------------------------------------------------------------------ timers
    def _half_close_expired(self, flow: TcpFlow, now: float) -> None:
        if flow.closed or flow.conn.is_closed:
            return
        quiet_until = flow.host_active + self.config.tcp_half_close_timeout
        if quiet_until > now:
            self._half_closed.schedule(flow, quiet_until)
            return
        self._count("half-close-timeouts")
        try:
            self._abort_host(flow)
            flow.conn.abort(now)
            self._service(flow, now)
        except Exception as error:  # this flow fails alone; the timer task goes on
            self._flow_raised(flow, "tcp-timer", error)

    def _fire_timer(self, flow: TcpFlow, now: float) -> None:
        if flow.closed:
            return
        try:
            flow.conn.handle_timer(now)
            self._service(flow, now)
        except Exception as error:  # this flow fails alone; the timer task goes on
            self._flow_raised(flow, "tcp-timer", error)

    # ------------------------------------------------------------------ local services
    async def _run_service(self, flow: TcpFlow, handler) -> None:
        now = trio.current_time()
        flow.stream = EngineStream(flow.conn, lambda: self._service(flow, trio.current_time()))
        flow.conn.accept(now)
        self._service(flow, now)
        client = (IPv4Address(flow.guest_ip), flow.guest_port)
        with flow.cancel_scope:
            try:
                await handler(flow.stream, client)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the guest went away: the ordinary end
            finally:
                # Anything else the service raised goes on to the supervisor (counted,
                # logged, and flow_failed resets the connection).
                await flow.stream.aclose()

    # ------------------------------------------------------------------ port forwards
    def open_to_guest(self, guest_ip: IPv4Address, guest_port: int, sock: socket.socket) -> TcpFlow | None:
        """Carry an accepted host connection (``sock``, non-blocking) into the guest:
        the engine's active side connects from the host alias to ``guest_ip:guest_port``
        and bytes are spliced as for NAT. Returns None (and resets ``sock``) when no
        guest has that address or the connection limit is reached."""
        now = trio.current_time()
        mac = self.gateway.mac_for_ip(guest_ip.packed)
        port = self.gateway.switch.port_for_mac(mac) if mac is not None else None
        if port is None or self.flow_count >= self.config.max_connections:
            self._count("forward-no-guest" if port is None else "connection-limit")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            sock.close()
            return None
        src = self.config.host_ip.packed
        stack = self.stacks.get(src)
        if stack is None:
            stack = self.stacks[src] = DestinationStack(src, self.config.host_ip)
        for _ in range(len(_FORWARD_PORTS)):
            local_port = next(self._forward_ports)
            if (guest_ip.packed, guest_port, local_port) not in stack.flows:
                break
        else:
            self._count("forward-ports-exhausted")
            sock.close()
            return None
        account = self._admit(port)
        if account is None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            sock.close()
            return None
        settings = self.offload_settings if port.link.offload else self.settings
        conn = TcpConnection.connect(now, settings, account=account)
        flow = TcpFlow(self, port, mac, guest_ip.packed, guest_port, src, local_port, conn, created=now,
                       account=account)
        flow.sock = sock
        stack.flows[flow.key] = flow
        self.flow_count += 1
        account.flows += 1
        self._count("forwards-opened")
        self._service(flow, now)
        self.supervisor.start_soon(self._splice, flow, unit="tcp-forward", on_error=lambda: self.flow_failed(flow))
        return flow

    async def _splice(self, flow: TcpFlow) -> None:
        with flow.cancel_scope:
            await self._splice_body(flow)

    async def _splice_body(self, flow: TcpFlow) -> None:
        """Bytes both ways between the host socket and the engine, until the flow closes."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._host_writer, flow)
            await self._host_reader(flow)
            await trio.sleep_forever()  # the flow ends through _close_flow's cancel

    # ------------------------------------------------------------------ host side
    async def _run_flow(self, flow: TcpFlow, route: Route) -> None:
        with flow.cancel_scope:
            try:
                with trio.fail_after(self.config.tcp_connect_timeout):
                    sock = await self.gate.connect_tcp(route)
            except trio.TooSlowError:
                self._count("connect-timeouts")
                self._refuse(flow)
                return
            except OSError as e:
                self._connect_failed(flow, e)
                return
            if flow.closed:  # the guest gave up (RST) while we were connecting
                sock.close()
                return
            flow.sock = sock
            now = trio.current_time()
            flow.conn.accept(now)
            self._service(flow, now)
            await self._splice_body(flow)

    def _connect_failed(self, flow: TcpFlow, e: OSError) -> None:
        if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            self._count("connect-unreachable")
            code = UNREACH_HOST if e.errno == errno.EHOSTUNREACH else UNREACH_NET
            frame = icmp_frame(flow.guest_mac, self.gateway.mac, self.gateway.ip, flow.guest_ip, DEST_UNREACHABLE,
                               code, b"\0\0\0\0", flow.syn_quote)
            flow.port.send(frame)
            self._close_flow(flow)
            return
        self._count("connect-refused" if e.errno == errno.ECONNREFUSED else "connect-errors")
        self._refuse(flow)

    def _refuse(self, flow: TcpFlow) -> None:
        flow.conn.refuse(trio.current_time())
        self._transmit(flow)
        self._close_flow(flow)

    async def _host_reader(self, flow: TcpFlow) -> None:
        """Host -> guest, only while the engine has room."""
        sock = flow.sock
        conn = flow.conn
        while not flow.closed:
            space = conn.send_space()
            if space <= 0:
                if conn.state not in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.SYN_RECEIVED,
                                      TcpState.SYN_SENT):
                    return
                flow.wake_reader = trio.Event()
                await flow.wake_reader.wait()
                continue
            try:
                data = sock.recv(min(space, _READ_CHUNK))
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:
                self._count("host-resets")
                now = trio.current_time()
                conn.abort(now)
                self._service(flow, now)
                return
            now = trio.current_time()
            if not data:
                conn.shutdown(now)  # host EOF -> FIN after the buffered data
                self._service(flow, now)
                return
            flow.host_active = now
            conn.send(data, now)
            self._service(flow, now)

    async def _host_writer(self, flow: TcpFlow) -> None:
        """Guest -> host data the socket could not take at once."""
        sock = flow.sock
        while not flow.closed:
            flow.wake_writer = trio.Event()
            if not flow.conn.received_size:
                await flow.wake_writer.wait()
                continue
            await trio.lowlevel.wait_writable(sock)
            self._service(flow, trio.current_time())

    def _flow_raised(self, flow: TcpFlow, unit: str, error: Exception) -> None:
        """Synchronous per-flow work (the batch flush, a timer) raised: count it as that
        flow's failure and end the flow, as the supervisor does for a flow's task."""
        self.supervisor.failed(unit, error)
        try:
            self.flow_failed(flow)
        except Exception:  # the engine is beyond sending RST: at least forget the flow
            self._close_flow(flow)

    def flow_failed(self, flow: TcpFlow) -> None:
        """A flow's task raised (the supervisor counted it): reset both sides, close the
        host socket and forget the flow."""
        if flow.closed:
            return
        self._abort_host(flow)
        flow.conn.abort(trio.current_time())
        self._transmit(flow)
        self._close_flow(flow)

    def _abort_host(self, flow: TcpFlow) -> None:
        """The guest reset (or the engine gave up): reset the host side too."""
        sock = flow.sock
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass

    def _close_flow(self, flow: TcpFlow) -> None:
        if flow.closed:
            return
        flow.closed = True
        stack = self.stacks.get(flow.dst_ip)
        if stack is not None and stack.flows.get(flow.key) is flow:
            del stack.flows[flow.key]
            if not stack.flows:
                del self.stacks[flow.dst_ip]
        self.flow_count -= 1
        # Free the buffers now, whatever may still hold the flow object for a while
        # (a superseded timer entry), and give the bytes back to the guest's budget.
        flow.conn.release_buffers()
        account = flow.account
        if account is not None:
            account.flows -= 1
            if not account.flows:
                self.budget.forget(flow.port)
        self._dirty.pop(flow, None)
        self._timers.cancel(flow)
        self._half_closed.cancel(flow)
        if flow.stream is not None:
            flow.stream.notify([])
        flow.cancel_scope.cancel()
        sock = flow.sock
        if sock is not None:
            flow.sock = None
            trio.lowlevel.notify_closing(sock)
            sock.close()
        self._count("connections-closed")

    def port_detached(self, port: "Port") -> None:
        """The guest's link is gone: reset the host side of every flow it owned, and give
        the memory its buffers held back to the OS."""
        closed = 0
        for stack in list(self.stacks.values()):
            for flow in list(stack.flows.values()):
                if flow.port is port:
                    self._abort_host(flow)
                    self._close_flow(flow)
                    closed += 1
        self.budget.forget(port)
        if closed:
            return_freed_memory()

    def address_unbound(self, ip: bytes) -> None:
        """``ip`` no longer belongs to the guest that opened these connections (its lease
        ended or moved): reset them, so the next holder of the address neither inherits
        nor collides with them. Rare, so a scan is fine."""
        for flow in [flow for flow in self.flows() if flow.guest_ip == ip]:
            self._count("connections-reset-address-unbound")
            self._abort_host(flow)
            flow.conn.abort(trio.current_time())
            self._transmit(flow)
            self._close_flow(flow)

    def close(self) -> None:
        """Close every flow's host socket (the switch is shutting down)."""
        for flow in self.flows():
            self._abort_host(flow)
            self._close_flow(flow)

    # ------------------------------------------------------------------ introspection
    def flows(self) -> list[TcpFlow]:
        return [flow for stack in self.stacks.values() for flow in stack.flows.values()]

    def statistics(self) -> dict:
        """Flow gauges, event counters, the budget's enforcement counters (``budget-*``)
        and, under ``buffers``, the bytes buffered now in total and per guest (port id)."""
        return {"flows": self.flow_count, "destinations": len(self.stacks), **self.counters,
                **self.budget.counters(), "buffers": self.budget.statistics()}
