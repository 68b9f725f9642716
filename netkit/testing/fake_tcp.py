"""The fake guest's TCP stack: netkit's own engine playing the guest's kernel.

``await guest.open_tcp_stream(host, port)`` gives a trio stream whose segments travel
as real frames over the guest's link through the switch, so tests exercise exactly
the path a VM's connections take.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

import trio

from ..engine_stream import EngineStream
from ..tcp import TcpConnection, TcpSettings
from ..tcp.segment import Segment, rst_for
from ..timers import TimerHeap
from ..wire import Ipv4View, TcpView, build_tcp_header, tcp_frame

if TYPE_CHECKING:
    from .fake_guest import FakeGuest

__all__ = ["GuestTcpStack"]

_EPHEMERAL = range(40000, 61000)


@dataclass(eq=False)
class _Connection:
    conn: TcpConnection
    local_port: int
    remote_ip: bytes
    remote_port: int
    next_hop_mac: bytes
    stream: EngineStream | None = field(default=None)


class GuestTcpStack:
    """Client-side TCP for a ``FakeGuest``; run ``run()`` for its timers."""

    def __init__(self, guest: "FakeGuest", *, mtu: int = 1500) -> None:
        self.guest = guest
        self.settings = TcpSettings(mss=mtu - 40)
        self.connections: dict[tuple[int, bytes, int], _Connection] = {}
        self._timers: TimerHeap[_Connection] = TimerHeap()
        self._ports = itertools.cycle(_EPHEMERAL)
        self.resets_sent = 0

    async def run(self) -> None:
        await self._timers.run(self._fire)

    def _fire(self, c: _Connection, now: float) -> None:
        c.conn.handle_timer(now)
        self._service(c)

    async def open_tcp_stream(self, host: IPv4Address | str, port: int, *, timeout: float = 10.0) -> EngineStream:
        """Connect to ``host:port`` from the guest; raises ``ConnectionRefusedError`` on RST."""
        remote = IPv4Address(host).packed
        mac = await self.guest.arp_resolve(IPv4Address(self.guest.next_hop(remote)))
        for _ in range(len(_EPHEMERAL)):
            local_port = next(self._ports)
            if (local_port, remote, port) not in self.connections:
                break
        else:
            raise OSError("no free ephemeral port")
        conn = TcpConnection.connect(trio.current_time(), self.settings)
        c = _Connection(conn, local_port, remote, port, mac)
        c.stream = EngineStream(conn, lambda: self._service(c))
        self.connections[(local_port, remote, port)] = c
        self._service(c)
        with trio.fail_after(timeout):
            await c.stream.wait_connected()
        return c.stream

    def input(self, ip: Ipv4View) -> None:
        """A TCP segment addressed to the guest."""
        tcp = TcpView(ip.payload)
        if not tcp.checksum_ok(ip.src, ip.dst):
            return
        seg = Segment(tcp.seq, tcp.ack, tcp.flags, tcp.window, tcp.options(), bytes(tcp.payload))
        c = self.connections.get((tcp.dst_port, ip.src, tcp.src_port))
        if c is None:
            rst = rst_for(seg)
            if rst is not None:
                mac = self.guest.arp_cache.get(self.guest.next_hop(ip.src))
                if mac is not None:
                    header = build_tcp_header(tcp.dst_port, tcp.src_port, rst.seq, rst.ack, rst.flags, 0)
                    self.guest.send_frame(tcp_frame(mac, self.guest.mac, self.guest.ip, ip.src, header, b""))
                    self.resets_sent += 1
            return
        c.conn.receive_segment(seg, trio.current_time())
        self._service(c)

    def _service(self, c: _Connection) -> None:
        conn = c.conn
        c.stream.notify(conn.take_events())
        for seg in conn.take_outgoing():
            header = build_tcp_header(c.local_port, c.remote_port, seg.seq, seg.ack, seg.flags, seg.window,
                                      seg.options.emit())
            self.guest.send_frame(tcp_frame(c.next_hop_mac, self.guest.mac, self.guest.ip, c.remote_ip, header,
                                            seg.payload))
        if conn.is_closed:
            self.connections.pop((c.local_port, c.remote_ip, c.remote_port), None)
            self._timers.cancel(c)
        else:
            self._timers.schedule(c, conn.get_timer())
