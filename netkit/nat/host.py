"""The host side of NAT: where a guest's destination really is, and how to reach it.

``HostNetwork`` is the one place that creates host sockets for guest flows (and
resolves names for the HTTP proxy), so tests can inject a subclass that simulates
refused, unreachable and slow hosts, or a resolver they control. Nothing calls it
directly for a guest: ``netkit.nat.gate.HostGate`` translates, asks the policy, and
only then uses it.
"""

from __future__ import annotations

import errno
import socket
from ipaddress import IPv4Address, IPv4Network, IPv6Address

import trio

from ..config import Config

__all__ = ["HostNetwork", "translate_destination", "translate_source", "is_host_local", "LOOPBACK"]

LOOPBACK = IPv4Address("127.0.0.1")
_LOOPBACK_NET = IPv4Network("127.0.0.0/8")
_THIS_NET = IPv4Network("0.0.0.0/8")


def is_host_local(address: IPv4Address) -> bool:
    """Whether a host socket to ``address`` would reach the host itself: loopback, and
    0.0.0.0/8 (a connect to 0.0.0.0 lands on the host's own listeners)."""
    return address in _LOOPBACK_NET or address in _THIS_NET


def translate_destination(config: Config, dst: IPv4Address) -> IPv4Address | None:
    """The real address for a guest's destination, or None when it has none.

    The host alias maps to host loopback (unless ``host_loopback`` is off), the NAT table
    maps its virtual IPs, the gateway itself is not a NAT destination, and every other
    address is itself -- except loopback and 0.0.0.0/8, which from a guest never mean
    the host (a guest reaches the host only as the host alias, so ``--no-host-loopback``
    and rules on the alias cannot be side-stepped by addressing 127.0.0.1), and the
    rest of the virtual subnet, which is the guests' and never the host's network (the
    gateway answers frames to it with ICMP host unreachable; the proxy refuses it).
    """
    if dst == config.host_ip:
        return LOOPBACK if config.host_loopback else None
    for virtual, real in config.nat:
        if dst == virtual:
            return real
    if dst == config.gateway_ip or is_host_local(dst) or dst in config.subnet:
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

    async def connect_tcp(self, address: IPv4Address | IPv6Address, port: int) -> socket.socket:
        """A connected, non-blocking TCP socket to ``address:port``.

        Raises ``OSError`` with the connect error (ECONNREFUSED, EHOSTUNREACH, ...). The
        caller applies the timeout by cancelling. (IPv6 only for an operator's upstream
        proxy: guest destinations are IPv4.)
        """
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
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

    async def resolve(self, name: str) -> list[IPv4Address]:
        """The host's IPv4 addresses for ``name`` (the host's resolver: getaddrinfo), in
        its order, without duplicates. Raises ``OSError`` (``socket.gaierror``) when the
        name does not resolve. Only IPv4: the outbound policy and NAT are IPv4."""
        infos = await trio.socket.getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
        out: list[IPv4Address] = []
        for *_, sockaddr in infos:
            address = IPv4Address(sockaddr[0])
            if address not in out:
                out.append(address)
        return out

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
