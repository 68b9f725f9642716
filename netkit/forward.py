"""Port forwarding: host listeners whose connections are carried into guests.

- ``tcp``: a host TCP listener on ADDR:PORT; each connection becomes a guest connection
  opened by netkit's TCP engine (the guest sees it come from the host alias IP), and
  bytes are spliced with the same backpressure rules as NAT. A guest that refuses gives
  the host client a reset.
- ``unix``: the same from a unix socket path on the host.
- ``udp``: a host UDP socket on ADDR:PORT; each host client (address, port) gets a flow
  with its own source port on the host alias, closed after ``udp_idle_timeout``.

Specs: ``tcp:[ADDR:]PORT:GUEST_IP:GUEST_PORT``, ``udp:...`` and ``unix:PATH:GUEST_IP:GUEST_PORT``
(``--forward`` on the command line, or ``PortForwarder.add``). The default bind address
is 127.0.0.1.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

import trio

from .nat.flowtable import IdleFlowTable
from .supervise import Supervisor
from .wire import Ipv4View, UdpView, udp_frame
from .wire.frames import fragment_frames

if TYPE_CHECKING:
    from .config import Config
    from .gateway import Gateway
    from .nat.tcp import TcpNat
    from .nat.udp import UdpNat

__all__ = ["ForwardError", "Forward", "PortForwarder", "parse_forward_spec"]

log = logging.getLogger("netkit.forward")

PROTOCOLS = ("tcp", "udp", "unix")
_UDP_FORWARD_PORTS = range(32768, 61000)


class ForwardError(Exception):
    """A forward cannot be created or found; the message says why."""


def _split_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    try:
        number = int(port)
    except ValueError:
        raise ForwardError(f"{what}: {text!r} has no valid port") from None
    if not 0 < number < 65536:
        raise ForwardError(f"{what}: port {number} is out of range")
    if host in ("", "*"):
        host = "0.0.0.0"
    try:
        IPv4Address(host)
    except ValueError:
        raise ForwardError(f"{what}: {host!r} is not an IPv4 address") from None
    return host, number


def parse_forward_spec(spec: str) -> tuple[str, str, str]:
    """``tcp:127.0.0.1:8080:192.168.65.3:80`` -> ("tcp", "127.0.0.1:8080", "192.168.65.3:80")."""
    proto, sep, rest = spec.partition(":")
    if not sep or proto not in PROTOCOLS:
        raise ForwardError(f"{spec!r}: expected tcp:, udp: or unix: followed by LOCAL:GUEST_IP:GUEST_PORT")
    parts = rest.rsplit(":", 2)
    if len(parts) != 3:
        raise ForwardError(f"{spec!r}: expected LOCAL:GUEST_IP:GUEST_PORT after {proto}:")
    local, guest_ip, guest_port = parts
    if not local:
        raise ForwardError(f"{spec!r}: the local side is empty")
    return proto, local, f"{guest_ip}:{guest_port}"


@dataclass(eq=False)
class Forward:
    proto: str
    local: str
    remote: str
    sock: socket.socket
    guest_ip: IPv4Address
    guest_port: int
    connections: int = 0
    refused: int = 0
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def describe(self) -> dict:
        return {"proto": self.proto, "local": self.local, "remote": self.remote, "connections": self.connections}


@dataclass(eq=False)
class _UdpForwardFlow:
    forward: Forward
    client: tuple[str, int]
    local_port: int
    last_active: float
    closed: bool = False


class PortForwarder:
    """The forwards of one switch (``switch.forwarder``)."""

    def __init__(self, config: "Config", gateway: "Gateway", tcp_nat: "TcpNat", udp_nat: "UdpNat",
                 nursery: trio.Nursery, supervisor: Supervisor) -> None:
        self.config = config
        self.gateway = gateway
        #: Carries accepted TCP/unix connections into guests (``TcpNat.open_to_guest``).
        self.tcp_nat = tcp_nat
        #: Routes guests' UDP replies back to forward flows (``UdpNat.reverse``).
        self.udp_nat = udp_nat
        self.nursery = nursery
        #: Runs each forward's listener; an accepted connection or a UDP flow that fails
        #: ends alone (counted as a flow error), the forward goes on serving.
        self.supervisor = supervisor
        self._forwards: dict[tuple[str, str], Forward] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        #: (forward, host client) -> UDP forward flow.
        self._udp_flows: IdleFlowTable[tuple[int, tuple[str, int]], _UdpForwardFlow] = IdleFlowTable(
            max_flows=config.udp_max_flows, idle_timeout=config.udp_idle_timeout,
            release=self._release_udp, counters=self.counters)
        self._udp_by_port: dict[int, _UdpForwardFlow] = {}
        self._udp_ports = itertools.cycle(_UDP_FORWARD_PORTS)
        nursery.start_soon(self._udp_flows.run, name="udp-forward-expiry")

    # ----- management -----
    def add(self, proto: str, local: str, remote: str) -> Forward:
        """Create a forward and start serving it. Raises ``ForwardError`` with a reason."""
        if proto not in PROTOCOLS:
            raise ForwardError(f"protocol must be one of {', '.join(PROTOCOLS)}, not {proto!r}")
        guest_host, guest_port = _split_host_port(remote, "remote")
        guest_ip = IPv4Address(guest_host)
        if guest_ip not in self.config.subnet:
            raise ForwardError(f"remote: {guest_ip} is not in the guest subnet {self.config.subnet}")
        key_local = local if proto == "unix" else ":".join(map(str, _split_host_port(local, "local")))
        if (proto, key_local) in self._forwards:
            raise ForwardError(f"{proto} {key_local} is already forwarded")
        sock = self._bind(proto, key_local)
        forward = Forward(proto, key_local, f"{guest_ip}:{guest_port}", sock, guest_ip, guest_port)
        self._forwards[(proto, key_local)] = forward
        runner = self._serve_udp if proto == "udp" else self._serve_stream
        self.supervisor.start_soon(runner, forward, unit=f"forward-{proto}-listener",
                                   on_error=lambda: self._listener_failed(forward),
                                   name=f"forward {proto} {key_local}")
        log.info("forwarding %s %s -> %s", proto, key_local, forward.remote)
        return forward

    def remove(self, proto: str, local: str) -> bool:
        """Close the forward's listener (connections in flight carry on)."""
        if proto != "unix":
            try:
                local = ":".join(map(str, _split_host_port(local, "local")))
            except ForwardError:
                return False
        forward = self._forwards.pop((proto, local), None)
        if forward is None:
            return False
        forward.cancel_scope.cancel()
        trio.lowlevel.notify_closing(forward.sock)
        forward.sock.close()
        if proto == "unix":
            _unlink_socket(local)
        self._udp_flows.remove_if(lambda flow: flow.forward is forward)
        log.info("removed forward %s %s", proto, local)
        return True

    def _listener_failed(self, forward: Forward) -> None:
        """A forward's listener task failed (counted by the supervisor): remove the
        forward, so its socket is closed and ``netkit forwards`` no longer lists it."""
        if self._forwards.get((forward.proto, forward.local)) is forward:
            self.remove(forward.proto, forward.local)

    def forwards(self) -> list[Forward]:
        return list(self._forwards.values())

    def close(self) -> None:
        for proto, local in list(self._forwards):
            self.remove(proto, local)

    def _bind(self, proto: str, local: str) -> socket.socket:
        if proto == "unix":
            if os.path.exists(local):
                if not stat.S_ISSOCK(os.lstat(local).st_mode):
                    raise ForwardError(f"local: {local} exists and is not a socket")
                os.unlink(local)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: object = local
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
            host, port = local.rsplit(":", 1)
            address = (host, int(port))
            if proto == "tcp":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.setblocking(False)
            sock.bind(address)
            if proto != "udp":
                sock.listen(1024)
        except OSError as e:
            sock.close()
            if e.errno == errno.EADDRINUSE:
                raise ForwardError(f"local: {local} is already in use by another program") from None
            if e.errno == errno.EACCES:
                raise ForwardError(f"local: {local} is a privileged port (below 1024) and netkit is not "
                                   "allowed to bind it") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise ForwardError(f"local: {local} is not an address of this host") from None
            raise ForwardError(f"local: cannot bind {local}: {e.strerror}") from None
        return sock

    # ----- TCP and unix -----
    async def _serve_stream(self, forward: Forward) -> None:
        tcp_nat = self.tcp_nat
        with forward.cancel_scope:
            while True:
                try:
                    await trio.lowlevel.wait_readable(forward.sock)
                except trio.ClosedResourceError:
                    return
                while True:
                    try:
                        conn, _addr = forward.sock.accept()
                    except BlockingIOError:
                        break
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE):
                            log.warning("forward %s: out of file descriptors", forward.local)
                            await trio.sleep(0.1)
                        break
                    conn.setblocking(False)
                    if forward.proto == "tcp":
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    forward.connections += 1
                    try:
                        if tcp_nat.open_to_guest(forward.guest_ip, forward.guest_port, conn) is None:
                            forward.refused += 1
                    except Exception as error:  # this connection fails alone
                        self.supervisor.failed(f"forward-{forward.proto}", error)
                        forward.refused += 1
                        adopted = next((flow for flow in tcp_nat.flows() if flow.sock is conn), None)
                        if adopted is not None:
                            tcp_nat.flow_failed(adopted)  # closes conn with the flow
                        else:
                            _reset(conn)

    # ----- UDP -----
    async def _serve_udp(self, forward: Forward) -> None:
        with forward.cancel_scope:
            while True:
                try:
                    await trio.lowlevel.wait_readable(forward.sock)
                except trio.ClosedResourceError:
                    return
                for _ in range(64):
                    try:
                        data, client = forward.sock.recvfrom(65535)
                    except BlockingIOError:
                        break
                    except OSError:
                        continue
                    try:
                        self._udp_to_guest(forward, client, data)
                    except Exception as error:  # this host client's flow fails alone
                        self.supervisor.failed("forward-udp", error)
                        self._udp_flows.remove_if(lambda flow: flow.forward is forward and flow.client == client)

    def _udp_to_guest(self, forward: Forward, client: tuple[str, int], data: bytes) -> None:
        gateway = self.gateway
        config = self.config
        now = trio.current_time()
        flow = self._udp_flows.get((id(forward), client))
        if flow is None:
            for _ in range(len(_UDP_FORWARD_PORTS)):
                local_port = next(self._udp_ports)
                if local_port not in self._udp_by_port:
                    break
            else:
                return
            flow = _UdpForwardFlow(forward, client, local_port, now)
            self._udp_flows.add((id(forward), client), flow, now)
            self._udp_by_port[local_port] = flow
            self.udp_nat.reverse[(config.host_ip.packed, local_port)] = self._udp_from_guest
            forward.connections += 1
        flow.last_active = now
        mac = gateway.mac_for_ip(forward.guest_ip.packed)
        port = gateway.switch.port_for_mac(mac) if mac is not None else None
        if port is None:
            forward.refused += 1
            return
        frame = udp_frame(mac, gateway.mac, config.host_ip.packed, forward.guest_ip.packed, flow.local_port,
                          forward.guest_port, data)
        for piece in fragment_frames(frame, config.mtu):
            port.send(piece)

    def _udp_from_guest(self, ip: Ipv4View, udp: UdpView) -> None:
        flow = self._udp_by_port.get(udp.dst_port)
        if flow is None or flow.closed:
            return
        flow.last_active = trio.current_time()
        try:
            flow.forward.sock.sendto(udp.payload, flow.client)
        except OSError:
            pass
        except Exception as error:  # this flow fails alone
            self.supervisor.failed("forward-udp", error)
            self._udp_flows.remove(flow)

    def _release_udp(self, flow: _UdpForwardFlow) -> None:
        flow.closed = True
        self._udp_by_port.pop(flow.local_port, None)
        self.udp_nat.reverse.pop((self.config.host_ip.packed, flow.local_port), None)


def _reset(conn: socket.socket) -> None:
    """Close an accepted host connection with RST (SO_LINGER 0)."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    conn.close()


def _unlink_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass
