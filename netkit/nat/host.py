"""The host side of NAT: where a guest's destination really is, and how to reach it.

``HostNetwork`` is the one place that creates host sockets for guest flows, so tests can
inject a subclass that simulates refused, unreachable and slow hosts.
"""

from __future__ import annotations

import errno
import socket
from ipaddress import IPv4Address

import trio

from ..config import Config

__all__ = ["HostNetwork", "translate_destination", "translate_source", "LOOPBACK"]

LOOPBACK = IPv4Address("127.0.0.1")


def translate_destination(config: Config, dst: IPv4Address) -> IPv4Address | None:
    """The real address for a guest's destination, or None when it has none.

    The host alias maps to host loopback (unless ``host_loopback`` is off), the NAT table
    maps its virtual IPs, the gateway itself is not a NAT destination, and every other
    address is itself.
    """
    if dst == config.host_ip:
        return LOOPBACK if config.host_loopback else None
    for virtual, real in config.nat:
        if dst == virtual:
            return real
    if dst == config.gateway_ip:
        return None
    return dst


def translate_source(config: Config, real: IPv4Address) -> IPv4Address:
    """The address a guest sees a host-side peer as: the reverse of ``translate_destination``."""
    if real == LOOPBACK and config.host_loopback:
        return config.host_ip
    for virtual, mapped in config.nat:
        if real == mapped:
            return virtual
    return real


class HostNetwork:
    """Creates the host sockets that carry guest flows. Override for fault simulation."""

    #: Socket buffer sizes for flow sockets (None: the kernel's defaults and autotuning).
    tcp_sndbuf: int | None = None
    tcp_rcvbuf: int | None = None

    async def connect_tcp(self, address: IPv4Address, port: int) -> socket.socket:
        """A connected, non-blocking TCP socket to ``address:port``.

        Raises ``OSError`` with the connect error (ECONNREFUSED, EHOSTUNREACH, ...). The
        caller applies the timeout by cancelling.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tcp_sndbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.tcp_sndbuf)
            if self.tcp_rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.tcp_rcvbuf)
            err = sock.connect_ex((str(address), port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, errno.errorcode.get(err, str(err)))
            if err:
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, errno.errorcode.get(err, str(err)))
            return sock
        except BaseException:
            sock.close()
            raise

    def udp_socket(self) -> socket.socket:
        """An unconnected, non-blocking UDP socket for one guest flow.

        IP_RECVERR queues the ICMP errors the host receives for it (port unreachable,
        time exceeded...), with the original destination, so NAT can tell the guest.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
            sock.bind(("0.0.0.0", 0))
            return sock
        except BaseException:
            sock.close()
            raise

    def icmp_echo_socket(self) -> tuple[socket.socket, bool]:
        """A socket for ICMP echo: an unprivileged ping socket when the host allows it
        (net.ipv4.ping_group_range), else a raw socket. Returns ``(sock, is_raw)``;
        raises ``OSError`` when neither is permitted."""
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
            raw = False
        except PermissionError:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            raw = True
        try:
            sock.setblocking(False)
            if not raw:
                sock.setsockopt(socket.SOL_IP, IP_RECVERR, 1)
            return sock, raw
        except BaseException:
            sock.close()
            raise


#: Linux <linux/in.h>; not exported by Python's socket module.
IP_RECVERR = 11
