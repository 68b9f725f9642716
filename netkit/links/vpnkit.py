"""The hyperkit/vpnkit ("vmnet") protocol: a handshake, then u16-LE-length-prefixed frames.

Handshake, as in vpnkit's ``src/hostnet/vmnet`` (protocol version 22)::

    both sides  Init      49 bytes  b"VMN3T", u32 LE version (22), 40-byte ASCII commit id
    client      Command   41 bytes  u8 kind (1 Ethernet, 8 Preferred_ipv4),
                                    36-byte ASCII UUID, u32 LE preferred IPv4 (or 0)
    server      Response 258 bytes  u8 1, u16 LE mtu, u16 LE max packet size (mtu + 50),
                                    6-byte client MAC, zero padding
                            or      u8 2 (Disconnect), u8 length, message, zero padding

The server sends its Init only after reading the client's. A client UUID of 36 NUL
bytes asks the server to make one up (vpnkit does the same). After the handshake each
frame is a u16 LE length followed by the frame, both ways.
"""

from __future__ import annotations

import inspect
import os
import socket
import struct
import uuid as uuid_module
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

import trio

from .base import DEFAULT_SEND_QUEUE_BYTES, Link
from ._util import logger
from .stream import LE16_LENGTH, StreamFramedLink, StreamListener

__all__ = [
    "VpnkitListener",
    "VpnkitListenerStatistics",
    "VpnkitLink",
    "vpnkit_connect",
    "AllocationError",
    "VpnkitHandshakeError",
    "Allocate",
    "VPNKIT_MAGIC",
    "VPNKIT_VERSION",
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "Init",
    "Command",
    "Vif",
    "encode_init",
    "decode_init",
    "encode_command",
    "decode_command",
    "encode_vif_response",
    "encode_disconnect_response",
    "decode_response",
]

VPNKIT_MAGIC = b"VMN3T"
VPNKIT_VERSION = 22
#: Our commit id in the Init message (informational; vpnkit only logs it).
NETKIT_COMMIT = b"netkit".ljust(40, b"0")
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

_INIT = struct.Struct("<5sI40s")  # 49 bytes
_COMMAND = struct.Struct("<B36sI")  # 41 bytes
_VIF = struct.Struct("<BHH6s")  # response kind 1 + Vif: 11 bytes, padded
_RESPONSE_SIZE = 1 + 1 + 256  # kind, message length, message: the largest response

CMD_ETHERNET = 1
CMD_BIND_IPV4 = 6  # vpnkit's old port-forwarding command: refused, as vpnkit does
CMD_PREFERRED_IPV4 = 8
RESPONSE_VIF = 1
RESPONSE_DISCONNECT = 2

#: vpnkit tells the client it may receive frames this much longer than the MTU.
_MAX_PACKET_OVERHEAD = 50


class AllocationError(Exception):
    """Raised by an ``allocate`` callback to refuse a client; the message is sent to it
    in a Disconnect response (at most 255 bytes of it)."""


class VpnkitHandshakeError(Exception):
    """The vpnkit handshake failed (bad message, wrong version, or the server sent a
    Disconnect, whose reason is ``reason``)."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


#: ``allocate(uuid, preferred_ip) -> mac``: choose the client's MAC (6 bytes), or raise
#: ``AllocationError``. May be a coroutine function.
Allocate = Callable[[str, IPv4Address | None], "bytes | Awaitable[bytes]"]


# ----- messages -----
@dataclass(frozen=True, slots=True)
class Init:
    """The 49-byte greeting both sides send."""

    magic: bytes = VPNKIT_MAGIC
    version: int = VPNKIT_VERSION
    commit: bytes = NETKIT_COMMIT


@dataclass(frozen=True, slots=True)
class Command:
    """The client's 41-byte request (``kind`` 1 Ethernet or 8 Preferred_ipv4)."""

    kind: int
    uuid: str
    preferred_ip: IPv4Address | None = None


@dataclass(frozen=True, slots=True)
class Vif:
    """The server's answer: the MTU, the largest frame it may send, the client's MAC."""

    mtu: int
    max_packet_size: int
    mac: bytes


def encode_init(init: Init = Init()) -> bytes:
    return _INIT.pack(init.magic, init.version, init.commit.ljust(40, b"\0")[:40])


def decode_init(data: bytes) -> Init:
    magic, version, commit = _INIT.unpack(data)
    return Init(magic, version, commit)


def encode_command(uuid: str, preferred_ip: IPv4Address | None = None) -> bytes:
    text = uuid.encode("ascii")
    if len(text) != 36:
        raise ValueError(f"a vpnkit UUID is 36 ASCII characters, got {uuid!r}")
    if preferred_ip is None:
        return _COMMAND.pack(CMD_ETHERNET, text, 0)
    # vpnkit writes Ipaddr.V4.to_int32 (the address as a number) little-endian.
    return _COMMAND.pack(CMD_PREFERRED_IPV4, text, int(preferred_ip))


def decode_command(data: bytes) -> Command:
    """Parse a Command. Raises ``VpnkitHandshakeError`` with the reason to send back."""
    kind, raw_uuid, ip = _COMMAND.unpack(data)
    if kind == CMD_BIND_IPV4:
        raise VpnkitHandshakeError("client sent Bind_ipv4", reason="Unsupported command Bind_ipv4")
    if kind not in (CMD_ETHERNET, CMD_PREFERRED_IPV4):
        raise VpnkitHandshakeError(f"unknown command {kind}", reason=f"Unknown command: {kind}")
    if raw_uuid == bytes(36):
        client_uuid = str(uuid_module.uuid4())  # the client asked us to choose
    else:
        try:
            client_uuid = str(uuid_module.UUID(raw_uuid.decode("ascii")))
        except (UnicodeDecodeError, ValueError):
            shown = raw_uuid.decode("ascii", "replace")
            raise VpnkitHandshakeError(f"invalid UUID {shown!r}", reason=f"Invalid UUID: {shown}") from None
    preferred = IPv4Address(ip) if kind == CMD_PREFERRED_IPV4 else None
    return Command(kind, client_uuid, preferred)


def encode_vif_response(mtu: int, mac: bytes) -> bytes:
    return _VIF.pack(RESPONSE_VIF, mtu, mtu + _MAX_PACKET_OVERHEAD, mac).ljust(_RESPONSE_SIZE, b"\0")


def encode_disconnect_response(message: str) -> bytes:
    text = message.encode("utf-8", "replace")[:255]
    return (bytes((RESPONSE_DISCONNECT, len(text))) + text).ljust(_RESPONSE_SIZE, b"\0")


def decode_response(data: bytes) -> Vif | str:
    """A ``Vif``, or the Disconnect reason as a string."""
    kind = data[0]
    if kind == RESPONSE_VIF:
        _, mtu, max_packet_size, mac = _VIF.unpack_from(data)
        return Vif(mtu, max_packet_size, mac)
    if kind == RESPONSE_DISCONNECT:
        return data[2 : 2 + data[1]].decode("utf-8", "replace")
    raise VpnkitHandshakeError(f"unknown response kind {kind}")


async def _recv_exactly(sock: Any, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = await sock.recv(size - len(buf))
        if not chunk:
            raise VpnkitHandshakeError(f"connection closed during the handshake ({len(buf)}/{size} bytes)")
        buf += chunk
    return bytes(buf)


async def _send_all(sock: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


# ----- links -----
class VpnkitLink(StreamFramedLink):
    """A link after a vpnkit handshake: u16 LE length-prefixed frames.

    ``uuid``, ``mac`` (the client's), ``mtu`` and ``preferred_ip`` record what the
    handshake agreed. Frames longer than the agreed max packet size (mtu + 50) are
    dropped on send, since the peer sized its buffers by it.
    """

    uuid: str = ""
    mac: bytes = b""
    mtu: int = 0
    preferred_ip: IPv4Address | None = None


@dataclass(slots=True)
class VpnkitListenerStatistics:
    """What a ``VpnkitListener`` did with the connections it accepted."""

    connections: int = 0
    #: Handshakes completed: links handed to on_link.
    handshakes: int = 0
    #: Clients refused with a Disconnect (allocation refused, bad UUID, bad command).
    refused: int = 0
    #: Handshakes that failed otherwise (wrong magic/version, EOF, socket error).
    handshake_errors: int = 0
    #: Clients that did not finish the handshake in time.
    handshake_timeouts: int = 0


class VpnkitListener(StreamListener):
    """Serves the vpnkit protocol (hyperkit, Docker Desktop's forwarders) on a unix path
    or on any bound, listening stream socket (``from_socket``: vsock, a test socket).

    ``allocate(uuid, preferred_ip)`` picks each client's MAC or raises
    ``AllocationError`` (the client gets a Disconnect with the message). A client that
    does not finish the handshake within ``handshake_timeout`` seconds is dropped. Links
    are ``VpnkitLink``s, handed to ``on_link`` as described in ``StreamListener``.
    """

    kind = "vpnkit"

    def __init__(
        self,
        socket_or_path: Any,
        *,
        mtu: int,
        allocate: Allocate,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
        backlog: int = 128,
    ) -> None:
        super().__init__(socket_or_path, backlog=backlog)
        if not 68 <= mtu <= 65535 - _MAX_PACKET_OVERHEAD:
            raise ValueError(f"mtu {mtu} does not fit the vpnkit protocol")
        self.mtu = mtu
        self._allocate = allocate
        self._handshake_timeout = handshake_timeout
        self._send_queue_bytes = send_queue_bytes
        self.stats = VpnkitListenerStatistics()

    @classmethod
    def from_socket(cls, sock: Any, **kwargs: Any) -> "VpnkitListener":
        """Serve on an already bound and listening stream socket (trio or stdlib).

        ``serve`` takes ownership and closes it when it ends.
        """
        return cls(sock, **kwargs)

    async def _make_link(self, conn: Any, name: str) -> Link | None:
        self.stats.connections += 1
        result: tuple[Command, bytes] | None = None
        with trio.move_on_after(self._handshake_timeout):
            try:
                result = await self._server_handshake(conn)
            except VpnkitHandshakeError as e:
                if e.reason is not None:
                    self.stats.refused += 1
                else:
                    self.stats.handshake_errors += 1
                logger.warning("%s: vpnkit handshake failed: %s", name, e)
                conn.close()
                return None
            except OSError as e:
                self.stats.handshake_errors += 1
                logger.warning("%s: vpnkit handshake failed: %s", name, e)
                conn.close()
                return None
        if result is None:
            self.stats.handshake_timeouts += 1
            logger.warning("%s: vpnkit handshake timed out after %ss", name, self._handshake_timeout)
            conn.close()
            return None
        command, mac = result
        self.stats.handshakes += 1
        link = VpnkitLink.from_socket(
            conn,
            length_prefix=LE16_LENGTH,
            max_frame=65535,
            max_send_frame=self.mtu + _MAX_PACKET_OVERHEAD,
            name=f"vpnkit:{command.uuid}#{name.rsplit('#', 1)[-1]}",
            send_queue_bytes=self._send_queue_bytes,
        )
        link.uuid, link.mac, link.mtu, link.preferred_ip = command.uuid, mac, self.mtu, command.preferred_ip
        return link

    async def _server_handshake(self, conn: Any) -> tuple[Command, bytes]:
        init = decode_init(await _recv_exactly(conn, _INIT.size))
        await _send_all(conn, encode_init())  # sent even on a mismatch, as vpnkit does
        if init.magic != VPNKIT_MAGIC or init.version != VPNKIT_VERSION:
            raise VpnkitHandshakeError(f"unsupported client Init: magic {init.magic!r}, version {init.version}")
        raw_command = await _recv_exactly(conn, _COMMAND.size)
        try:
            command = decode_command(raw_command)
            mac = await self._call_allocate(command)
        except VpnkitHandshakeError as e:
            await _send_all(conn, encode_disconnect_response(e.reason or str(e)))
            raise
        await _send_all(conn, encode_vif_response(self.mtu, mac))
        return command, mac

    async def _call_allocate(self, command: Command) -> bytes:
        try:
            mac = self._allocate(command.uuid, command.preferred_ip)
            if inspect.isawaitable(mac):
                mac = await mac
        except AllocationError as e:
            raise VpnkitHandshakeError(f"allocation refused: {e}", reason=str(e)) from None
        if not isinstance(mac, (bytes, bytearray)) or len(mac) != 6:
            logger.error("allocate returned %r, not a 6-byte MAC", mac)
            raise VpnkitHandshakeError("allocate did not return a MAC", reason="internal error allocating a MAC")
        return bytes(mac)


async def vpnkit_connect(
    path_or_socket: Any,
    uuid: str | uuid_module.UUID,
    preferred_ip: IPv4Address | str | None = None,
    *,
    timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    send_queue_bytes: int = DEFAULT_SEND_QUEUE_BYTES,
) -> tuple[VpnkitLink, bytes, int]:
    """Connect as a vpnkit client (as hyperkit does); return ``(link, mac, mtu)``.

    ``path_or_socket`` is a unix socket path or a connected trio stream socket (which the
    link then owns). Raises ``VpnkitHandshakeError`` (``reason`` set when the server sent
    a Disconnect) or ``trio.TooSlowError`` after ``timeout`` seconds.
    """
    ip = IPv4Address(preferred_ip) if isinstance(preferred_ip, str) else preferred_ip
    command = encode_command(str(uuid), ip)
    if isinstance(path_or_socket, (str, os.PathLike)):
        label = os.fspath(path_or_socket)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        label, sock = "socket", path_or_socket
    try:
        with trio.fail_after(timeout):
            if isinstance(path_or_socket, (str, os.PathLike)):
                await sock.connect(label)
            await _send_all(sock, encode_init())
            server = decode_init(await _recv_exactly(sock, _INIT.size))
            if server.magic != VPNKIT_MAGIC or server.version != VPNKIT_VERSION:
                raise VpnkitHandshakeError(f"unsupported server Init: magic {server.magic!r}, version {server.version}")
            await _send_all(sock, command)
            response = decode_response(await _recv_exactly(sock, _RESPONSE_SIZE))
        if isinstance(response, str):
            raise VpnkitHandshakeError(f"server disconnected: {response}", reason=response)
    except BaseException:
        sock.close()
        raise
    link = VpnkitLink.from_socket(
        sock,
        length_prefix=LE16_LENGTH,
        max_frame=65535,
        max_send_frame=response.max_packet_size,
        name=f"vpnkit-client:{label}",
        send_queue_bytes=send_queue_bytes,
    )
    link.uuid, link.mac, link.mtu, link.preferred_ip = str(uuid), response.mac, response.mtu, ip
    return link, response.mac, response.mtu

