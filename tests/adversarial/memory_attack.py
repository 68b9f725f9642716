"""Memory attacks by a hostile guest (issue 12, attack 5), shared by test_memory.py and
the soak: a loopback server that floods, serves a file or sits idle; a raw TCP attacker
that completes handshakes by hand and then advertises a zero window or sends data with
gaps; RSS from /proc/self/status.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from dataclasses import dataclass

import trio

from netkit.wire import Ipv4View, TcpView, build_tcp_header, tcp_frame
from netkit.wire.tcp import ACK, RST, SYN, TcpOptions

MB = 1 << 20
M32 = 0xFFFFFFFF

#: A loopback server with three listening ports, printed on one line: "flood" sends
#: zeros as fast as the peer takes them and never reads; "file" sends argv[1] bytes then
#: closes; "idle" accepts and does nothing.
SERVER = r"""
import selectors, socket, sys
size = int(sys.argv[1])
sel = selectors.DefaultSelector()
ports = []
for kind in ("flood", "file", "idle"):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4096)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, (kind, None))
    ports.append(s.getsockname()[1])
print(*ports, flush=True)
chunk = bytes(65536)
idle = []
while True:
    for key, _ in sel.select():
        kind, left = key.data
        sock = key.fileobj
        if left is None:
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            conn.setblocking(False)
            if kind == "idle":
                idle.append(conn)
            else:
                sel.register(conn, selectors.EVENT_WRITE, (kind, -1 if kind == "flood" else size))
            continue
        try:
            n = sock.send(chunk if left < 0 else chunk[:min(left, 65536)])
        except BlockingIOError:
            continue
        except OSError:
            sel.unregister(sock)
            sock.close()
            continue
        if left >= 0:
            left -= n
            if left:
                sel.modify(sock, selectors.EVENT_WRITE, (kind, left))
            else:
                sel.unregister(sock)
                sock.close()
"""


@dataclass
class ServerPorts:
    flood: int
    file: int
    idle: int


def start_server(file_size: int) -> tuple[subprocess.Popen, ServerPorts]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(file_size)], stdout=subprocess.PIPE, text=True)
    flood, file, idle = map(int, proc.stdout.readline().split())
    return proc, ServerPorts(flood, file, idle)


def rss_bytes() -> int:
    gc.collect()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024


async def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` until true (a deadline, not a sleep standing in for sync)."""
    with trio.move_on_after(timeout) as scope:
        while not predicate():
            await trio.sleep(0.01)
    if scope.cancelled_caught:
        raise AssertionError(f"timed out waiting for {what}")


@dataclass
class _Conn:
    sport: int
    dport: int
    iss: int
    window: int
    rcv_nxt: int | None = None
    reset: bool = False


class RawTcpAttacker:
    """Hand-made TCP from a hostile fake guest: takes over its TCP input, completes
    handshakes, keeps zero-window connections alive (answers probes) and sends what the
    attack asks for. Frames are paced by the guest link's queue so none are dropped."""

    def __init__(self, guest, gateway_mac: bytes, dst_ip: bytes) -> None:
        self.guest = guest
        self.gateway_mac = gateway_mac
        self.dst_ip = dst_ip
        self.conns: dict[int, _Conn] = {}
        self.established = 0
        self.resets = 0
        guest.tcp.input = self._input
        self._sent = 0

    def _send(self, c: _Conn, seq: int, flags: int, payload: bytes = b"", options: bytes = b"",
              window: int | None = None) -> None:
        header = build_tcp_header(c.sport, c.dport, seq & M32, (c.rcv_nxt or 0) & M32, flags,
                                  c.window if window is None else window, options)
        self.guest.send_frame(tcp_frame(self.gateway_mac, self.guest.mac, self.guest.ip, self.dst_ip, header,
                                        payload))
        self._sent += 1

    def _input(self, ip: Ipv4View) -> None:
        tcp = TcpView(ip.payload)
        c = self.conns.get(tcp.dst_port)
        if c is None or c.reset:
            return
        flags = tcp.flags
        if flags & RST:
            c.reset = True
            self.resets += 1
        elif flags & SYN and flags & ACK:
            if c.rcv_nxt is None:
                c.rcv_nxt = (tcp.seq + 1) & M32
                self.established += 1
            self._send(c, c.iss + 1, ACK)
        elif c.rcv_nxt is not None and (tcp.payload or ((tcp.seq - c.rcv_nxt) & M32) >= 0x80000000):
            # Data we will never accept, or a window probe: acknowledge nothing new, window
            # as before (zero for a zero-window attack), so netkit keeps the flow.
            self._send(c, c.iss + 1, ACK)

    async def pace(self) -> None:
        """Wait until the guest link has handed over everything queued."""
        link = self.guest.link
        await wait_until(lambda: not link.statistics().queued_bytes, 30, "the attacker's link to drain")

    async def open(self, count: int, dport: int, *, window: int, wscale: int | None = None,
                   first_port: int = 20000, timeout: float = 60.0) -> list[_Conn]:
        """``count`` connections; returns once netkit answered every SYN."""
        conns = []
        options = TcpOptions(mss=1460, wscale=wscale).emit()
        target = self.established + self.resets + count
        for i in range(count):
            c = _Conn(first_port + i, dport, int.from_bytes(os.urandom(4), "big"), window)
            self.conns[c.sport] = c
            conns.append(c)
            self._send(c, c.iss, SYN, options=options, window=65535)
            if i % 100 == 99:
                await self.pace()
        await wait_until(lambda: self.established + self.resets >= target, timeout, "handshakes")
        return conns

    async def send_with_gaps(self, conns: list[_Conn], segments: int, size: int = 1460) -> None:
        """On each connection, ``segments`` segments of ``size`` bytes, each one segment
        beyond a gap: all out of order, none ever deliverable."""
        payload = os.urandom(size)
        for k in range(segments):
            for c in conns:
                if c.rcv_nxt is not None and not c.reset:
                    self._send(c, c.iss + 1 + size * (2 * k + 1), ACK, payload)
                if self._sent % 200 == 0:
                    await self.pace()
        await self.pace()
