"""Host-side servers and guest-side helpers for the flow attacks (test_crash, test_udp_share)."""

from __future__ import annotations

import socket
import threading
import time
from ipaddress import IPv4Address

import trio

from netkit.testing.fake_guest import FakeGuest
from netkit.wire import EthernetView, IcmpView, Ipv4View, MalformedPacket, UdpView, icmp_frame, udp_frame
from netkit.wire.icmpv4 import ECHO_REPLY, ECHO_REQUEST
from netkit.wire.ipv4 import PROTO_ICMP, PROTO_UDP

HOST_ALIAS = "192.168.65.2"
GATEWAY = "192.168.65.1"


class Streamer:
    """A host UDP server on 127.0.0.1 whose first datagram from a client makes it stream
    datagrams back to that client's address from *another* socket (NAT mapping is
    endpoint-independent, so they reach the flow). A new client takes the stream over.
    Runs in a thread, so the flow's socket stays readable whatever the switch does."""

    def __init__(self, payload: bytes = b"stream" * 10) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.setblocking(False)
        self.port = self.server.getsockname()[1]
        self._sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.payload = payload
        self.target: tuple[str, int] | None = None
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Streamer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()
        self._sender.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                _data, self.target = self.server.recvfrom(2048)
            except BlockingIOError:
                pass
            if self.target is None:
                time.sleep(0.001)
                continue
            for _ in range(16):
                try:
                    self._sender.sendto(self.payload, self.target)
                    self.sent += 1
                except OSError:  # the flow's socket is gone (port unreachable): keep on
                    pass
            time.sleep(0.0005)


class UdpEcho:
    """A host UDP echo server on 127.0.0.1 that remembers every client source port."""

    def __init__(self, transform=None) -> None:
        self.transform = transform or (lambda data: data)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        #: (client source port, first bytes of its datagram) for every datagram.
        self.seen: list[tuple[int, bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sources(self, prefix: bytes) -> set[int]:
        """The host source ports of the datagrams that started with ``prefix``."""
        return {port for port, head in self.seen if head.startswith(prefix)}

    def __enter__(self) -> "UdpEcho":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except (socket.timeout, OSError):
                continue
            self.seen.append((addr[1], data[:16]))
            try:
                self.sock.sendto(self.transform(data), addr)
            except OSError:
                pass


def _udp_to(frame: bytes, port: int, payload: bytes | None = None) -> bool:
    try:
        ip = Ipv4View(EthernetView(memoryview(frame)).payload)
        if ip.protocol != PROTO_UDP:
            return False
        udp = UdpView(ip.payload)
        return udp.dst_port == port and (payload is None or bytes(udp.payload) == payload)
    except MalformedPacket:
        return False


def send_udp(guest: FakeGuest, gateway_mac: bytes, dst: str, dst_port: int, src_port: int, payload: bytes) -> None:
    guest.send_frame(udp_frame(gateway_mac, guest.mac, guest.ip, IPv4Address(dst).packed, src_port, dst_port,
                               payload))


async def udp_roundtrip(guest: FakeGuest, gateway_mac: bytes, dst: str, dst_port: int, src_port: int,
                        payload: bytes, timeout: float = 5.0) -> bytes:
    """Send one datagram and wait for a datagram back to ``src_port`` with the same payload."""
    with trio.fail_after(timeout):
        while True:
            send_udp(guest, gateway_mac, dst, dst_port, src_port, payload)
            try:
                return await guest.wait_frame(lambda f: _udp_to(f, src_port, payload), timeout=1.0)
            except trio.TooSlowError:
                continue  # UDP: a datagram may be lost to a full queue; ask again


async def wait_udp(guest: FakeGuest, src_port: int, timeout: float = 5.0) -> bytes:
    """The next datagram to the guest's ``src_port``."""
    return await guest.wait_frame(lambda f: _udp_to(f, src_port), timeout=timeout)


def send_ping(guest: FakeGuest, gateway_mac: bytes, dst: str, ident: int, seq: int = 0) -> None:
    guest.send_frame(icmp_frame(gateway_mac, guest.mac, guest.ip, IPv4Address(dst).packed, ECHO_REQUEST, 0,
                                ident.to_bytes(2, "big") + seq.to_bytes(2, "big"), b"flowhelpers"))


def is_echo_reply(frame: bytes, ident: int) -> bool:
    try:
        ip = Ipv4View(EthernetView(memoryview(frame)).payload)
        if ip.protocol != PROTO_ICMP:
            return False
        icmp = IcmpView(ip.payload)
        return icmp.type == ECHO_REPLY and icmp.ident == ident
    except MalformedPacket:
        return False


async def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate()`` until true (a deadline, not a sleep standing in for a sync)."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)
